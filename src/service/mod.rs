//! The running service: wires the stages together — Kafka endpoint (configured cluster or the
//! embedded broker), state bound to its cluster, embedding workers, DocID assignment, the ingest
//! loop, shutdown on signals — and the demo's orchestration ([`demo`]).
//!
//! Owns no data of its own: it may call every stage (`kafka`, `ingest`, `state`, `encoder`,
//! `docid`, `synth`, `metrics`) but holds no RocksDB handle beyond the [`StateStore`] it opens,
//! and adds no model code. Later stages (retraining, versions, serving) are joined in here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::config::Config;
use crate::docid::incremental::{DocIdAssigner, DocIdModel};
use crate::encoder::cache::EmbeddingPool;
use crate::encoder::{build_encoder, TextEncoder};
use crate::events::ExpectedEmbedding;
use crate::ingest::{Indexer, RunOptions};
use crate::kafka::{base_client_config, EmbeddedBroker};
use crate::state::{ClusterBinding, StateStore};

pub mod demo;
pub mod progress;

/// The Kafka the indexer talks to: a configured cluster, or the embedded broker it owns.
pub struct KafkaEndpoint {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The embedded broker, kept alive as long as this value.
    pub embedded: Option<EmbeddedBroker>,
}

impl KafkaEndpoint {
    /// Connects to `config.kafka.brokers`, or starts the embedded broker and prints its address.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        if let Some(brokers) = &config.kafka.brokers {
            return Ok(Self { bootstrap_servers: brokers.clone(), embedded: None });
        }
        let broker = EmbeddedBroker::start_for(config)?;
        println!("embedded Kafka broker (librdkafka mock cluster) listening on {}", broker.bootstrap_servers());
        println!("  produce to it with: merge-indexer produce --brokers {} synthetic", broker.bootstrap_servers());
        Ok(Self { bootstrap_servers: broker.bootstrap_servers().to_owned(), embedded: Some(broker) })
    }
}

/// Fetches the cluster id (blocking metadata request).
fn fetch_cluster_id(config: &Config, bootstrap_servers: &str) -> anyhow::Result<String> {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = base_client_config(&config.kafka, bootstrap_servers)?.create()?;
    consumer
        .client()
        .fetch_cluster_id(Duration::from_secs(15))
        .with_context(|| format!("no cluster id from {bootstrap_servers} within 15 s: is the broker reachable?"))
}

/// Opens the state and binds it to the cluster. State left by an embedded broker (whose
/// events died with it) is discarded; state of another real cluster is an error.
pub fn open_state_for_cluster(config: &Config, endpoint: &KafkaEndpoint) -> anyhow::Result<Arc<StateStore>> {
    let cluster_id = fetch_cluster_id(config, &endpoint.bootstrap_servers)?;
    let embedded = endpoint.embedded.is_some();
    let state = StateStore::open(&config.state_dir, &config.state)?;
    match state.bind_cluster(&cluster_id, embedded)? {
        ClusterBinding::NewlyBound | ClusterBinding::Same => Ok(Arc::new(state)),
        ClusterBinding::Mismatch { stored_cluster_id, stored_was_embedded: true } => {
            tracing::warn!(state_dir = %config.state_dir.display(), %stored_cluster_id, %cluster_id,
                "state belongs to a previous embedded broker whose events are gone; starting from empty state");
            drop(state);
            clear_state_dir(&config.state_dir)?;
            let state = StateStore::open(&config.state_dir, &config.state)?;
            state.bind_cluster(&cluster_id, embedded)?;
            Ok(Arc::new(state))
        }
        ClusterBinding::Mismatch { stored_cluster_id, stored_was_embedded: false } => bail!(
            "state dir {} holds offsets of Kafka cluster {stored_cluster_id}, not of {cluster_id}; \
             offsets do not carry across clusters: use another --state-dir",
            config.state_dir.display()
        ),
    }
}

/// Removes the RocksDB files of a state dir, keeping the directory and its README/.gitignore.
fn clear_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(state_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "README.md" || name == ".gitignore" {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// A shutdown signal that turns true on Ctrl-C or SIGTERM.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match terminate.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutdown requested; finishing the current batch");
        let _ = sender.send(true);
    });
    receiver
}

/// Loads the configured encoder, makes validation check precomputed vectors against it, and
/// starts the embedding workers on `state`.
pub fn start_embedding_workers(config: &mut Config, state: &Arc<StateStore>) -> anyhow::Result<(EmbeddingPool, Arc<dyn TextEncoder>)> {
    let encoder = build_encoder(&config.encoder)?;
    config.validation.expected_embedding = Some(ExpectedEmbedding { model_name: encoder.model_name().to_owned(), dimension: encoder.dimension() });
    println!("encoder: {} ({} dimensions)", encoder.cache_id(), encoder.dimension());
    let pool = EmbeddingPool::start(state, Arc::clone(&encoder), &config.encoder.text, config.encoder.batch_size, config.encoder.workers)?;
    Ok((pool, encoder))
}

/// Starts DocID assignment for new products when `docids.assign_new_products` is on and a
/// trained model is in the model directory. No model is not an error (DocIDs come with the
/// first `train-docids`); an unreadable model, or one trained on another encoder's vectors, is.
pub fn start_docid_assignment(config: &Config, state: &Arc<StateStore>, encoder: &dyn TextEncoder) -> anyhow::Result<Option<DocIdAssigner>> {
    if !config.docids.assign_new_products {
        return Ok(None);
    }
    let model_dir = config.docid_model_dir();
    if !model_dir.join(crate::docid::incremental::MANIFEST_FILE).is_file() {
        println!("DocIDs: no model in {} yet; new products get DocIDs once `merge-indexer train-docids` writes one", model_dir.display());
        return Ok(None);
    }
    let model = DocIdModel::load(&model_dir)?;
    let assigner = DocIdAssigner::start(
        state,
        model,
        encoder.cache_id(),
        config.docids.page_size,
        Duration::from_millis(config.docids.idle_poll_ms.max(10)),
    )?;
    println!("DocIDs: new products are assigned with the model in {} ({:?})", model_dir.display(), assigner.model.manifest.variant);
    Ok(Some(assigner))
}

/// Polls every 100 ms until `is_empty` says the queue of `stage` is empty (`true`) or `timeout`
/// passes (`false`). Fails at once if `worker_ended` says its worker thread is gone.
async fn wait_for_queue(
    stage: &str,
    is_empty: impl Fn() -> Result<bool, crate::state::StateError>,
    worker_ended: impl Fn() -> bool,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    loop {
        if is_empty()? {
            return Ok(true);
        }
        anyhow::ensure!(!worker_ended(), "the {stage} worker ended while products were queued (see the log above)");
        if started.elapsed() > timeout {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the embedding queue is empty (or `timeout` passes); returns whether it emptied.
async fn wait_for_embeddings(state: &StateStore, pool: &EmbeddingPool, timeout: Duration) -> anyhow::Result<bool> {
    wait_for_queue("embedding", || state.embedding_queue_is_empty(), || pool.any_finished(), timeout).await
}

/// Waits until the DocID queue is empty (or `timeout` passes); returns whether it emptied.
async fn wait_for_docids(state: &StateStore, assigner: &DocIdAssigner, timeout: Duration) -> anyhow::Result<bool> {
    wait_for_queue("DocID", || Ok(state.docid_queue_page(None, 1)?.is_empty()), || assigner.is_finished(), timeout).await
}

/// The streaming indexer (`merge-indexer run`): metrics endpoint, Kafka endpoint, state bound to
/// its cluster, embedding workers and DocID assignment, then the ingest loop until a shutdown
/// signal (or, with `until_caught_up`, until every assigned partition is caught up). Prints the
/// run summary as JSON.
pub async fn run_indexer(mut config: Config, until_caught_up: bool) -> anyhow::Result<()> {
    crate::metrics::install_exporter(config.metrics_addr)?;
    println!("metrics on http://{}/metrics", config.metrics_addr);
    let endpoint = KafkaEndpoint::from_config(&config)?;
    let state = open_state_for_cluster(&config, &endpoint)?;
    let (embeddings, encoder) = start_embedding_workers(&mut config, &state)?;
    let docids = start_docid_assignment(&config, &state, encoder.as_ref())?;
    let config = Arc::new(config);
    let indexer = Indexer::connect(Arc::clone(&config), Arc::clone(&state), &endpoint.bootstrap_servers)?;
    let summary = indexer
        .run(shutdown_on_signals(), RunOptions { stop_when_caught_up: until_caught_up, max_batches: None })
        .await;
    let embedded = embeddings.stop();
    let assigned = docids.map(DocIdAssigner::stop);
    let summary = summary?;
    println!("{}", serde_json::to_string(&summary)?);
    println!("{}", serde_json::json!({ "embeddings": embedded, "docids": assigned }));
    Ok(())
}
