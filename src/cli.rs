//! The command line: `run`, `demo`, `produce`, `inspect` and `bench`. Parsing lives here;
//! each command is a thin composition of the library's stages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::config::{Config, FlagOverrides};
use crate::datasets::{default_esci_dir, EsciDataset};
use crate::docid::incremental::{DocIdAssigner, DocIdModel};
use crate::encoder::cache::EmbeddingPool;
use crate::encoder::{build_encoder, EncoderKind, TextEncoder};
use crate::events::ExpectedEmbedding;
use crate::kafka::{base_client_config, produce_all, reliable_producer, EmbeddedBroker, OutgoingMessage};
use crate::source::{Indexer, RunOptions, RunSummary};
use crate::state::{ClusterBinding, StateStore};
use crate::synth::{malformed_examples, SyntheticCatalog, SyntheticCatalogSpec};

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
    Run(RunArgs),
    /// Start the embedded broker, produce a synthetic catalog, index it until caught up, print a summary.
    Demo(DemoArgs),
    /// Produce events (JSONL files, the synthetic catalog or the ESCI data) to a broker.
    Produce(ProduceArgs),
    /// Print state counts, stored offsets and dead-letter counts of a state directory.
    Inspect(InspectArgs),
    /// Encode text read from stdin (one text per line) and print one JSON array per line.
    Embed(EmbedArgs),
    /// Train MERGE DocIDs (RQ-VAE + relevance losses) on the graded ESCI folder, assign unique
    /// DocIDs, store them in state and write a report.
    TrainDocids(TrainDocidsArgs),
    /// Topic administration.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
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
    fn overrides(&self) -> FlagOverrides {
        FlagOverrides { state_dir: self.state_dir.clone(), metrics_addr: self.metrics_addr, brokers: self.brokers.clone(), encoder: self.encoder }
    }
}

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Flags shared with the other indexing commands.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Exit once every assigned partition is caught up, instead of running until interrupted.
    #[arg(long)]
    pub until_caught_up: bool,
}

/// `demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Flags shared with the other indexing commands.
    #[command(flatten)]
    pub common: CommonArgs,
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

/// `embed` flags.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The encoder [default: the configured one, hashing unless set].
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderKind>,
    /// MiniLM model directory [default: encoder.model_dir, $MERGE_INDEXER_MODEL_DIR or models/all-MiniLM-L6-v2].
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Texts per encoder call [default: encoder.batch_size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Render each input line, read as a product JSON event, as product text first.
    #[arg(long)]
    pub products: bool,
    /// Accepted for symmetry with the other commands; `embed` does not touch state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `train-docids` flags.
#[derive(Debug, Args)]
pub struct TrainDocidsArgs {
    /// The graded ESCI folder (`products.jsonl`, `judgments_train.csv`) [default:
    /// $MERGE_INDEXER_ESCI_GRADED_DIR or ../shared/data/esci-graded]. Only train judgements are used.
    #[arg(long, conflicts_with = "from_state")]
    pub data: Option<PathBuf>,
    /// Train on what the indexer stored instead: every product with a vector under the
    /// configured encoder and the graded judgements in state (stop the indexer first).
    #[arg(long)]
    pub from_state: bool,
    /// State directory the DocIDs are written to [default: ./state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Loss variant.
    #[arg(long, value_enum, default_value = "merge")]
    pub variant: crate::docid::train::Variant,
    /// Epochs [default: the paper's 300].
    #[arg(long, default_value_t = 300)]
    pub epochs: usize,
    /// Anchor documents per batch [default: the paper's 2048].
    #[arg(long, default_value_t = 2048)]
    pub batch_size: usize,
    /// Encoder of the product embeddings [default: the configured one, hashing unless set].
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderKind>,
    /// Clip each parameter's gradient to this L2 norm before the AdamW step [default: none, as
    /// in the paper].
    #[arg(long)]
    pub grad_clip_norm: Option<f64>,
    /// Where the report is written as JSON.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// Where the trained model goes: rqvae.safetensors, its training config (config.json) and
    /// manifest.json (the encoder it reads) [default: `docids.model_dir`, else
    /// <state-dir>/docid-model]. `run` and `demo` assign new products DocIDs with it.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
}

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

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput against the embedded broker, next to a bare rdkafka consume loop.
    Ingest(crate::bench::IngestBenchArgs),
    /// Per-event cost of each ingest stage in isolation (decode, state write), no Kafka.
    Stages(crate::bench::StageBenchArgs),
    /// Encoder throughput (products/s) at several batch sizes.
    Encode(crate::bench::EncodeBenchArgs),
    /// Dense retrieval quality (R@10, R@100, NDCG@100) of an encoder on the graded ESCI folder.
    Retrieval(crate::bench::RetrievalBenchArgs),
    /// One MERGE training step at the PyTorch reference's shapes, optionally next to it.
    DocidStep(crate::bench::DocidStepBenchArgs),
}

/// Runs the parsed command line.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let config_file = cli.config.as_deref();
    match cli.command {
        Command::Run(arguments) => run_command(Config::load(config_file, &arguments.common.overrides())?, arguments.until_caught_up).await,
        Command::Demo(arguments) => demo_command(Config::load(config_file, &arguments.common.overrides())?, &arguments).await,
        Command::Produce(arguments) => {
            let overrides = FlagOverrides { brokers: arguments.brokers.clone(), state_dir: arguments.state_dir.clone(), ..Default::default() };
            produce_command(Config::load(config_file, &overrides)?, arguments.source).await
        }
        Command::Inspect(arguments) => {
            let overrides = FlagOverrides { state_dir: arguments.state_dir.clone(), ..Default::default() };
            inspect_command(&Config::load(config_file, &overrides)?, arguments.json)
        }
        Command::TrainDocids(arguments) => {
            let overrides = FlagOverrides { state_dir: arguments.state_dir.clone(), encoder: arguments.encoder, ..Default::default() };
            train_docids_command(Config::load(config_file, &overrides)?, &arguments)
        }
        Command::Embed(arguments) => {
            let overrides = FlagOverrides { encoder: arguments.encoder, ..Default::default() };
            embed_command(Config::load(config_file, &overrides)?, &arguments)
        }
        Command::Topics(TopicsCommand::Create(arguments)) => {
            let config = Config::load(config_file, &FlagOverrides::default())?;
            let outcomes = crate::topics::create_topics(&config.kafka, &arguments.brokers, arguments.partitions, arguments.replication_factor).await?;
            for (topic, outcome) in outcomes {
                println!("{topic}: {outcome:?}");
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Ingest(arguments)) => crate::bench::ingest_benchmark(Config::load(config_file, &FlagOverrides::default())?, &arguments).await,
        Command::Bench(BenchCommand::Encode(arguments)) => crate::bench::encode_benchmark(Config::load(config_file, &FlagOverrides::default())?, &arguments),
        Command::Bench(BenchCommand::Retrieval(arguments)) => crate::bench::retrieval_benchmark(Config::load(config_file, &FlagOverrides::default())?, &arguments),
        Command::Bench(BenchCommand::DocidStep(arguments)) => crate::bench::docid_step_benchmark(&arguments),
        Command::Bench(BenchCommand::Stages(arguments)) => crate::bench::stage_benchmark(&Config::load(config_file, &FlagOverrides::default())?, &arguments),
    }
}

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

async fn run_command(mut config: Config, until_caught_up: bool) -> anyhow::Result<()> {
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

/// Trains a DocID model on what the demo indexed and stores its DocIDs and model.
fn demo_train_docids(config: &Config, state: &StateStore, encoder: &dyn TextEncoder, epochs: usize) -> anyhow::Result<()> {
    use crate::docid::model::RqVaeConfig;
    use crate::docid::train::{DocIdTrainingConfig, TrainingSet, Variant};
    let set = TrainingSet::from_state(state, encoder.cache_id())?;
    anyhow::ensure!(!set.embeddings.is_empty(), "no product vectors to train DocIDs on");
    // Gradient clipping at norm 1: on this templated catalog the unclipped relevance gradients
    // collapse the codebooks (README "DocIDs").
    let training = DocIdTrainingConfig::new(RqVaeConfig::new(encoder.dimension())).with_epochs(epochs).with_batch_size(256).with_gradient_clip_norm(Some(1.0));
    let (queries, _validation) = crate::docid::train::split_validation(set.queries, training.validation_fraction, training.seed);
    println!("training DocIDs (MERGE, {epochs} epochs, gradients clipped at norm 1) on {} products and {} graded queries from state…", set.product_ids.len(), queries.len());
    let manifest = docid_manifest(encoder, Variant::Merge, set.embeddings.len(), epochs);
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

async fn demo_command(mut config: Config, arguments: &DemoArgs) -> anyhow::Result<()> {
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

fn embed_command(mut config: Config, arguments: &EmbedArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    if let Some(model_dir) = &arguments.model_dir {
        config.encoder.model_dir = Some(model_dir.clone());
    }
    let encoder = build_encoder(&config.encoder)?;
    let batch_size = arguments.batch_size.unwrap_or(config.encoder.batch_size).max(1);
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut pending: Vec<String> = Vec::with_capacity(batch_size);
    let flush = |pending: &mut Vec<String>, stdout: &mut std::io::BufWriter<std::io::StdoutLock<'_>>| -> anyhow::Result<()> {
        let texts: Vec<&str> = pending.iter().map(String::as_str).collect();
        for vector in encoder.encode(&texts)? {
            serde_json::to_writer(&mut *stdout, &vector)?;
            stdout.write_all(b"\n")?;
        }
        pending.clear();
        Ok(())
    };
    for (number, line) in stdin.lines().enumerate() {
        let line = line.with_context(|| format!("reading stdin line {}", number + 1))?;
        let text = if arguments.products {
            let event = crate::events::decode_product_event(None, Some(line.as_bytes()), &config.validation)
                .map_err(|invalid| anyhow::anyhow!("line {}: {}: {}", number + 1, invalid.reason, invalid.detail))?;
            match event {
                crate::events::ProductEvent::Upsert { content, .. } => crate::encoder::product_text(&content, &config.encoder.text),
                crate::events::ProductEvent::Delete { product_id } => bail!("line {}: delete of {product_id} has no text", number + 1),
            }
        } else {
            line
        };
        pending.push(text);
        if pending.len() >= batch_size {
            flush(&mut pending, &mut stdout)?;
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut stdout)?;
    }
    stdout.flush()?;
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

async fn produce_command(config: Config, source: ProduceSource) -> anyhow::Result<()> {
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

/// Reads a JSONL file into messages, one per non-blank line, unchanged. For the products
/// topic the key is the line's `product_id` when the line is JSON with one (so compaction
/// works), otherwise no key.
pub fn jsonl_messages(path: &Path, topic: &str, keyed_by_product_id: bool) -> anyhow::Result<Vec<OutgoingMessage>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let messages = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let key = keyed_by_product_id
                .then(|| serde_json::from_str::<serde_json::Value>(line).ok())
                .flatten()
                .and_then(|value| value.get("product_id").and_then(|id| id.as_str()).map(|id| id.as_bytes().to_vec()));
            OutgoingMessage { topic: topic.to_owned(), key, payload: Some(line.as_bytes().to_vec()) }
        })
        .collect();
    Ok(messages)
}

/// What `inspect` reports.
#[derive(Debug, serde::Serialize)]
pub struct InspectReport {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The Kafka cluster the state is bound to.
    pub kafka_cluster_id: Option<String>,
    /// Counters.
    pub counts: crate::state::StateCounts,
    /// Judgement pairs whose product is not stored (kept for when it arrives).
    pub judgement_pairs_without_product: i64,
    /// Judgement pairs per highest level (`E`, `S`, `C`, `I`, `none`).
    pub judgement_pairs_by_max_level: std::collections::BTreeMap<String, i64>,
    /// Next offset per `topic/partition`.
    pub stored_offsets: std::collections::BTreeMap<String, i64>,
    /// Cached vectors per encoder cache id.
    pub embeddings_by_encoder: std::collections::BTreeMap<String, u64>,
    /// Products waiting for a vector.
    pub embedding_queue: u64,
    /// Products holding a DocID.
    pub docids: u64,
    /// Products waiting for a DocID.
    pub docid_queue: u64,
}

/// Builds the `inspect` report of an open state.
pub fn inspect_report(state: &StateStore) -> anyhow::Result<InspectReport> {
    let mut by_level = std::collections::BTreeMap::new();
    state.for_each_judgement(|_, aggregate| {
        let label = aggregate.max_level.map_or("none".to_owned(), |level| level.label().to_owned());
        *by_level.entry(label).or_insert(0) += 1;
    })?;
    let (embeddings_by_encoder, embedding_queue) = state.embedding_summary()?;
    Ok(InspectReport {
        embeddings_by_encoder,
        embedding_queue,
        docids: state.docid_count()?,
        docid_queue: state.docid_queue_len()?,
        state_dir: state.path().to_owned(),
        kafka_cluster_id: state.bound_cluster_id()?,
        counts: state.counts()?,
        judgement_pairs_without_product: state.count_judgements_without_product()?,
        judgement_pairs_by_max_level: by_level,
        stored_offsets: state
            .stored_offsets()?
            .into_iter()
            .map(|((topic, partition), next)| (format!("{topic}/{partition}"), next))
            .collect(),
    })
}

fn inspect_command(config: &Config, json: bool) -> anyhow::Result<()> {
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

/// Documents and queries for `train-docids`: the graded ESCI folder, or the indexer's state.
struct DocIdTrainingData {
    product_ids: Vec<String>,
    embeddings: Vec<Vec<f32>>,
    /// Training queries (the validation split is carved from them).
    queries: Vec<crate::docid::train::TrainingQuery>,
    /// Held-out test queries, read only after training for the Table-3 statistic.
    test_queries: Vec<crate::docid::train::TrainingQuery>,
}

/// Reads the graded ESCI folder and encodes its products with `encoder`.
fn esci_training_data(config: &Config, arguments: &TrainDocidsArgs, encoder: &dyn TextEncoder) -> anyhow::Result<DocIdTrainingData> {
    use crate::docid::train::TrainingQuery;
    let directory = arguments.data.clone().unwrap_or_else(crate::datasets::default_esci_graded_dir);
    let data = crate::datasets::EsciGraded::load(&directory).with_context(|| format!("reading the graded ESCI folder {}", directory.display()))?;
    println!("encoding {} products with {}", data.products.len(), encoder.cache_id());
    let texts: Vec<String> = data.products.iter().map(|product| crate::encoder::product_text(&product.content(), &config.encoder.text)).collect();
    let embeddings = crate::encoder::encode_in_batches(encoder, &texts, config.encoder.batch_size.max(1) * 4)?;
    let index_of: std::collections::HashMap<&str, usize> = data.products.iter().enumerate().map(|(index, product)| (product.product_id.as_str(), index)).collect();
    // One TrainingQuery per query text: its judged products grouped by level.
    let graded_queries = |judgements: &[crate::datasets::GradedJudgement]| -> Vec<TrainingQuery> {
        TrainingQuery::group_by_query(judgements.iter().filter_map(|judgement| {
            Some((judgement.query.as_str(), judgement.level()?.index(), *index_of.get(judgement.product_id.as_str())?))
        }))
    };
    Ok(DocIdTrainingData {
        product_ids: data.products.iter().map(|product| crate::datasets::esci_product_id(&product.locale, &product.product_id)).collect(),
        embeddings,
        queries: graded_queries(&data.train),
        test_queries: graded_queries(&data.test),
    })
}

/// A progress bar over `epochs` on a terminal; one line per epoch elsewhere (CI, logs).
fn epoch_progress(epochs: usize) -> (indicatif::ProgressBar, impl FnMut(usize, &crate::docid::train::LossTerms)) {
    let progress = indicatif::ProgressBar::new(epochs as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {pos}/{len} (eta {eta}) {msg}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    let bar = progress.clone();
    let on_epoch = move |epoch: usize, terms: &crate::docid::train::LossTerms| {
        let line = format!(
            "total {:.4}  recon {:.4}  rq {:.4}  align {:.4}  rel {:.4}",
            terms.total, terms.reconstruction, terms.rq, terms.align, terms.relevance
        );
        bar.inc(1);
        if bar.is_hidden() {
            eprintln!("epoch {:>4}: {line}", epoch + 1);
        } else {
            bar.set_message(line);
        }
    };
    (progress, on_epoch)
}

/// The manifest of a model trained now on `documents` vectors of `encoder`.
fn docid_manifest(encoder: &dyn TextEncoder, variant: crate::docid::train::Variant, documents: usize, epochs: usize) -> crate::docid::incremental::DocIdModelManifest {
    crate::docid::incremental::DocIdModelManifest {
        format_version: crate::docid::incremental::MANIFEST_FORMAT_VERSION,
        encoder_cache_id: encoder.cache_id().to_owned(),
        encoder_model: encoder.model_name().to_owned(),
        embedding_dimension: encoder.dimension(),
        variant,
        trained_documents: documents,
        epochs,
        created_unix_seconds: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0),
    }
}

fn train_docids_command(config: Config, arguments: &TrainDocidsArgs) -> anyhow::Result<()> {
    use crate::docid::model::RqVaeConfig;
    use crate::docid::train::DocIdTrainingConfig;
    let encoder = build_encoder(&config.encoder)?;
    let state = StateStore::open(&config.state_dir, &config.state)
        .with_context(|| format!("opening the state in {} (a running indexer holds it: stop it first)", config.state_dir.display()))?;
    let data = if arguments.from_state {
        let set = crate::docid::train::TrainingSet::from_state(&state, encoder.cache_id())?;
        println!(
            "read {} products with {} vectors and {} graded queries from {} ({} products without a vector yet are left out)",
            set.product_ids.len(),
            encoder.cache_id(),
            set.queries.len(),
            config.state_dir.display(),
            set.products_without_vector
        );
        DocIdTrainingData { product_ids: set.product_ids, embeddings: set.embeddings, queries: set.queries, test_queries: Vec::new() }
    } else {
        esci_training_data(&config, arguments, encoder.as_ref())?
    };
    anyhow::ensure!(!data.embeddings.is_empty(), "no products with vectors to train on");
    let model = RqVaeConfig::new(encoder.dimension());
    let training = DocIdTrainingConfig::new(model)
        .with_variant(arguments.variant)
        .with_epochs(arguments.epochs)
        .with_batch_size(arguments.batch_size)
        .with_gradient_clip_norm(arguments.grad_clip_norm);
    let (queries, validation_queries) = crate::docid::train::split_validation(data.queries, training.validation_fraction, training.seed);
    println!(
        "training {:?} on {} products, {} train queries ({} more held out for validation), {} epochs",
        arguments.variant,
        data.embeddings.len(),
        queries.len(),
        validation_queries.len(),
        arguments.epochs
    );
    let model_dir = arguments.model_dir.clone().unwrap_or_else(|| config.docid_model_dir());
    let manifest = docid_manifest(encoder.as_ref(), arguments.variant, data.embeddings.len(), arguments.epochs);
    let (progress, on_epoch) = epoch_progress(arguments.epochs);
    let (docids, report) =
        crate::docid::incremental::train_and_store(&state, &data.product_ids, &data.embeddings, &queries, &training, &manifest, &model_dir, on_epoch)?;
    progress.finish();
    let levels = report.unique_tokens_per_layer.len();
    let unique_tokens_test = crate::docid::train::unique_tokens_per_layer(&docids, &data.test_queries, levels);
    let unique_tokens_validation = crate::docid::train::unique_tokens_per_layer(&docids, &validation_queries, levels);
    let mut report_value = serde_json::to_value(&report)?;
    report_value["unique_tokens_per_layer_test"] = serde_json::json!(unique_tokens_test);
    report_value["unique_tokens_per_layer_validation"] = serde_json::json!(unique_tokens_validation);
    report_value["validation_queries"] = serde_json::json!(validation_queries.len());
    report_value["train_queries"] = serde_json::json!(queries.len());
    report_value["test_queries"] = serde_json::json!(data.test_queries.len());
    report_value["encoder"] = serde_json::json!(encoder.cache_id());
    report_value["source"] = serde_json::json!(if arguments.from_state { "state" } else { "esci-graded" });
    let report_json = serde_json::to_string_pretty(&report_value)?;
    if let Some(path) = &arguments.report_json {
        std::fs::write(path, &report_json)?;
    }
    println!(
        "DocIDs: {} products, collisions before {} after {} (moved within prefix {}, up {}); utilisation per level {:?}; unique tokens per layer (Table 3) train {:?} validation {:?} test {:?}; {:.3} s/step",
        docids.len(),
        report.collisions_before,
        report.collisions_after,
        report.assignment.reassigned_in_prefix,
        report.assignment.moved_up,
        report.utilisation_per_level.iter().map(|value| format!("{value:.3}")).collect::<Vec<_>>(),
        report.unique_tokens_per_layer.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
        unique_tokens_validation.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
        unique_tokens_test.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
        report.seconds_per_step
    );
    println!("stored in {}; model, config and manifest in {}", config.state_dir.display(), model_dir.display());
    Ok(())
}
