//! The ingest stage: a consumer-group member that reads `products` and `query-events` in
//! size- and time-bounded micro-batches, sends invalid events to `dead-letters`, and applies
//! each batch to state in one RocksDB write that also stores the next offset per partition.
//!
//! - [`context`]: rebalance callbacks (positions from state); [`batch`]: raw batches and their
//!   decoding; [`pipeline`]: the preparer and writer threads; [`dead_letters`]: the sender;
//!   [`lag`]: consumer lag and the caught-up check. The consume loop ([`Indexer::run`]) is here.
//!
//! Exactly-once rests on three rules:
//! 1. On assignment the consumer starts every partition at the offset stored in state (or the
//!    beginning when none is stored); Kafka's committed offsets are never used for positioning.
//! 2. A record whose offset is below its partition's stored next offset is a duplicate and
//!    skipped, both before dead-lettering and inside the state write.
//! 3. A batch is applied only after all its dead letters are acknowledged by Kafka.
//!
//! Offsets are also committed to Kafka asynchronously after each batch, only so that standard
//! lag tools (`kafka-consumer-groups`, Burrow) see the group's progress.
//!
//! Owns the consumer and the dead-letter producer. May call `events` (decode), `state` (through
//! [`StateStore`]'s batch API only), `kafka` (client set-up) and `metrics`. Must not touch
//! RocksDB directly, encode text or run models: embeddings and DocIDs follow from state queues.

use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::config::ClientConfig;
use rdkafka::{Offset, TopicPartitionList};
use futures::StreamExt;
use tokio::sync::watch;

use crate::config::{Config, KafkaConfig};
use crate::kafka::{base_client_config, reliable_producer};
use crate::metrics as names;
use crate::state::{ApplyOutcome, StateStore};

mod batch;
use batch::*;
mod context;
pub use context::{IngestContext};
mod dead_letters;
use dead_letters::*;
mod lag;
pub use lag::{PartitionLag};
mod pipeline;
use pipeline::*;

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// How [`Indexer::run`] should end.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Return once every assigned partition has lag 0 and no event arrived for one batch window.
    pub stop_when_caught_up: bool,
    /// Return after this many applied batches, without any final commit (crash tests).
    pub max_batches: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    /// Batches applied.
    pub batches: u64,
    /// Records by outcome.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Events dropped from open batches because their partition was revoked.
    pub revoked_events_dropped: u64,
    /// Wall time of the run.
    pub elapsed_seconds: f64,
    /// Time from the first event received to the end of the last applied batch (excludes the
    /// group join and the idle wait before the first event): the denominator of throughput.
    pub active_seconds: f64,
    /// CPU time of the `batch-preparer` thread over the run (decode, validate, dead letters,
    /// encode and sort).
    pub prepare_cpu_seconds: f64,
    /// CPU time of the `state-writer` thread over the run (RocksDB reads, fold and write).
    pub write_cpu_seconds: f64,
    #[serde(skip)]
    first_event_received: Option<Instant>,
}

impl RunSummary {
    /// Records consumed, duplicates included.
    pub fn records(&self) -> u64 {
        self.outcomes.values().sum()
    }
}

/// The streaming indexer: one consumer-group member writing one state directory.
pub struct Indexer {
    consumer: Arc<StreamConsumer<IngestContext>>,
    dead_letters: DeadLetterSender,
    state: Arc<StateStore>,
    config: Arc<Config>,
}

impl Indexer {
    /// Connects to `bootstrap_servers` and subscribes to the `products` and `query-events` topics.
    pub fn connect(config: Arc<Config>, state: Arc<StateStore>, bootstrap_servers: &str) -> anyhow::Result<Self> {
        let client_config = consumer_client_config(&config.kafka, bootstrap_servers, &config.kafka.group_id)?;
        let context = IngestContext::new(Arc::clone(&state));
        let consumer: StreamConsumer<IngestContext> =
            client_config.create_with_context(context).context("creating Kafka consumer")?;
        let topics = [config.kafka.topics.products.as_str(), config.kafka.topics.query_events.as_str()];
        consumer.subscribe(&topics).context("subscribing")?;
        let dead_letters = DeadLetterSender {
            producer: reliable_producer(&config.kafka, bootstrap_servers)?,
            topic: config.kafka.topics.dead_letters.clone(),
            group_id: config.kafka.group_id.clone(),
            delivery_failures: Arc::default(),
        };
        tracing::info!(bootstrap_servers, group_id = %config.kafka.group_id, ?topics, "indexer connected");
        Ok(Self { consumer: Arc::new(consumer), dead_letters, state, config })
    }

    /// The state this indexer writes.
    pub fn state(&self) -> &Arc<StateStore> {
        &self.state
    }

    /// Partitions currently assigned to this member.
    pub fn assigned_partitions(&self) -> BTreeSet<TopicPartition> {
        self.consumer.context().assigned_partitions()
    }

    /// Dead-letter deliveries that failed since this indexer connected (each retry counts): the
    /// batch waits, retrying with back-off, until all its dead letters are acknowledged.
    pub fn dead_letter_delivery_failures(&self) -> u64 {
        self.dead_letters.delivery_failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many assignment changes this member has seen.
    pub fn rebalance_generation(&self) -> u64 {
        self.consumer.context().rebalance_generation()
    }

    /// Consumes and applies batches until `shutdown` turns true or `options` say to stop.
    ///
    /// Batches are pipelined ([`BatchPipeline`]): the `batch-preparer` thread decodes them,
    /// delivers their dead letters and prepares them, and the `state-writer` thread writes them
    /// to RocksDB, strictly in order, while this task polls and copies the next ones; at most
    /// `batch.max_in_flight` batches are handed over and not yet written (product-heavy batches
    /// cost several times what query batches do, so a queue lets each stage absorb the others'
    /// bursts). `expected_next` tracks, per partition, the next offset state will hold once the
    /// handed-over batches land, so redeliveries are filtered before they are decoded.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>, options: RunOptions) -> anyhow::Result<RunSummary> {
        let started = Instant::now();
        let mut summary = RunSummary::default();
        let mut writer = BatchPipeline::start(
            Arc::clone(&self.state),
            self.config.relevance.clone(),
            BatchDecoder::new(&self.config),
            self.dead_letters.clone(),
            shutdown.clone(),
        )?;
        let (stop_lag_refresher, lag_refresher_stop) = watch::channel(false);
        let lag_task = self.spawn_lag_refresher(lag_refresher_stop);
        let mut expected_next: FxHashMap<(SubscribedTopic, i32), i64> = FxHashMap::default();
        let max_in_flight = self.config.batch.max_in_flight.max(1);
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            let (received, first_received) = tokio::select! {
                batch = self.collect_batch() => batch,
                _ = shutdown.changed() => break Ok(()),
            };
            if summary.first_event_received.is_none() {
                summary.first_event_received = first_received;
            }
            if received.messages.is_empty() {
                if let Err(error) = self.finish_written(&mut writer, 0, &mut summary).await {
                    break Err(error);
                }
                if options.stop_when_caught_up {
                    match self.is_caught_up().await {
                        Ok(true) => break Ok(()),
                        Ok(false) => {}
                        Err(error) => break Err(error),
                    }
                }
                continue;
            }
            let new_messages = match self.drop_revoked_and_redelivered(received, &mut expected_next, &mut summary) {
                Ok(new_messages) => new_messages,
                Err(error) => break Err(error),
            };
            if let Err(error) = self.finish_written(&mut writer, max_in_flight - 1, &mut summary).await {
                break Err(error);
            }
            if options.max_batches.is_some_and(|limit| summary.batches + writer.in_flight as u64 >= limit) {
                // Crash-test stop: the prepared batch is abandoned, as a crash would.
                break Ok(());
            }
            if new_messages.messages.is_empty() {
                continue;
            }
            if let Err(error) = writer.submit(new_messages) {
                // The pipeline stopped on an error of its own, which says more than this one.
                break self.finish_written(&mut writer, 0, &mut summary).await.and(Err(error));
            }
        };
        let finished = self.finish_written(&mut writer, 0, &mut summary).await;
        writer.close();
        // Wait for the refresher to finish, so that no clone of the state or the consumer
        // outlives this call (callers reopen the state directory right after).
        let _ = stop_lag_refresher.send(true);
        let _ = lag_task.await;
        summary.elapsed_seconds = started.elapsed().as_secs_f64();
        result.and(finished).map(|()| summary)
    }

    /// Collects up to `max_events` messages, closing the batch `max_wait_ms` after the first,
    /// and copies each one's bytes into the batch on receipt (decoding happens on the
    /// `batch-preparer` thread). Returns an empty batch when nothing arrives within one window,
    /// and when the first message was received.
    async fn collect_batch(&self) -> (RawBatch, Option<Instant>) {
        let window = Duration::from_millis(self.config.batch.max_wait_ms.max(1));
        let max_events = self.config.batch.max_events.max(1);
        let products_topic = self.config.kafka.topics.products.as_str();
        let topic_of = |message: &BorrowedMessage<'_>| {
            if message.topic() == products_topic {
                return SubscribedTopic::Products;
            }
            debug_assert_eq!(message.topic(), self.config.kafka.topics.query_events, "only two topics are subscribed");
            SubscribedTopic::QueryEvents
        };
        let mut stream = self.consumer.stream();
        // Wait up to one window for the first event...
        let first = loop {
            match tokio::time::timeout(window, stream.next()).await {
                Err(_elapsed) => return (RawBatch::default(), None),
                Ok(Some(Ok(message))) => break message,
                Ok(Some(Err(error))) => self.pause_after_consume_error(error).await,
                Ok(None) => return (RawBatch::default(), None),
            }
        };
        let first_received = Instant::now();
        let mut received = RawBatch::with_capacity(max_events.min(16_384));
        received.push(topic_of(&first), &first);
        drop(first);
        // ...then collect until the batch is full or one window after the first event. One
        // timer per batch; `next()` is cancellation safe, so the timeout loses no message.
        let collect = async {
            while received.messages.len() < max_events {
                match stream.next().await {
                    Some(Ok(message)) => received.push(topic_of(&message), &message),
                    Some(Err(error)) => self.pause_after_consume_error(error).await,
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(window, collect).await;
        (received, Some(first_received))
    }

    async fn pause_after_consume_error(&self, error: KafkaError) {
        tracing::warn!(%error, "consume error; continuing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn topic_name(&self, topic: SubscribedTopic) -> &str {
        topic.name(&self.config.kafka.topics)
    }

    /// Drops the messages of partitions no longer assigned and redeliveries (offsets below the
    /// partition's next offset, counted as duplicates): what is left goes to the pipeline, and
    /// only those messages can reach the dead-letter topic.
    fn drop_revoked_and_redelivered(
        &self,
        mut received: RawBatch,
        expected_next: &mut FxHashMap<(SubscribedTopic, i32), i64>,
        summary: &mut RunSummary,
    ) -> anyhow::Result<RawBatch> {
        /// A run of consecutive messages from one partition (librdkafka hands out a fetch
        /// response's messages together), so the lookups happen once per run, not per message.
        struct PartitionRun {
            topic: SubscribedTopic,
            partition: i32,
            assigned: bool,
            next: Option<i64>,
        }
        let assigned = self.consumer.context().assigned_partitions();
        let assigned: FxHashSet<(&str, i32)> = assigned.iter().map(|(topic, partition)| (topic.as_str(), *partition)).collect();
        let mut kept = Vec::with_capacity(received.messages.len());
        let mut duplicates = [0_u64; 2];
        let mut revoked = 0_u64;
        let mut run: Option<PartitionRun> = None;
        for message in std::mem::take(&mut received.messages) {
            let continues_run = run.as_ref().is_some_and(|run| run.topic == message.topic && run.partition == message.partition);
            if !continues_run {
                if let Some(PartitionRun { topic, partition, assigned: true, next: Some(next) }) = run.take() {
                    expected_next.insert((topic, partition), next);
                }
                let topic = self.topic_name(message.topic);
                let is_assigned = assigned.contains(&(topic, message.partition));
                let next = match expected_next.get(&(message.topic, message.partition)) {
                    Some(next) => Some(*next),
                    None if is_assigned => self.state.next_offset(topic, message.partition)?,
                    None => None,
                };
                run = Some(PartitionRun { topic: message.topic, partition: message.partition, assigned: is_assigned, next });
            }
            let run = run.as_mut().expect("a run was started above");
            if !run.assigned {
                revoked += 1;
                continue;
            }
            if run.next.is_some_and(|next| message.offset < next) {
                // Redelivered after a crash or rebalance: already applied (or in flight), and
                // already dead-lettered if it was invalid.
                duplicates[message.topic as usize] += 1;
                continue;
            }
            run.next = Some(message.offset + 1);
            kept.push(message);
        }
        if let Some(PartitionRun { topic, partition, assigned: true, next: Some(next) }) = run {
            expected_next.insert((topic, partition), next);
        }
        received.messages = kept;
        if revoked > 0 {
            summary.revoked_events_dropped += revoked;
            metrics::counter!(names::REVOKED_EVENTS_DROPPED_TOTAL).increment(revoked);
        }
        for topic in [SubscribedTopic::Products, SubscribedTopic::QueryEvents] {
            let count = duplicates[topic as usize];
            if count == 0 {
                continue;
            }
            let topic = self.topic_name(topic).to_owned();
            metrics::counter!(names::EVENTS_TOTAL, "topic" => topic, "outcome" => ApplyOutcome::Duplicate.as_str()).increment(count);
            *summary.outcomes.entry(ApplyOutcome::Duplicate.as_str()).or_insert(0) += count;
        }
        Ok(received)
    }

    /// Records every batch the writer has finished, then waits for more until at most
    /// `keep_in_flight` batches remain with it.
    async fn finish_written(&self, writer: &mut BatchPipeline, keep_in_flight: usize, summary: &mut RunSummary) -> anyhow::Result<()> {
        loop {
            let wait = writer.in_flight > keep_in_flight;
            let Some(applied) = writer.take_applied(wait).await? else {
                return Ok(());
            };
            self.finish(applied, summary)?;
        }
    }

    /// Records a written batch's metrics and commits its offsets to Kafka (informational).
    fn finish(&self, applied: AppliedBatch, summary: &mut RunSummary) -> anyhow::Result<()> {
        let AppliedBatch { report, write_duration, completed, prepare_cpu, write_cpu } = applied;
        metrics::histogram!(names::BATCH_CPU_SECONDS, "stage" => "prepare").record(prepare_cpu.as_secs_f64());
        metrics::histogram!(names::BATCH_CPU_SECONDS, "stage" => "write").record(write_cpu.as_secs_f64());
        summary.prepare_cpu_seconds += prepare_cpu.as_secs_f64();
        summary.write_cpu_seconds += write_cpu.as_secs_f64();
        let report = report?;
        let records = report.outcomes.len();
        for (topic, outcome, count) in &report.counts.by_outcome {
            metrics::counter!(names::EVENTS_TOTAL, "topic" => Arc::clone(topic), "outcome" => outcome.as_str()).increment(*count);
            *summary.outcomes.entry(outcome.as_str()).or_insert(0) += count;
        }
        for (topic, reason, count) in &report.counts.dead_letters {
            metrics::counter!(names::DEAD_LETTERS_TOTAL, "topic" => Arc::clone(topic), "reason" => reason.as_str()).increment(*count);
        }
        summary.batches += 1;
        if let Some(first) = summary.first_event_received {
            summary.active_seconds = completed.saturating_duration_since(first).as_secs_f64();
        }
        metrics::counter!(names::ROCKSDB_WRITE_BYTES_TOTAL).increment(report.write_bytes as u64);
        metrics::histogram!(names::BATCH_EVENTS).record(records as f64);
        metrics::histogram!(names::BATCH_APPLY_DURATION_SECONDS).record(write_duration.as_secs_f64());
        let counts = self.state.counts()?;
        metrics::gauge!(names::STATE_PRODUCTS).set(counts.products as f64);
        metrics::gauge!(names::STATE_JUDGEMENT_PAIRS).set(counts.judgement_pairs as f64);
        tracing::debug!(events = records, write_bytes = report.write_bytes, "batch applied");
        self.commit_to_kafka(&report.next_offsets);
        Ok(())
    }

    fn commit_to_kafka(&self, next_offsets: &BTreeMap<TopicPartition, i64>) {
        if next_offsets.is_empty() {
            return;
        }
        let mut partitions = TopicPartitionList::new();
        for ((topic, partition), next) in next_offsets {
            if let Err(error) = partitions.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::warn!(%topic, partition, %error, "building the commit list failed");
            }
        }
        if let Err(error) = self.consumer.commit(&partitions, CommitMode::Async) {
            metrics::counter!(names::KAFKA_COMMIT_FAILURES_TOTAL).increment(1);
            tracing::debug!(%error, "async offset commit failed (informational only)");
        }
    }
}

/// The indexer's consumer settings (also used by the benchmark's bare consume loop, so both
/// measure the same client): pass-through properties, then our defaults where the pass-through
/// leaves them unset, then the settings exactly-once owns, which always win.
pub fn consumer_client_config(kafka: &KafkaConfig, bootstrap_servers: &str, group_id: &str) -> anyhow::Result<ClientConfig> {
    let mut client_config = base_client_config(kafka, bootstrap_servers)?;
    // fetch.queue.backoff.ms: librdkafka (>= 2.4) postpones a partition's next fetch by this
    // much once its local queue passes the queued.* thresholds. Its default, 1,000 ms, stalls
    // a consumer that applies slower than it fetches for a whole second at a time (measured:
    // ingest of 200k events fell from 570k to 145k events/s); 10 ms keeps the queue topped up.
    for (property, default) in [
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        ("isolation.level", "read_committed"),
        ("fetch.queue.backoff.ms", "10"),
    ] {
        if client_config.get(property).is_none() {
            client_config.set(property, default);
        }
    }
    for (property, owned) in [("group.id", group_id), ("enable.auto.commit", "false"), ("enable.auto.offset.store", "false")] {
        if let Some(value) = client_config.get(property).filter(|value| *value != owned) {
            tracing::warn!(%property, %value, "ignoring pass-through property the exactly-once design owns");
        }
        client_config.set(property, owned);
    }
    Ok(client_config)
}

#[cfg(test)]
mod tests;
