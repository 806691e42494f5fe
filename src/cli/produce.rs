//! `merge-indexer produce`: JSONL files, the synthetic catalog or the ESCI subset to a broker.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};

use merge_indexer::config::Config;
use merge_indexer::eval::datasets::{default_esci_dir, EsciDataset};
use merge_indexer::kafka::{jsonl_messages, produce_all, reliable_producer};
use merge_indexer::synth::{SyntheticCatalog, SyntheticCatalogSpec};

/// What `produce` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProduceTopic {
    /// The products topic.
    Products,
    /// The query-events topic.
    QueryEvents,
}

/// `produce` flags.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Kafka bootstrap servers (e.g. the address `run` prints for its embedded broker).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Accepted for symmetry with the other commands; `produce` does not touch state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// What to produce.
    #[command(subcommand)]
    pub source: ProduceSource,
}

/// Sources of events for `produce`.
#[derive(Debug, Subcommand)]
pub enum ProduceSource {
    /// One message per line of a JSONL file, sent as is (invalid lines too: they exercise the dead-letter path).
    File {
        /// Destination topic.
        #[arg(long, value_enum)]
        topic: ProduceTopic,
        /// The JSONL file.
        path: PathBuf,
    },
    /// The deterministic synthetic catalog (products, then judgements and interactions).
    Synthetic {
        /// Products.
        #[arg(long, default_value_t = 2_000)]
        products: usize,
        /// Queries.
        #[arg(long, default_value_t = 300)]
        queries: usize,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// The real ESCI subset (products and graded judgements).
    Esci {
        /// ESCI folder [default: $MERGE_INDEXER_ESCI_DIR or ../shared/data/esci].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub(super) async fn produce_command(config: Config, source: ProduceSource) -> anyhow::Result<()> {
    let Some(brokers) = config.kafka.brokers.clone() else {
        bail!("produce needs --brokers (for the embedded broker, use the address `merge-indexer run` prints)");
    };
    let topics = &config.kafka.topics;
    let messages = match source {
        ProduceSource::File { topic, path } => {
            let topic_name = match topic {
                ProduceTopic::Products => topics.products.clone(),
                ProduceTopic::QueryEvents => topics.query_events.clone(),
            };
            jsonl_messages(&path, &topic_name, topic == ProduceTopic::Products)?
        }
        ProduceSource::Synthetic { products, queries, seed } => {
            let spec = SyntheticCatalogSpec { products, queries, seed, ..Default::default() };
            SyntheticCatalog::generate(&spec).messages(&topics.products, &topics.query_events)
        }
        ProduceSource::Esci { dir } => {
            let directory = dir.unwrap_or_else(default_esci_dir);
            EsciDataset::load(&directory)?.messages(&topics.products, &topics.query_events)
        }
    };
    let producer = reliable_producer(&config.kafka, &brokers)?;
    let delivered = produce_all(&producer, &messages).await?;
    println!("delivered {delivered} messages to {brokers}");
    Ok(())
}
