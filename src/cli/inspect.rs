//! `merge-indexer inspect`: state counts, offsets, dead letters, vectors and DocIDs (read-only open).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use merge_indexer::config::Config;
use merge_indexer::state::{inspect_report, StateStore};

/// `inspect` flags.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// State directory [default: ./state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn inspect_command(config: &Config, json: bool) -> anyhow::Result<()> {
    if !config.state_dir.join("CURRENT").exists() {
        bail!("{} holds no state yet (run `merge-indexer run` or `demo` first)", config.state_dir.display());
    }
    let state = StateStore::open_read_only(&config.state_dir)?;
    let report = inspect_report(&state)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("state dir:        {}", report.state_dir.display());
    println!("kafka cluster:    {}", report.kafka_cluster_id.as_deref().unwrap_or("(not bound yet)"));
    println!("products:         {}", report.counts.products);
    println!("judgement pairs:  {} ({} without a stored product)", report.counts.judgement_pairs, report.judgement_pairs_without_product);
    println!("  by max level:   {}", serde_json::to_string(&report.judgement_pairs_by_max_level)?);
    println!("events:");
    for (topic_outcome, count) in &report.counts.events {
        println!("  {topic_outcome:<40} {count}");
    }
    println!("dead letters:");
    for (reason, count) in &report.counts.dead_letters {
        println!("  {reason:<40} {count}");
    }
    println!("embeddings:       {} products queued", report.embedding_queue);
    for (cache_id, count) in &report.embeddings_by_encoder {
        println!("  {cache_id:<40} {count} vectors");
    }
    println!("docids:           {} products hold one, {} queued", report.docids, report.docid_queue);
    println!("stored offsets (next to consume):");
    for (partition, next) in &report.stored_offsets {
        println!("  {partition:<40} {next}");
    }
    Ok(())
}
