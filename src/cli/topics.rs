//! `merge-indexer topics create`: the topics of `topics/topics.json` through the Admin API.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Topic administration.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the topics of topics/topics.json that do not exist yet (Kafka Admin API).
    Create(TopicsCreateArgs),
}

/// `topics create` flags.
#[derive(Debug, Args)]
pub struct TopicsCreateArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// Partitions of `products` and `query-events`, overriding the spec's 12.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Replication factor, overriding the spec's 3 (use 1 on a one-broker cluster).
    #[arg(long)]
    pub replication_factor: Option<i32>,
    /// Accepted for symmetry with the other commands; `topics` does not touch state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}
