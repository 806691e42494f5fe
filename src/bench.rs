//! `merge-indexer bench ingest`: end-to-end ingest throughput (consume → validate → one
//! RocksDB WriteBatch with offsets per micro-batch) against the embedded broker, and in the
//! same run a bare rdkafka consume loop that does nothing with the messages — the physical
//! limit of this machine and client. Throughput targets are checked here, never in tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::events::{decode_product_event, decode_query_event};
use crate::kafka::{produce_all, reliable_producer, EmbeddedBroker};
use crate::source::{consumer_client_config, Indexer, RunOptions};
use crate::state::{DecodedRecord, PreparedBatch, SourcePosition, SourcedRecord, StateStore};
use crate::synth::{SyntheticCatalog, SyntheticCatalogSpec};

/// `bench ingest` flags.
#[derive(Debug, Args, Clone)]
pub struct IngestBenchArgs {
    /// Events to produce and consume (synthetic catalog: ~1 product event per 6 query events).
    /// The default is large enough for the state write to reach its steady cost: the writer's
    /// CPU per event about doubles between 100,000 and 1,000,000 events, as RocksDB's memtables
    /// fill (README "Benchmark").
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Measurement rounds; each runs the bare loop and the indexer once, on fresh consumer groups.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// fsync the RocksDB WAL on every batch (default: not; see README "Durability").
    #[arg(long)]
    pub sync_writes: bool,
    /// Partitions per topic on the embedded broker (default: one per 25,000 events, at least 8).
    /// librdkafka's mock broker keeps at most 5 MiB or 100,000 messages per partition and drops
    /// the oldest beyond that, so large runs need enough partitions.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Where the benchmark's state directories go (default: a temporary directory).
    #[arg(long)]
    pub work_dir: Option<std::path::PathBuf>,
}

/// One round's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct IngestRound {
    /// Bare consume loop, events per second.
    pub bare_consume_events_per_second: f64,
    /// Indexer, events per second.
    pub ingest_events_per_second: f64,
    /// `ingest / bare`.
    pub ratio: f64,
    /// CPU time of the whole process (embedded broker included) per event in the bare loop,
    /// in microseconds: steadier than the rates on a shared machine, so it shows what a change
    /// costs or saves.
    pub bare_consume_cpu_microseconds_per_event: f64,
    /// The same for the indexer.
    pub ingest_cpu_microseconds_per_event: f64,
    /// CPU time of the indexer's `batch-preparer` thread per event, in nanoseconds.
    pub prepare_thread_cpu_nanoseconds_per_event: f64,
    /// CPU time of the indexer's `state-writer` thread per event, in nanoseconds: the pipeline's
    /// serial stage, and the steadiest figure of what a change to the state write costs.
    pub write_thread_cpu_nanoseconds_per_event: f64,
    /// Seconds RocksDB held the indexer's writes back (write stalls and slowdowns) in the round:
    /// a slow round with a normal writer CPU per event and a stall here was throttled by RocksDB.
    pub rocksdb_write_stall_seconds: f64,
    /// Seconds to flush what the run left in memtables, timed after it. A running indexer flushes
    /// every write once, in the background as memtables fill; a run of this size ends with most
    /// of its writes still unflushed, a cost the ingest rate does not include.
    pub flush_after_seconds: f64,
    /// Process CPU time of that flush per event, in microseconds.
    pub flush_after_cpu_microseconds_per_event: f64,
    /// Events per second counting that flush: `events / (active seconds + flush seconds)`.
    pub ingest_with_flush_events_per_second: f64,
}

/// Partitions per topic that keep `events` within the mock broker's per-partition retention
/// (5 MiB: ~35,000 query events of the synthetic catalog), with room to spare.
fn default_partitions(events: usize) -> i32 {
    events.div_ceil(EVENTS_PER_PARTITION).max(8).min(i32::MAX as usize) as i32
}

/// Events per partition [`default_partitions`] aims for.
const EVENTS_PER_PARTITION: usize = 25_000;

/// Runs `measure` and returns its result with the process CPU time it took per event, in µs.
async fn with_cpu_per_event<T>(events: usize, measure: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<(T, f64)> {
    let before = crate::metrics::process_cpu_time();
    let result = measure.await?;
    let cpu = crate::metrics::process_cpu_time().saturating_sub(before);
    Ok((result, cpu.as_secs_f64() * 1e6 / events.max(1) as f64))
}

/// Runs the benchmark and prints a table and one JSON line.
pub async fn ingest_benchmark(mut config: Config, arguments: &IngestBenchArgs) -> anyhow::Result<()> {
    crate::metrics::install_recorder_without_listener()?;
    config.state.sync_writes = arguments.sync_writes;
    config.kafka.embedded_partitions = arguments.partitions.unwrap_or_else(|| default_partitions(arguments.events));
    let broker = EmbeddedBroker::start_for(&config)?;
    let bootstrap = broker.bootstrap_servers().to_owned();
    let topics = config.kafka.topics.clone();
    let products = (arguments.events / 7).max(1);
    let queries = (arguments.events / 9).max(1);
    let spec = SyntheticCatalogSpec { products, queries, judgements_per_query: 4, seed: 7, churn_fraction: 0.0 };
    let mut messages = SyntheticCatalog::generate(&spec).messages(&topics.products, &topics.query_events);
    messages.truncate(arguments.events);
    let events = messages.len();
    let producer = reliable_producer(&config.kafka, &bootstrap)?;
    let started = Instant::now();
    produce_all(&producer, &messages).await?;
    println!("produced {events} events in {:.2} s to {bootstrap}", started.elapsed().as_secs_f64());
    drop(messages);

    let work_dir = match &arguments.work_dir {
        Some(directory) => tempfile::Builder::new().prefix("bench-ingest-").tempdir_in(directory)?,
        None => tempfile::Builder::new().prefix("merge-indexer-bench-").tempdir()?,
    };
    let mut rounds = Vec::new();
    for round in 0..arguments.rounds.max(1) {
        let (bare_rate, bare_cpu) =
            with_cpu_per_event(events, bare_consume_rate(&config, &bootstrap, &format!("bench-bare-{round}"), events)).await?;
        let mut indexer_config = config.clone();
        indexer_config.kafka.group_id = format!("bench-indexer-{round}");
        indexer_config.state_dir = work_dir.path().join(format!("state-{round}"));
        let ((ingest, write_stall_seconds, state), ingest_cpu) = with_cpu_per_event(events, indexer_run(indexer_config, &bootstrap, events)).await?;
        let ingest_rate = ingest.records() as f64 / ingest.active_seconds.max(1e-9);
        let flush_started = Instant::now();
        let (flush_after_seconds, flush_cpu) = with_cpu_per_event(events, async {
            state.flush_memtables()?;
            Ok(flush_started.elapsed().as_secs_f64())
        })
        .await?;
        drop(state);
        let per_event_nanoseconds = |seconds: f64| seconds * 1e9 / events.max(1) as f64;
        let result = IngestRound {
            bare_consume_events_per_second: bare_rate,
            ingest_events_per_second: ingest_rate,
            ratio: ingest_rate / bare_rate,
            bare_consume_cpu_microseconds_per_event: bare_cpu,
            ingest_cpu_microseconds_per_event: ingest_cpu,
            prepare_thread_cpu_nanoseconds_per_event: per_event_nanoseconds(ingest.prepare_cpu_seconds),
            write_thread_cpu_nanoseconds_per_event: per_event_nanoseconds(ingest.write_cpu_seconds),
            rocksdb_write_stall_seconds: write_stall_seconds,
            flush_after_seconds,
            flush_after_cpu_microseconds_per_event: flush_cpu,
            ingest_with_flush_events_per_second: ingest.records() as f64 / (ingest.active_seconds + flush_after_seconds).max(1e-9),
        };
        println!(
            "round {round}: bare consume {:>10.0} events/s | ingest {:>10.0} events/s | ratio {:.2} | CPU per event: bare {:.2} µs, ingest {:.2} µs (preparer {:.0} ns, writer {:.0} ns) | RocksDB write stall {:.2} s | flush after: {:.2} s, {:.2} µs CPU per event; with it {:.0} events/s",
            result.bare_consume_events_per_second,
            result.ingest_events_per_second,
            result.ratio,
            bare_cpu,
            ingest_cpu,
            result.prepare_thread_cpu_nanoseconds_per_event,
            result.write_thread_cpu_nanoseconds_per_event,
            result.rocksdb_write_stall_seconds,
            result.flush_after_seconds,
            result.flush_after_cpu_microseconds_per_event,
            result.ingest_with_flush_events_per_second,
        );
        rounds.push(result);
    }
    let best_bare = rounds.iter().map(|round| round.bare_consume_events_per_second).fold(0.0, f64::max);
    let best_ingest = rounds.iter().map(|round| round.ingest_events_per_second).fold(0.0, f64::max);
    let median_ratio = median(rounds.iter().map(|round| round.ratio).collect());
    println!(
        "best: bare consume {best_bare:.0} events/s, ingest {best_ingest:.0} events/s, ratio {:.2}; median ratio of rounds {median_ratio:.2} (target >= 0.50); {events} events, {} partitions, sync_writes={}",
        best_ingest / best_bare,
        config.kafka.embedded_partitions,
        arguments.sync_writes
    );
    println!(
        "{}",
        serde_json::json!({
            "events": events, "sync_writes": arguments.sync_writes, "batch_max_events": config.batch.max_events,
            "rounds": rounds, "best_bare_events_per_second": best_bare, "best_ingest_events_per_second": best_ingest,
            "best_ratio": best_ingest / best_bare, "median_ratio": median_ratio,
            "partitions": config.kafka.embedded_partitions,
        })
    );
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count); 0 when empty.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        return values[middle];
    }
    (values[middle - 1] + values[middle]) / 2.0
}

/// A consumer-group member with the indexer's consumer settings that only counts messages.
/// Timed from the first message to the `events`-th, like the indexer.
async fn bare_consume_rate(config: &Config, bootstrap: &str, group_id: &str, events: usize) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = consumer_client_config(&config.kafka, bootstrap, group_id)?.create().context("creating bare consumer")?;
    consumer.subscribe(&[config.kafka.topics.products.as_str(), config.kafka.topics.query_events.as_str()])?;
    let mut received = 0usize;
    let mut payload_bytes = 0usize;
    let mut first = None;
    while received < events {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .with_context(|| format!("bare consumer stalled for 60 s after {received} of {events} events"))??;
        first.get_or_insert_with(Instant::now);
        payload_bytes += message.payload().map_or(0, <[u8]>::len);
        received += 1;
    }
    let seconds = first.map_or(0.0, |first| first.elapsed().as_secs_f64());
    tracing::debug!(received, payload_bytes, seconds, "bare consume done");
    Ok(received as f64 / seconds.max(1e-9))
}

/// Runs the indexer until it has caught up with the `events` produced. Returns its summary
/// (the active time, the rate's denominator, and the pipeline threads' CPU time), the seconds
/// RocksDB held its writes back, and the state, still open.
async fn indexer_run(config: Config, bootstrap: &str, events: usize) -> anyhow::Result<(crate::source::RunSummary, f64, Arc<StateStore>)> {
    let state = Arc::new(StateStore::open(&config.state_dir, &config.state)?);
    let indexer = Indexer::connect(Arc::new(config), state, bootstrap)?;
    let (_keep_open, shutdown) = watch::channel(false);
    let summary = indexer.run(shutdown, RunOptions { stop_when_caught_up: true, max_batches: None }).await?;
    anyhow::ensure!(
        summary.records() as usize == events,
        "indexer consumed {} records, expected {events}",
        summary.records()
    );
    let write_stall_seconds = indexer.state().cumulative_write_stall_seconds()?;
    let state = Arc::clone(indexer.state());
    drop(indexer);
    Ok((summary, write_stall_seconds, state))
}

/// `bench stages` flags.
#[derive(Debug, Args, Clone)]
pub struct StageBenchArgs {
    /// Products in the synthetic catalog.
    #[arg(long, default_value_t = 15_000)]
    pub products: usize,
    /// Queries in the synthetic catalog (~9 query events each).
    #[arg(long, default_value_t = 10_000)]
    pub queries: usize,
}

/// Passes over the catalog for the stages [`stage_benchmark`] can repeat (decoding, preparing).
const STAGE_PASSES: usize = 5;

/// Runs `pass` `passes` times and returns the last pass's output with the fastest pass's time.
/// Each pass's output is dropped before the next pass starts, so later passes reuse the memory
/// the first one faulted in (a running indexer has long paid for those page faults).
fn fastest_of_passes<T>(passes: usize, mut pass: impl FnMut() -> anyhow::Result<(T, Duration)>) -> anyhow::Result<(T, Duration)> {
    debug_assert!(passes >= 1, "at least one pass");
    let (mut output, mut fastest) = pass()?;
    for _ in 1..passes {
        drop(output);
        let (next, took) = pass()?;
        (output, fastest) = (next, fastest.min(took));
    }
    Ok((output, fastest))
}

/// Times each ingest stage in isolation on the synthetic catalog, so a change to one stage can
/// be measured without Kafka: decode + validate per topic, then per topic in batches of
/// `batch.max_events` into a fresh state directory the writer side's two stages,
/// [`PreparedBatch::prepare`] and [`StateStore::apply_prepared`].
pub fn stage_benchmark(config: &Config, arguments: &StageBenchArgs) -> anyhow::Result<()> {
    let spec = SyntheticCatalogSpec { products: arguments.products, queries: arguments.queries, judgements_per_query: 4, seed: 7, churn_fraction: 0.0 };
    let catalog = SyntheticCatalog::generate(&spec);
    let limits = &config.validation;
    let per_event = |total: Duration, events: usize| total.as_nanos() as f64 / events.max(1) as f64;

    // Decoding is timed over several passes and the fastest kept: the first pass also pays for
    // page faults on fresh allocator pages, which a running indexer has long paid.
    let (products, decode_product_time) = fastest_of_passes(STAGE_PASSES, || {
        let started = Instant::now();
        let products = catalog
            .product_events
            .iter()
            .map(|(product_id, payload)| decode_product_event(Some(product_id.as_bytes()), payload.as_deref(), limits))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((products, started.elapsed()))
    })?;
    let decode_product_ns = per_event(decode_product_time, products.len());
    let (queries, decode_query_time) = fastest_of_passes(STAGE_PASSES, || {
        let started = Instant::now();
        let queries = catalog.query_events.iter().map(|(_, payload)| decode_query_event(Some(payload), limits)).collect::<Result<Vec<_>, _>>()?;
        Ok((queries, started.elapsed()))
    })?;
    let decode_query_ns = per_event(decode_query_time, queries.len());

    let work_dir = tempfile::Builder::new().prefix("merge-indexer-stages-").tempdir()?;
    let state = StateStore::open(work_dir.path(), &config.state)?;
    let as_records = |topic: &str, records: Vec<DecodedRecord>| -> Vec<SourcedRecord> {
        records
            .into_iter()
            .enumerate()
            .map(|(index, record)| SourcedRecord {
                position: SourcePosition { topic: topic.into(), partition: (index % 8) as i32, offset: (index / 8) as i64 },
                record,
            })
            .collect()
    };
    let product_records = as_records(&config.kafka.topics.products, products.into_iter().map(DecodedRecord::Product).collect());
    let query_records = as_records(&config.kafka.topics.query_events, queries.into_iter().map(DecodedRecord::Query).collect());
    let batch_size = config.batch.max_events.max(1);
    // Prepare (the `batch-preparer` thread's stage) and apply (the `state-writer` thread's),
    // timed apart; copying each batch out of the catalog is in neither. Preparing has no side
    // effect, so it is timed over several passes (the fastest kept, as for decoding); applying
    // changes the state, so the last pass is applied, once.
    let prepare_and_apply = |records: &[SourcedRecord]| -> anyhow::Result<(f64, f64)> {
        let ((), preparing) = fastest_of_passes(STAGE_PASSES - 1, || {
            let mut pass = Duration::ZERO;
            for batch in records.chunks(batch_size) {
                let batch = batch.to_vec();
                let started = Instant::now();
                let prepared = PreparedBatch::prepare(batch);
                pass += started.elapsed();
                drop(prepared);
            }
            Ok(((), pass))
        })?;
        let (mut last_pass, mut applying) = (Duration::ZERO, Duration::ZERO);
        for batch in records.chunks(batch_size) {
            let batch = batch.to_vec();
            let started = Instant::now();
            let prepared = PreparedBatch::prepare(batch);
            let prepared_at = Instant::now();
            state.apply_prepared(&prepared, &config.relevance)?;
            applying += prepared_at.elapsed();
            last_pass += prepared_at - started;
        }
        Ok((per_event(preparing.min(last_pass), records.len()), per_event(applying, records.len())))
    };
    // Every write is flushed to an SST file once, in the background, when its memtable fills;
    // timing a flush right after each topic's writes charges that deferred cost to them (it
    // depends on the memtable kind: a hash memtable is sorted at flush time).
    let flush = |records: &[SourcedRecord]| -> anyhow::Result<f64> {
        let started = Instant::now();
        state.flush_memtables()?;
        Ok(per_event(started.elapsed(), records.len()))
    };
    let (prepare_product_ns, apply_product_ns) = prepare_and_apply(&product_records)?;
    let flush_product_ns = flush(&product_records)?;
    let (prepare_query_ns, apply_query_ns) = prepare_and_apply(&query_records)?;
    let flush_query_ns = flush(&query_records)?;
    println!("decode+validate product: {decode_product_ns:>8.0} ns/event ({} events)", product_records.len());
    println!("decode+validate query:   {decode_query_ns:>8.0} ns/event ({} events)", query_records.len());
    println!("prepare product:         {prepare_product_ns:>8.0} ns/event (batches of {batch_size})");
    println!("prepare query:           {prepare_query_ns:>8.0} ns/event");
    println!("apply product:           {apply_product_ns:>8.0} ns/event");
    println!("apply query:             {apply_query_ns:>8.0} ns/event");
    println!("flush after products:    {flush_product_ns:>8.0} ns/event");
    println!("flush after queries:     {flush_query_ns:>8.0} ns/event");
    println!(
        "{}",
        serde_json::json!({
            "decode_product_ns": decode_product_ns, "decode_query_ns": decode_query_ns,
            "prepare_product_ns": prepare_product_ns, "prepare_query_ns": prepare_query_ns,
            "apply_product_ns": apply_product_ns, "apply_query_ns": apply_query_ns,
            "flush_product_ns": flush_product_ns, "flush_query_ns": flush_query_ns,
            "products": product_records.len(), "query_events": query_records.len(), "batch_max_events": batch_size,
        })
    );
    Ok(())
}

/// `bench encode` flags.
#[derive(Debug, Args, Clone)]
pub struct EncodeBenchArgs {
    /// Encoder to time [default: the configured one].
    #[arg(long, value_enum)]
    pub encoder: Option<crate::encoder::EncoderKind>,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    pub batch_sizes: Vec<usize>,
    /// Products to encode per batch size (real ESCI products when the graded folder is present,
    /// else the synthetic catalog).
    #[arg(long, default_value_t = 512)]
    pub products: usize,
}

/// One batch size's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct EncodeRound {
    /// Texts per encoder call.
    pub batch_size: usize,
    /// Products encoded.
    pub products: usize,
    /// Products per second.
    pub products_per_second: f64,
}

/// Product texts for encoder benchmarks and the retrieval check: the graded ESCI products
/// (title + description) when present, else synthetic products.
fn benchmark_product_texts(config: &Config, limit: usize) -> anyhow::Result<(Vec<String>, &'static str)> {
    let directory = crate::datasets::default_esci_graded_dir();
    if directory.join("products.jsonl").is_file() {
        let data = crate::datasets::EsciGraded::load(&directory)?;
        let texts = data.products.iter().take(limit).map(|product| crate::encoder::product_text(&product.content(), &config.encoder.text)).collect();
        return Ok((texts, "ESCI graded products (title + description)"));
    }
    eprintln!("graded ESCI data not found in {}; timing synthetic products instead", directory.display());
    let spec = SyntheticCatalogSpec { products: limit, queries: 1, judgements_per_query: 1, seed: 7, churn_fraction: 0.0 };
    let catalog = SyntheticCatalog::generate(&spec);
    let texts = catalog.products.values().map(|product| crate::encoder::product_text(&product.content, &config.encoder.text)).collect();
    Ok((texts, "synthetic products"))
}

/// Times the encoder on product texts at each batch size (after one warm-up batch) and prints
/// a table and one JSON line.
pub fn encode_benchmark(mut config: Config, arguments: &EncodeBenchArgs) -> anyhow::Result<()> {
    if let Some(kind) = arguments.encoder {
        config.encoder.kind = kind;
    }
    let encoder = crate::encoder::build_encoder(&config.encoder)?;
    let (texts, source) = benchmark_product_texts(&config, arguments.products)?;
    let mut rounds = Vec::new();
    for &batch_size in &arguments.batch_sizes {
        let batch_size = batch_size.max(1);
        let warm_up: Vec<&str> = texts.iter().take(batch_size).map(String::as_str).collect();
        encoder.encode(&warm_up)?;
        let started = Instant::now();
        for chunk in texts.chunks(batch_size) {
            let borrowed: Vec<&str> = chunk.iter().map(String::as_str).collect();
            encoder.encode(&borrowed)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let round = EncodeRound { batch_size, products: texts.len(), products_per_second: texts.len() as f64 / seconds.max(1e-9) };
        println!("{} batch {:>4}: {:>9.1} products/s ({} {source})", encoder.model_name(), batch_size, round.products_per_second, texts.len());
        rounds.push(round);
    }
    println!(
        "{}",
        serde_json::json!({ "encoder": encoder.cache_id(), "backend": crate::BACKEND_NAME, "source": source, "rounds": rounds })
    );
    Ok(())
}

/// `bench retrieval` flags.
#[derive(Debug, Args, Clone)]
pub struct RetrievalBenchArgs {
    /// Encoder to evaluate [default: the configured one].
    #[arg(long, value_enum)]
    pub encoder: Option<crate::encoder::EncoderKind>,
    /// Texts per encoder call.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

/// Metrics of one split of judged queries.
#[derive(Debug, Clone, Serialize)]
pub struct SplitMetrics {
    /// `test`, `train` or `all`.
    pub split: &'static str,
    /// The averages.
    pub metrics: crate::retrieval_metrics::RetrievalMetrics,
}

/// Dense retrieval quality of an encoder on the graded ESCI folder: every product (title +
/// description) and every judged query are encoded once; each query ranks all products by
/// exact cosine; recall@10/100 and NDCG@100 are averaged over the queries of the test split,
/// the train split and both. Relevant = E, S or C; NDCG gains E=3, S=2, C=1, I=0. Prints a
/// table and one JSON line.
pub fn retrieval_benchmark(mut config: Config, arguments: &RetrievalBenchArgs) -> anyhow::Result<()> {
    use std::collections::{BTreeMap, HashMap};
    if let Some(kind) = arguments.encoder {
        config.encoder.kind = kind;
    }
    let directory = crate::datasets::default_esci_graded_dir();
    anyhow::ensure!(
        directory.join("products.jsonl").is_file(),
        "graded ESCI data not found in {} (set {})",
        directory.display(),
        crate::datasets::ESCI_GRADED_DIR_ENV
    );
    let data = crate::datasets::EsciGraded::load(&directory)?;
    let encoder = crate::encoder::build_encoder(&config.encoder)?;
    let started = Instant::now();
    let product_texts: Vec<String> = data.products.iter().map(|product| crate::encoder::product_text(&product.content(), &config.encoder.text)).collect();
    let product_vectors = crate::encoder::encode_in_batches(encoder.as_ref(), &product_texts, arguments.batch_size)?;
    let encode_seconds = started.elapsed().as_secs_f64();
    let product_ids: Vec<&str> = data.products.iter().map(|product| product.product_id.as_str()).collect();
    let gain_of = |judgement: &crate::datasets::GradedJudgement| match judgement.level() {
        Some(crate::events::RelevanceLevel::Exact) => 3.0,
        Some(crate::events::RelevanceLevel::Substitute) => 2.0,
        Some(crate::events::RelevanceLevel::Complement) => 1.0,
        _ => 0.0,
    };
    let mut results = Vec::new();
    for (split, judgements) in [("test", data.test.iter().collect::<Vec<_>>()), ("train", data.train.iter().collect()), ("all", data.train.iter().chain(&data.test).collect())] {
        let mut graded: BTreeMap<&str, HashMap<&str, f64>> = BTreeMap::new();
        for judgement in judgements {
            graded.entry(judgement.query.as_str()).or_default().insert(judgement.product_id.as_str(), gain_of(judgement));
        }
        let queries: Vec<&str> = graded.keys().copied().collect();
        let query_texts: Vec<String> = queries.iter().map(|query| query.to_string()).collect();
        let query_vectors = crate::encoder::encode_in_batches(encoder.as_ref(), &query_texts, arguments.batch_size)?;
        let metrics = crate::retrieval_metrics::evaluate_dense(&query_vectors, &product_vectors, &product_ids, &queries, &graded);
        println!(
            "{} on ESCI graded, {split:>5} split ({:>3} queries, {} products): R@10 {:.4}  R@100 {:.4}  NDCG@100 {:.4}",
            encoder.model_name(),
            metrics.queries,
            product_ids.len(),
            metrics.recall_at_10,
            metrics.recall_at_100,
            metrics.ndcg_at_100
        );
        results.push(SplitMetrics { split, metrics });
    }
    println!("products encoded in {encode_seconds:.1} s ({:.1} products/s)", product_ids.len() as f64 / encode_seconds.max(1e-9));
    println!(
        "{}",
        serde_json::json!({ "encoder": encoder.cache_id(), "backend": crate::BACKEND_NAME, "products": product_ids.len(), "splits": results, "encode_seconds": encode_seconds })
    );
    Ok(())
}

/// `bench docid-step` flags.
#[derive(Debug, Args, Clone)]
pub struct DocidStepBenchArgs {
    /// Anchors per batch (rows = 4 × anchors), as `merge_step_torch.py --batch`.
    #[arg(long, default_value_t = 2048)]
    pub anchors: usize,
    /// Input embedding width, as `--dim`.
    #[arg(long, default_value_t = 384)]
    pub dim: usize,
    /// Untimed warm-up steps (on the GPU: ≥ 100, kernels compile during the first ones).
    #[arg(long, default_value_t = 3)]
    pub warm_up: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Also run the PyTorch reference step (this path to `merge_step_torch.py`) in the same run.
    #[arg(long)]
    pub torch_reference: Option<std::path::PathBuf>,
    /// Python interpreter (with torch) for the reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// Times our MERGE training step at `merge_step_torch.py`'s shapes and, when asked, runs the
/// PyTorch reference on the same machine right after; prints both and their ratio.
pub fn docid_step_benchmark(arguments: &DocidStepBenchArgs) -> anyhow::Result<()> {
    use crate::docid::model::RqVaeConfig;
    use crate::docid::train::{time_steps, DocIdTrainingConfig};
    let config = DocIdTrainingConfig::new(RqVaeConfig::new(arguments.dim));
    let device = burn::tensor::Device::<crate::encoder::InferenceBackend>::default();
    let mut timings = time_steps::<burn::backend::Autodiff<crate::encoder::InferenceBackend>>(&config, arguments.anchors, arguments.warm_up, arguments.steps.max(1), &device);
    timings.sort_by(f64::total_cmp);
    let median_ms = timings[timings.len() / 2] * 1e3;
    println!(
        "burn merge_step batch={} rows={} dim={} backend={}: {median_ms:.3} ms/step (median of {})",
        arguments.anchors,
        4 * arguments.anchors,
        arguments.dim,
        crate::BACKEND_NAME,
        timings.len()
    );
    let mut torch_ms = None;
    if let Some(script) = &arguments.torch_reference {
        let device_flag = if crate::BACKEND_NAME == "cuda" { "cuda" } else { "cpu" };
        let output = std::process::Command::new(&arguments.python)
            .arg(script)
            .args(["--device", device_flag, "--dim", &arguments.dim.to_string(), "--batch", &arguments.anchors.to_string()])
            .args(["--steps", &(arguments.warm_up + arguments.steps.max(1)).to_string()])
            .output()
            .with_context(|| format!("running {} {}", arguments.python, script.display()))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        anyhow::ensure!(output.status.success(), "reference failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
        print!("{text}");
        torch_ms = text.split("ms/step").next().and_then(|head| head.rsplit(' ').nth(1)).and_then(|number| number.parse::<f64>().ok());
        if let Some(torch_ms) = torch_ms {
            println!("ratio burn / torch: {:.2}", median_ms / torch_ms);
        }
    }
    println!("{}", serde_json::json!({ "burn_ms_per_step": median_ms, "torch_ms_per_step": torch_ms, "anchors": arguments.anchors, "dim": arguments.dim, "backend": crate::BACKEND_NAME }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_partitions_keep_each_partition_within_the_mock_brokers_retention() {
        assert_eq!(default_partitions(100_000), 8, "small runs keep the embedded default");
        assert_eq!(default_partitions(1_000_000), 40);
        for events in [1, 199_999, 200_001, 1_000_001, 3_000_000] {
            let partitions = default_partitions(events) as usize;
            assert!(events.div_ceil(partitions) <= EVENTS_PER_PARTITION, "{events} events over {partitions} partitions");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![0.9, 0.1, 0.5]), 0.5);
        assert!((median(vec![0.4, 0.1, 0.6, 0.2]) - 0.3).abs() < 1e-12);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
