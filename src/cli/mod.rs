//! The command line: one file per command, each a thin composition of the library's stages
//! (parsing and printing here; the work in `merge_indexer::service` and the stages). Part of the
//! binary, not the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use merge_indexer::config::{Config, FlagOverrides};
use merge_indexer::encoder::EncoderKind;

mod demo;
mod embed;
mod inspect;
mod produce;
mod run;
mod topics;
mod train_docids;

/// merge-indexer: a streaming incremental indexer for MERGE generative retrieval.
#[derive(Debug, Parser)]
#[command(name = "merge-indexer", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file (see ops/config/merge-indexer.example.toml).
    #[arg(long, global = true, env = "MERGE_INDEXER_CONFIG")]
    pub config: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the streaming indexer until interrupted (embedded broker when --brokers is absent).
    Run(run::RunArgs),
    /// Start the embedded broker, produce a synthetic catalog, index it until caught up, print a summary.
    Demo(demo::DemoArgs),
    /// Produce events (JSONL files, the synthetic catalog or the ESCI data) to a broker.
    Produce(produce::ProduceArgs),
    /// Print state counts, stored offsets and dead-letter counts of a state directory.
    Inspect(inspect::InspectArgs),
    /// Encode text read from stdin (one text per line) and print one JSON array per line.
    Embed(embed::EmbedArgs),
    /// Train MERGE DocIDs (RQ-VAE + relevance losses) on the graded ESCI folder, assign unique
    /// DocIDs, store them in state and write a report.
    TrainDocids(train_docids::TrainDocidsArgs),
    /// Topic administration.
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

/// Flags every indexing command shares.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonArgs {
    /// State directory [default: ./state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Kafka bootstrap servers; absent starts the embedded broker.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Address of the Prometheus endpoint [default: 127.0.0.1:9898].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Text encoder of the embedding workers [default: hashing; config key encoder.kind].
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderKind>,
}

impl CommonArgs {
    pub(crate) fn overrides(&self) -> FlagOverrides {
        FlagOverrides { state_dir: self.state_dir.clone(), metrics_addr: self.metrics_addr, brokers: self.brokers.clone(), encoder: self.encoder }
    }
}

/// Runs the parsed command line.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let config_file = cli.config.as_deref();
    match cli.command {
        Command::Run(arguments) => run::run_command(Config::load(config_file, &arguments.common.overrides())?, arguments.until_caught_up).await,
        Command::Demo(arguments) => {
            merge_indexer::service::demo::run_demo(Config::load(config_file, &arguments.common.overrides())?, &arguments.options).await
        }
        Command::Produce(arguments) => {
            let overrides = FlagOverrides { brokers: arguments.brokers.clone(), state_dir: arguments.state_dir.clone(), ..Default::default() };
            produce::produce_command(Config::load(config_file, &overrides)?, arguments.source).await
        }
        Command::Inspect(arguments) => {
            let overrides = FlagOverrides { state_dir: arguments.state_dir.clone(), ..Default::default() };
            inspect::inspect_command(&Config::load(config_file, &overrides)?, arguments.json)
        }
        Command::TrainDocids(arguments) => {
            let overrides = FlagOverrides { state_dir: arguments.state_dir.clone(), encoder: arguments.encoder, ..Default::default() };
            train_docids::train_docids_command(Config::load(config_file, &overrides)?, &arguments)
        }
        Command::Embed(arguments) => {
            let overrides = FlagOverrides { encoder: arguments.encoder, ..Default::default() };
            embed::embed_command(Config::load(config_file, &overrides)?, &arguments)
        }
        Command::Topics(topics::TopicsCommand::Create(arguments)) => {
            let config = Config::load(config_file, &FlagOverrides::default())?;
            let outcomes = merge_indexer::kafka::topics::create_topics(&config.kafka, &arguments.brokers, arguments.partitions, arguments.replication_factor).await?;
            for (topic, outcome) in outcomes {
                println!("{topic}: {outcome:?}");
            }
            Ok(())
        }
        Command::Bench(command) => crate::bench::execute(command, config_file).await,
    }
}
