//! The `merge-indexer` binary: parses the command line and runs it on a Tokio runtime.

use clap::Parser;

mod bench;
mod cli;

/// mimalloc reuses large buffers instead of unmapping them after every tensor (see Cargo.toml).
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// mimalloc's `mi_option_purge_delay` (the C enum value; the Rust bindings do not name it).
const MIMALLOC_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> anyhow::Result<()> {
    // Keep freed pages committed instead of returning them to the kernel 10 ms later: a training
    // step frees and reallocates the same large activation buffers, and re-faulting them made
    // the kernel zero pages for 9–14 % of a step (measured; docs/performance-notes.md "MERGE training step").
    // `MIMALLOC_PURGE_DELAY` in the environment still decides when set.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option before any thread is spawned.
        unsafe { libmimalloc_sys::mi_option_set(MIMALLOC_OPTION_PURGE_DELAY, -1) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn")))
        .with_target(false)
        // Logs go to stderr: stdout carries command output (`embed` vectors, JSON summaries).
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(cli::execute(cli))
}
