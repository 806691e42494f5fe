//! Metric names, their descriptions and buckets, and the Prometheus exporter. Every stage
//! records through the `metrics` facade with the names defined here; nobody reads them back.
//! Names follow the Prometheus naming guide: base units, `_total` on counters, explicit buckets.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: events consumed, by `topic` and `outcome` (applied, unchanged, duplicate, dead_lettered).
pub const EVENTS_TOTAL: &str = "merge_indexer_events_total";
/// Counter: events sent to the dead-letter topic, by source `topic` and `reason`.
pub const DEAD_LETTERS_TOTAL: &str = "merge_indexer_dead_letters_total";
/// Gauge: high watermark minus the stored next offset, by `topic` and `partition`.
pub const CONSUMER_LAG_MESSAGES: &str = "merge_indexer_consumer_lag_messages";
/// Histogram: time to write one micro-batch to RocksDB (effects, counters and offsets in one batch).
pub const BATCH_APPLY_DURATION_SECONDS: &str = "merge_indexer_batch_apply_duration_seconds";
/// Histogram: events per applied micro-batch.
pub const BATCH_EVENTS: &str = "merge_indexer_batch_events";
/// Counter: bytes written to RocksDB in write batches.
pub const ROCKSDB_WRITE_BYTES_TOTAL: &str = "merge_indexer_rocksdb_write_bytes_total";
/// Histogram: CPU time one micro-batch cost a pipeline thread, by `stage`: `prepare` (the
/// `batch-preparer` thread: decode, validate, dead letters, encode and sort) and `write` (the
/// `state-writer` thread: read, fold and write to RocksDB). `rate(…_sum)` of a stage near 1
/// means that thread is saturated and limits ingest. (A histogram, not a counter: the facade's
/// counters are integers.)
pub const BATCH_CPU_SECONDS: &str = "merge_indexer_batch_cpu_seconds";
/// Gauge: products stored.
pub const STATE_PRODUCTS: &str = "merge_indexer_state_products";
/// Gauge: (locale, query, product) judgement pairs stored.
pub const STATE_JUDGEMENT_PAIRS: &str = "merge_indexer_state_judgement_pairs";
/// Counter: partition assignment changes, by `kind` (assign, revoke, error).
pub const REBALANCES_TOTAL: &str = "merge_indexer_rebalances_total";
/// Counter: events dropped from an open batch because their partition was revoked (they are
/// consumed again from the stored offset by whoever owns the partition next).
pub const REVOKED_EVENTS_DROPPED_TOTAL: &str = "merge_indexer_revoked_events_dropped_total";
/// Counter: failures to deliver a dead letter (the batch is retried; nothing is applied).
pub const DEAD_LETTER_DELIVERY_FAILURES_TOTAL: &str = "merge_indexer_dead_letter_delivery_failures_total";
/// Counter: failed asynchronous offset commits to Kafka (informational commits only).
pub const KAFKA_COMMIT_FAILURES_TOTAL: &str = "merge_indexer_kafka_commit_failures_total";
/// Counter: precomputed `embedding`s on product upserts, by `outcome` (used, other_model).
pub const PRECOMPUTED_EMBEDDINGS_TOTAL: &str = "merge_indexer_precomputed_embeddings_total";
/// Counter: product texts encoded by the embedding workers, by `encoder` (model name).
pub const EMBEDDINGS_COMPUTED_TOTAL: &str = "merge_indexer_embeddings_computed_total";
/// Counter: queued products whose vector was already cached for their content hash.
pub const EMBEDDING_CACHE_HITS_TOTAL: &str = "merge_indexer_embedding_cache_hits_total";
/// Gauge: products waiting for a vector (RocksDB's estimate of the queue's keys).
pub const EMBEDDING_QUEUE_PRODUCTS: &str = "merge_indexer_embedding_queue_products";
/// Histogram: time to encode one batch of product texts.
pub const EMBEDDING_BATCH_DURATION_SECONDS: &str = "merge_indexer_embedding_batch_duration_seconds";
/// Counter: products placed by the DocID worker, by placement (quantizer_codes,
/// last_level_resolved, overflow, already_assigned, product_gone, space_full).
pub const DOCID_ASSIGNMENTS_TOTAL: &str = "merge_indexer_docid_assignments_total";
/// Gauge: products waiting for a DocID.
pub const DOCID_QUEUE_PRODUCTS: &str = "merge_indexer_docid_queue_products";
/// Histogram: seconds to quantize and persist one page of DocID assignments.
pub const DOCID_ASSIGNMENT_BATCH_DURATION_SECONDS: &str = "merge_indexer_docid_assignment_batch_duration_seconds";
/// Gauge: always 1, with `version` and `backend` labels.
pub const BUILD_INFO: &str = "merge_indexer_build_info";

/// Buckets of [`BATCH_APPLY_DURATION_SECONDS`] and [`BATCH_CPU_SECONDS`]: 0.5 ms to 10 s.
pub const BATCH_APPLY_DURATION_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets of [`BATCH_EVENTS`]: 1 to 10,000 events.
pub const BATCH_EVENTS_BUCKETS: [f64; 9] = [1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0];

/// Buckets of [`EMBEDDING_BATCH_DURATION_SECONDS`]: 1 ms to 60 s.
pub const EMBEDDING_BATCH_DURATION_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

/// Errors starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter could not be built or could not bind.
    #[error("prometheus exporter on {addr}: {detail}")]
    Exporter {
        /// The listen address.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
}

/// Builds the Prometheus recorder with our buckets, without installing it.
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_APPLY_DURATION_SECONDS.into()), &BATCH_APPLY_DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), &BATCH_EVENTS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_CPU_SECONDS.into()), &BATCH_APPLY_DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(EMBEDDING_BATCH_DURATION_SECONDS.into()), &EMBEDDING_BATCH_DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DOCID_ASSIGNMENT_BATCH_DURATION_SECONDS.into()), &EMBEDDING_BATCH_DURATION_BUCKETS)
}

/// Installs the global recorder and serves `/metrics` on `addr` (needs a Tokio runtime).
/// Returns a handle that renders the same text, for tests and the `demo` summary.
pub fn install_exporter(addr: SocketAddr) -> Result<PrometheusHandle, MetricsError> {
    let exporter_error = |detail: String| MetricsError::Exporter { addr, detail };
    let (recorder, exporter) = builder()
        .map_err(|error| exporter_error(error.to_string()))?
        .with_http_listener(addr)
        .build()
        .map_err(|error| exporter_error(error.to_string()))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|error| exporter_error(error.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = exporter.await {
            tracing::error!(%addr, ?error, "prometheus exporter stopped");
        }
    });
    describe_metrics();
    Ok(handle)
}

/// Installs the global recorder without an HTTP listener (benchmarks); returns its handle.
pub fn install_recorder_without_listener() -> Result<PrometheusHandle, MetricsError> {
    let addr = SocketAddr::from(([0, 0, 0, 0], 0));
    let recorder = builder().map_err(|error| MetricsError::Exporter { addr, detail: error.to_string() })?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|error| MetricsError::Exporter { addr, detail: error.to_string() })?;
    describe_metrics();
    Ok(handle)
}

/// Registers HELP text and units, and publishes build info.
pub fn describe_metrics() {
    describe_counter!(EVENTS_TOTAL, "Events consumed, by topic and outcome (applied, unchanged, duplicate, dead_lettered).");
    describe_counter!(DEAD_LETTERS_TOTAL, "Events sent to the dead-letter topic, by source topic and reason.");
    describe_gauge!(CONSUMER_LAG_MESSAGES, "High watermark minus the next offset stored in state, by topic and partition.");
    describe_histogram!(BATCH_APPLY_DURATION_SECONDS, Unit::Seconds, "Time to write one micro-batch to RocksDB: effects, counters and offsets in one WriteBatch.");
    describe_histogram!(BATCH_EVENTS, "Events per applied micro-batch.");
    describe_counter!(ROCKSDB_WRITE_BYTES_TOTAL, Unit::Bytes, "Bytes written to RocksDB in write batches.");
    describe_histogram!(
        BATCH_CPU_SECONDS,
        Unit::Seconds,
        "CPU time one micro-batch cost a pipeline thread, by stage (prepare, write); a rate of the sum near 1 means that stage limits ingest."
    );
    describe_gauge!(STATE_PRODUCTS, "Products stored in state.");
    describe_gauge!(STATE_JUDGEMENT_PAIRS, "Distinct (locale, query, product) judgement pairs stored in state.");
    describe_counter!(REBALANCES_TOTAL, "Consumer group partition assignment changes, by kind.");
    describe_counter!(REVOKED_EVENTS_DROPPED_TOTAL, "Events dropped from an open batch because their partition was revoked.");
    describe_counter!(DEAD_LETTER_DELIVERY_FAILURES_TOTAL, "Failed dead-letter deliveries; the batch is retried.");
    describe_counter!(KAFKA_COMMIT_FAILURES_TOTAL, "Failed asynchronous offset commits to Kafka (informational only).");
    describe_counter!(PRECOMPUTED_EMBEDDINGS_TOTAL, "Precomputed embeddings on product upserts, by outcome (used, other_model).");
    describe_counter!(EMBEDDINGS_COMPUTED_TOTAL, "Product texts encoded by the embedding workers, by encoder.");
    describe_counter!(EMBEDDING_CACHE_HITS_TOTAL, "Queued products whose vector was already cached for their content hash.");
    describe_gauge!(EMBEDDING_QUEUE_PRODUCTS, "Products waiting for a vector (estimate).");
    describe_histogram!(EMBEDDING_BATCH_DURATION_SECONDS, Unit::Seconds, "Time to encode one batch of product texts.");
    describe_counter!(DOCID_ASSIGNMENTS_TOTAL, "Products placed by the DocID worker, by placement (quantizer_codes, last_level_resolved, overflow, already_assigned, product_gone, space_full).");
    describe_gauge!(DOCID_QUEUE_PRODUCTS, "Products waiting for a DocID (most wait for their vector).");
    describe_histogram!(DOCID_ASSIGNMENT_BATCH_DURATION_SECONDS, Unit::Seconds, "Time to quantize and persist one page of DocID assignments.");
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "backend" => crate::BACKEND_NAME).set(1.0);
}

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`): what the batch
/// pipeline's stages report in [`BATCH_CPU_SECONDS`].
pub fn thread_cpu_time() -> std::time::Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time all threads of this process have used so far (`CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_time() -> std::time::Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> std::time::Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec, and both CPU-time clocks exist on every Linux;
    // a failure leaves it zeroed, which only spoils a CPU figure.
    let status = unsafe { libc::clock_gettime(clock, &mut now) };
    debug_assert_eq!(status, 0, "clock_gettime({clock})");
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
