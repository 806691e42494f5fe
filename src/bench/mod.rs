//! `merge-indexer bench …`: benchmarks, one file per subcommand. Part of the binary, not the
//! library: each composes the library's stages and prints figures. Performance targets are
//! checked here (against a reference measured in the same run), never as timed test assertions.
//!
//! May call every library stage; owns nothing that the running service needs.

use clap::Subcommand;

use merge_indexer::config::{Config, FlagOverrides};

mod docid_step;
mod encode;
mod ingest;
mod retrieval;
mod stages;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput against the embedded broker, next to a bare rdkafka consume loop.
    Ingest(ingest::IngestBenchArgs),
    /// Per-event cost of each ingest stage in isolation (decode, state write), no Kafka.
    Stages(stages::StageBenchArgs),
    /// Encoder throughput (products/s) at several batch sizes.
    Encode(encode::EncodeBenchArgs),
    /// Dense retrieval quality (R@10, R@100, NDCG@100) of an encoder on the graded ESCI folder.
    Retrieval(retrieval::RetrievalBenchArgs),
    /// One MERGE training step at the PyTorch reference's shapes, optionally next to it.
    DocidStep(docid_step::DocidStepBenchArgs),
}

/// Runs one benchmark with the configuration of `config_file` (defaults when absent).
pub async fn execute(command: BenchCommand, config_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = || Config::load(config_file, &FlagOverrides::default());
    match command {
        BenchCommand::Ingest(arguments) => ingest::ingest_benchmark(config()?, &arguments).await,
        BenchCommand::Stages(arguments) => stages::stage_benchmark(&config()?, &arguments),
        BenchCommand::Encode(arguments) => encode::encode_benchmark(config()?, &arguments),
        BenchCommand::Retrieval(arguments) => retrieval::retrieval_benchmark(config()?, &arguments),
        BenchCommand::DocidStep(arguments) => docid_step::docid_step_benchmark(&arguments),
    }
}
