//! The `merge-indexer` binary: parses the command line and runs it on a Tokio runtime.

use clap::Parser;

/// mimalloc reuses large buffers instead of unmapping them after every tensor (see Cargo.toml).
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn")))
        .with_target(false)
        // Logs go to stderr: stdout carries command output (`embed` vectors, JSON summaries).
        .with_writer(std::io::stderr)
        .init();
    let cli = merge_indexer::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(merge_indexer::cli::execute(cli))
}
