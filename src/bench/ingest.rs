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

use merge_indexer::config::Config;
use merge_indexer::kafka::{produce_all, reliable_producer, EmbeddedBroker};
use merge_indexer::ingest::{consumer_client_config, Indexer, RunOptions};
use merge_indexer::state::StateStore;
use merge_indexer::synth::{SyntheticCatalog, SyntheticCatalogSpec};

/// `bench ingest` flags.
#[derive(Debug, Args, Clone)]
pub struct IngestBenchArgs {
    /// Events to produce and consume (synthetic catalog: ~1 product event per 6 query events).
    /// The default is large enough for the state write to reach its steady cost: the writer's
    /// CPU per event about doubles between 100,000 and 1,000,000 events, as RocksDB's memtables
    /// fill (docs/benchmarks.md "Ingest").
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
    let before = merge_indexer::metrics::process_cpu_time();
    let result = measure.await?;
    let cpu = merge_indexer::metrics::process_cpu_time().saturating_sub(before);
    Ok((result, cpu.as_secs_f64() * 1e6 / events.max(1) as f64))
}

/// Runs the benchmark and prints a table and one JSON line.
pub async fn ingest_benchmark(mut config: Config, arguments: &IngestBenchArgs) -> anyhow::Result<()> {
    merge_indexer::metrics::install_recorder_without_listener()?;
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
async fn indexer_run(config: Config, bootstrap: &str, events: usize) -> anyhow::Result<(merge_indexer::ingest::RunSummary, f64, Arc<StateStore>)> {
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
