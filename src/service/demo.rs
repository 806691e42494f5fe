//! `merge-indexer demo`: the whole indexer on the embedded broker with a synthetic catalog —
//! produce, index until caught up, wait for every vector, train DocIDs on what was stored, then a
//! second wave of products that get DocIDs incrementally, ending with the bijection check.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::progress::epoch_progress;
use super::{open_state_for_cluster, shutdown_on_signals, start_docid_assignment, start_embedding_workers, wait_for_docids, wait_for_embeddings, KafkaEndpoint};
use crate::config::Config;
use crate::encoder::TextEncoder;
use crate::ingest::{Indexer, RunOptions, RunSummary};
use crate::kafka::{produce_all, reliable_producer};
use crate::state::StateStore;
use crate::synth::{malformed_examples, SyntheticCatalog, SyntheticCatalogSpec};

/// What the demo produces and trains; also the `demo` command's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Products in the synthetic catalog.
    #[arg(long, default_value_t = 2_000)]
    pub products: usize,
    /// Queries in the synthetic catalog.
    #[arg(long, default_value_t = 300)]
    pub queries: usize,
    /// Seed of the synthetic catalog.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Epochs of the DocID model trained on the indexed catalog (0: no DocID training; an
    /// existing model in the state's model directory is used instead, if any).
    #[arg(long, default_value_t = 20)]
    pub docid_epochs: usize,
    /// Products of a second wave produced after DocID training, which get DocIDs incrementally.
    #[arg(long, default_value_t = 50)]
    pub new_products: usize,
    /// Keep indexing (and serving /metrics) after the summary until interrupted.
    #[arg(long)]
    pub keep_running: bool,
}

/// Trains a DocID model on what the demo indexed and stores its DocIDs and model.
fn demo_train_docids(config: &Config, state: &StateStore, encoder: &dyn TextEncoder, epochs: usize) -> anyhow::Result<()> {
    use crate::docid::model::RqVaeConfig;
    use crate::docid::train::{DocIdTrainingConfig, TrainingSet, Variant};
    let set = TrainingSet::from_state(state, encoder.cache_id())?;
    anyhow::ensure!(!set.embeddings.is_empty(), "no product vectors to train DocIDs on");
    // Gradient clipping at norm 1: on this templated catalog the unclipped relevance gradients
    // collapse the codebooks (docs/docids.md "Gradient clipping").
    let training = DocIdTrainingConfig::new(RqVaeConfig::new(encoder.dimension())).with_epochs(epochs).with_batch_size(256).with_gradient_clip_norm(Some(1.0));
    let (queries, _validation) = crate::docid::train::split_validation(set.queries, training.validation_fraction, training.seed);
    println!("training DocIDs (MERGE, {epochs} epochs, gradients clipped at norm 1) on {} products and {} graded queries from state…", set.product_ids.len(), queries.len());
    let manifest = crate::docid::incremental::DocIdModelManifest::for_training(encoder, Variant::Merge, set.embeddings.len(), epochs);
    let started = std::time::Instant::now();
    let (progress, on_epoch) = epoch_progress(epochs);
    let (docids, report) =
        crate::docid::incremental::train_and_store(state, &set.product_ids, &set.embeddings, &queries, &training, &manifest, &config.docid_model_dir(), on_epoch)?;
    progress.finish_and_clear();
    println!(
        "  {} DocIDs in {:.1} s: collisions before {} after {}; codes used per level {:?}; unique tokens per layer among each query's relevant products {:?}",
        docids.len(),
        started.elapsed().as_secs_f64(),
        report.collisions_before,
        report.collisions_after,
        report.utilisation_per_level.iter().map(|value| format!("{:.0}%", value * 100.0)).collect::<Vec<_>>(),
        report.unique_tokens_per_layer.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
    );
    Ok(())
}

/// Runs the demo on `config` (its Kafka endpoint is normally the embedded broker).
pub async fn run_demo(mut config: Config, arguments: &DemoOptions) -> anyhow::Result<()> {
    let metrics = crate::metrics::install_exporter(config.metrics_addr)?;
    let endpoint = KafkaEndpoint::from_config(&config)?;
    let state = open_state_for_cluster(&config, &endpoint)?;
    let (embeddings, encoder) = start_embedding_workers(&mut config, &state)?;
    let spec = SyntheticCatalogSpec { products: arguments.products, queries: arguments.queries, seed: arguments.seed, ..Default::default() };
    let catalog = SyntheticCatalog::generate(&spec);
    let topics = &config.kafka.topics;
    let mut messages = catalog.messages(&topics.products, &topics.query_events);
    messages.extend(malformed_examples(&topics.products, &topics.query_events));
    let producer = reliable_producer(&config.kafka, &endpoint.bootstrap_servers)?;
    let produced = produce_all(&producer, &messages).await?;
    println!(
        "produced {produced} events ({} product events for {} products, {} query events, {} malformed)",
        catalog.product_events.len(),
        catalog.products.len(),
        catalog.query_events.len(),
        produced - catalog.product_events.len() - catalog.query_events.len()
    );
    let config = Arc::new(config);
    let indexer = Indexer::connect(Arc::clone(&config), Arc::clone(&state), &endpoint.bootstrap_servers)?;
    let shutdown = shutdown_on_signals();
    let summary = indexer.run(shutdown.clone(), RunOptions { stop_when_caught_up: true, max_batches: None }).await?;
    print_demo_summary(&state, &summary, &indexer).await?;
    println!("  waiting for the embedding workers to drain the queue…");
    let embedding_started = std::time::Instant::now();
    let drained = wait_for_embeddings(&state, &embeddings, Duration::from_secs(1800)).await?;
    println!(
        "  embeddings: {} vectors by {} ({}), queue {} after {:.1} s more",
        state.count_embeddings(encoder.cache_id())?,
        encoder.model_name(),
        encoder.cache_id(),
        if drained { "empty" } else { "NOT empty" },
        embedding_started.elapsed().as_secs_f64()
    );
    let rendered = metrics.render();
    let metric_lines = rendered.lines().filter(|line| !line.starts_with('#')).count();
    println!("metrics: {metric_lines} samples at http://{}/metrics", config.metrics_addr);
    if !drained {
        bail!("the embedding queue did not drain");
    }
    if arguments.docid_epochs > 0 {
        demo_train_docids(&config, &state, encoder.as_ref(), arguments.docid_epochs)?;
    }
    let docids = start_docid_assignment(&config, &state, encoder.as_ref())?;
    if let Some(assigner) = &docids {
        let wave_spec = SyntheticCatalogSpec { products: arguments.products + arguments.new_products, ..spec };
        let wave = SyntheticCatalog::generate(&wave_spec).product_upserts_from(&config.kafka.topics.products, arguments.products);
        let produced = produce_all(&producer, &wave).await?;
        println!("second wave: produced {produced} new products; they get DocIDs incrementally");
        let summary = indexer.run(shutdown.clone(), RunOptions { stop_when_caught_up: true, max_batches: None }).await?;
        println!("  indexed {} more events", summary.records());
        let drained = wait_for_embeddings(&state, &embeddings, Duration::from_secs(1800)).await?;
        let assigned = drained && wait_for_docids(&state, assigner, Duration::from_secs(600)).await?;
        let holders = state.docid_count()?;
        let products = state.counts()?.products;
        println!(
            "  DocIDs: {holders} of {products} products hold one (a bijection: {}); queue {}",
            state.docids_form_a_bijection()?,
            if assigned { "empty" } else { "NOT empty" }
        );
    }
    if arguments.keep_running {
        println!("indexing continues until Ctrl-C");
        indexer.run(shutdown, RunOptions::default()).await?;
    }
    embeddings.stop();
    if let Some(assigner) = docids {
        assigner.stop();
    }
    Ok(())
}

async fn print_demo_summary(state: &StateStore, summary: &RunSummary, indexer: &Indexer) -> anyhow::Result<()> {
    let counts = state.counts()?;
    let rate = summary.records() as f64 / summary.active_seconds.max(1e-9);
    println!("caught up: {} events in {} batches, {:.0} events/s while active", summary.records(), summary.batches, rate);
    println!("  outcomes: {}", serde_json::to_string(&summary.outcomes)?);
    println!("  products stored: {}, judgement pairs: {}", counts.products, counts.judgement_pairs);
    println!("  judgement pairs without a stored product: {}", state.count_judgements_without_product()?);
    println!("  dead letters by reason: {}", serde_json::to_string(&counts.dead_letters)?);
    // Bounded: a broker that stops answering must not hang the demo.
    match tokio::time::timeout(Duration::from_secs(30), indexer.partition_lags_async()).await {
        Ok(Ok(lags)) => {
            for lag in lags {
                println!("  {}/{}: next offset {} of {} (lag {})", lag.topic, lag.partition, lag.next_offset, lag.high_watermark, lag.lag);
            }
        }
        Ok(Err(error)) => println!("  partition lags unavailable: {error:#}"),
        Err(_elapsed) => println!("  partition lags unavailable: no watermarks from the broker within 30 s"),
    }
    Ok(())
}
