//! The Kafka source: a consumer-group member that reads `products` and `query-events` in
//! size- and time-bounded micro-batches, sends invalid events to `dead-letters`, and applies
//! each batch to state in one RocksDB write that also stores the next offset per partition.
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

use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::config::ClientConfig;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use futures::StreamExt;
use tokio::sync::watch;

use crate::config::{Config, KafkaConfig};
use crate::events::{decode_product_event, decode_query_event, DeadLetterReason, InvalidEvent};
use crate::kafka::{base_client_config, reliable_producer};
use crate::metrics as names;
use crate::state::{ApplyOutcome, DecodedRecord, PreparedBatch, SourcePosition, SourcedRecord, StateStore};

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// Consumer context: positions partitions from state on assignment and tracks what this
/// member owns, so an open batch can drop events of revoked partitions.
pub struct IngestContext {
    state: Arc<StateStore>,
    assigned: Mutex<BTreeSet<TopicPartition>>,
    rebalance_generation: AtomicU64,
}

impl IngestContext {
    fn new(state: Arc<StateStore>) -> Self {
        Self { state, assigned: Mutex::new(BTreeSet::new()), rebalance_generation: AtomicU64::new(0) }
    }

    /// The partitions currently assigned to this member.
    pub fn assigned_partitions(&self) -> BTreeSet<TopicPartition> {
        self.assigned.lock().expect("assignment lock").clone()
    }

    /// Incremented on every assignment change.
    pub fn rebalance_generation(&self) -> u64 {
        self.rebalance_generation.load(Ordering::SeqCst)
    }

    fn position_from_state(&self, partitions: &mut TopicPartitionList) {
        for (topic, partition) in partition_pairs(partitions) {
            let offset = match self.state.next_offset(&topic, partition) {
                Ok(Some(next)) => Offset::Offset(next),
                Ok(None) => Offset::Beginning,
                Err(error) => {
                    // Kafka's committed offset is never ahead of state (it is committed after
                    // the state write), so falling back to it can only cause duplicates, which
                    // the offset check in state skips.
                    tracing::error!(%topic, partition, %error, "reading stored offset failed; using the committed offset");
                    Offset::Stored
                }
            };
            tracing::debug!(%topic, partition, ?offset, "partition assigned");
            if let Err(error) = partitions.set_partition_offset(&topic, partition, offset) {
                tracing::error!(%topic, partition, %error, "setting the start offset failed");
            }
        }
    }
}

fn partition_pairs(partitions: &TopicPartitionList) -> Vec<TopicPartition> {
    partitions.elements().iter().map(|element| (element.topic().to_owned(), element.partition())).collect()
}

impl ClientContext for IngestContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(&self, base_consumer: &BaseConsumer<Self>, error: RDKafkaRespErr, partitions: &mut TopicPartitionList) {
        let cooperative = matches!(base_consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let pairs = partition_pairs(partitions);
        let result = match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(names::REBALANCES_TOTAL, "kind" => "assign").increment(1);
                self.position_from_state(partitions);
                tracing::info!(partitions = pairs.len(), "partitions assigned; positioned at the offsets stored in state");
                self.assigned.lock().expect("assignment lock").extend(pairs);
                if cooperative {
                    base_consumer.incremental_assign(partitions)
                } else {
                    base_consumer.assign(partitions)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(names::REBALANCES_TOTAL, "kind" => "revoke").increment(1);
                let mut assigned = self.assigned.lock().expect("assignment lock");
                for pair in &pairs {
                    tracing::debug!(topic = %pair.0, partition = pair.1, "partition revoked");
                    assigned.remove(pair);
                }
                drop(assigned);
                tracing::info!(partitions = pairs.len(), "partitions revoked; events of open batches for them are dropped");
                if cooperative {
                    base_consumer.incremental_unassign(partitions)
                } else {
                    base_consumer.unassign()
                }
            }
            other => {
                metrics::counter!(names::REBALANCES_TOTAL, "kind" => "error").increment(1);
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.assigned.lock().expect("assignment lock").clear();
                base_consumer.unassign()
            }
        };
        self.rebalance_generation.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = result {
            tracing::error!(%error, "applying the rebalance failed");
        }
    }
}

/// Lag of one partition: high watermark minus the next offset stored in state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset the next produced message will get.
    pub high_watermark: i64,
    /// Next offset to apply (the low watermark when nothing was applied yet).
    pub next_offset: i64,
    /// `high_watermark - next_offset`, at least 0.
    pub lag: i64,
}

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
    #[serde(skip)]
    first_event_received: Option<Instant>,
}

impl RunSummary {
    /// Records consumed, duplicates included.
    pub fn records(&self) -> u64 {
        self.outcomes.values().sum()
    }
}

/// A message rejected by validation, with the bytes the dead letter carries.
struct RejectedMessage {
    invalid: InvalidEvent,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

/// A consumed message, decoded on receipt.
struct Received {
    position: SourcePosition,
    decoded: Result<DecodedRecord, RejectedMessage>,
}

/// What the state writer hands back per batch: the records, the report, the write's duration and
/// when it completed.
type AppliedBatch = (Vec<SourcedRecord>, Result<crate::state::BatchReport, crate::state::StateError>, Duration, Instant);

/// The state writer: two threads in a pipeline, strictly in submission order. `batch-preparer`
/// encodes product values, keys judgements and sorts each batch ([`PreparedBatch::prepare`]);
/// `state-writer` reads, folds and writes it ([`StateStore::apply_prepared`]). The consumer task
/// meanwhile reads and decodes the next batches, so the three stages overlap and, on a machine
/// with fewer cores than stages, the scheduler gives idle time to whichever stage has work.
struct StateWriter {
    batches: Option<std::sync::mpsc::Sender<Vec<SourcedRecord>>>,
    applied: tokio::sync::mpsc::UnboundedReceiver<AppliedBatch>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Batches submitted and not yet taken back with [`StateWriter::take_applied`].
    in_flight: usize,
}

impl StateWriter {
    fn start(state: Arc<StateStore>, mapping: crate::events::RelevanceMapping) -> anyhow::Result<Self> {
        let (batches, pending) = std::sync::mpsc::channel::<Vec<SourcedRecord>>();
        let (prepared_sender, prepared) = std::sync::mpsc::channel::<PreparedBatch>();
        let (applied_sender, applied) = tokio::sync::mpsc::unbounded_channel();
        let preparer = std::thread::Builder::new()
            .name("batch-preparer".into())
            .spawn(move || {
                for records in pending {
                    if prepared_sender.send(PreparedBatch::prepare(records)).is_err() {
                        return;
                    }
                }
            })
            .context("starting the batch preparer thread")?;
        let writer = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                for batch in prepared {
                    let started = Instant::now();
                    let report = state.apply_prepared(&batch, &mapping);
                    // After a failed write no later batch may land: its offsets would cover the
                    // failed batch's events. The consumer task stops on the error it receives.
                    let failed = report.is_err();
                    let written = (batch.into_records(), report, started.elapsed(), Instant::now());
                    if applied_sender.send(written).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the state writer thread")?;
        Ok(Self { batches: Some(batches), applied, threads: vec![preparer, writer], in_flight: 0 })
    }

    fn submit(&mut self, records: Vec<SourcedRecord>) -> anyhow::Result<()> {
        let sender = self.batches.as_ref().context("the state writer is closed")?;
        sender.send(records).map_err(|_| anyhow::anyhow!("the state writer thread has stopped"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// The next written batch: waits for it when `wait`, else only takes one already written.
    async fn take_applied(&mut self, wait: bool) -> anyhow::Result<Option<AppliedBatch>> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let applied = if wait {
            self.applied.recv().await.context("the state writer thread has stopped")?
        } else {
            match self.applied.try_recv() {
                Ok(applied) => applied,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => anyhow::bail!("the state writer thread has stopped"),
            }
        };
        self.in_flight -= 1;
        Ok(Some(applied))
    }

    /// Stops the thread once it has written everything submitted.
    fn close(&mut self) {
        self.batches = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a state writer thread panicked");
            }
        }
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// The streaming indexer: one consumer-group member writing one state directory.
pub struct Indexer {
    consumer: Arc<StreamConsumer<IngestContext>>,
    dead_letter_producer: FutureProducer,
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
        let dead_letter_producer = reliable_producer(&config.kafka, bootstrap_servers)?;
        tracing::info!(bootstrap_servers, group_id = %config.kafka.group_id, ?topics, "indexer connected");
        Ok(Self { consumer: Arc::new(consumer), dead_letter_producer, state, config })
    }

    /// The state this indexer writes.
    pub fn state(&self) -> &Arc<StateStore> {
        &self.state
    }

    /// Partitions currently assigned to this member.
    pub fn assigned_partitions(&self) -> BTreeSet<TopicPartition> {
        self.consumer.context().assigned_partitions()
    }

    /// How many assignment changes this member has seen.
    pub fn rebalance_generation(&self) -> u64 {
        self.consumer.context().rebalance_generation()
    }

    /// Lag of every assigned partition (blocking: asks the brokers for watermarks).
    pub fn partition_lags(&self) -> anyhow::Result<Vec<PartitionLag>> {
        partition_lags(&self.consumer, &self.state)
    }

    /// [`Indexer::partition_lags`] on a blocking thread, so the async runtime keeps running
    /// while the broker answers.
    pub async fn partition_lags_async(&self) -> anyhow::Result<Vec<PartitionLag>> {
        let consumer = Arc::clone(&self.consumer);
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || partition_lags(&consumer, &state)).await?
    }

    /// Consumes and applies batches until `shutdown` turns true or `options` say to stop.
    ///
    /// Batches are pipelined: the `batch-preparer` and `state-writer` threads prepare and write
    /// them to RocksDB strictly in order while this task collects and decodes the next ones and
    /// delivers their dead letters, with at most `batch.max_in_flight` batches handed over and
    /// not yet written (product-heavy batches cost the writer several times what query batches
    /// do, so a queue lets each side absorb the other's bursts). `expected_next` tracks, per partition, the
    /// next offset state will hold once the handed-over batches land, so redeliveries are
    /// filtered before they reach the dead-letter topic.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>, options: RunOptions) -> anyhow::Result<RunSummary> {
        let started = Instant::now();
        let mut summary = RunSummary::default();
        let mut writer = StateWriter::start(Arc::clone(&self.state), self.config.relevance.clone())?;
        let (stop_lag_refresher, lag_refresher_stop) = watch::channel(false);
        let lag_task = self.spawn_lag_refresher(lag_refresher_stop);
        let mut expected_next: FxHashMap<String, FxHashMap<i32, i64>> = FxHashMap::default();
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
            if received.is_empty() {
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
            let prepared = match self.prepare_batch(received, &mut expected_next, &mut summary, &mut shutdown).await {
                Ok(prepared) => prepared,
                Err(error) => break Err(error),
            };
            if let Err(error) = self.finish_written(&mut writer, max_in_flight - 1, &mut summary).await {
                break Err(error);
            }
            if options.max_batches.is_some_and(|limit| summary.batches + writer.in_flight as u64 >= limit) {
                // Crash-test stop: the prepared batch is abandoned, as a crash would.
                break Ok(());
            }
            if let Some(records) = prepared {
                if let Err(error) = writer.submit(records) {
                    break Err(error);
                }
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
    /// and decodes each on receipt (only rejected messages are copied, for the dead-letter
    /// topic). Returns an empty batch when nothing arrives within one window, and when the
    /// first message was received.
    async fn collect_batch(&self) -> (Vec<Received>, Option<Instant>) {
        let window = Duration::from_millis(self.config.batch.max_wait_ms.max(1));
        let max_events = self.config.batch.max_events.max(1);
        let mut received = Vec::with_capacity(max_events.min(16_384));
        let mut stream = self.consumer.stream();
        // Wait up to one window for the first event...
        let first = loop {
            match tokio::time::timeout(window, stream.next()).await {
                Err(_elapsed) => return (received, None),
                Ok(Some(Ok(message))) => break message,
                Ok(Some(Err(error))) => self.pause_after_consume_error(error).await,
                Ok(None) => return (received, None),
            }
        };
        let first_received = Instant::now();
        received.push(self.decode(&first));
        drop(first);
        // ...then collect until the batch is full or one window after the first event. One
        // timer per batch; `next()` is cancellation safe, so the timeout loses no message.
        let collect = async {
            while received.len() < max_events {
                match stream.next().await {
                    Some(Ok(message)) => received.push(self.decode(&message)),
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

    fn decode(&self, message: &BorrowedMessage<'_>) -> Received {
        let topics = &self.config.kafka.topics;
        let limits = &self.config.validation;
        let decoded = if message.topic() == topics.products {
            decode_product_event(message.key(), message.payload(), limits).map(DecodedRecord::Product)
        } else {
            debug_assert_eq!(message.topic(), topics.query_events, "only two topics are subscribed");
            decode_query_event(message.payload(), limits).map(DecodedRecord::Query)
        };
        let position = SourcePosition { topic: message.topic().to_owned(), partition: message.partition(), offset: message.offset() };
        let decoded = decoded.map_err(|invalid| RejectedMessage {
            invalid,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
        });
        Received { position, decoded }
    }

    /// Drops events of partitions no longer assigned and redeliveries, delivers the batch's
    /// dead letters, and returns the records to write (`None` when nothing is left).
    async fn prepare_batch(
        &self,
        received: Vec<Received>,
        expected_next: &mut FxHashMap<String, FxHashMap<i32, i64>>,
        summary: &mut RunSummary,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Vec<SourcedRecord>>> {
        let assigned = self.consumer.context().assigned_partitions();
        let assigned: FxHashSet<(&str, i32)> = assigned.iter().map(|(topic, partition)| (topic.as_str(), *partition)).collect();
        let mut records = Vec::with_capacity(received.len());
        let mut dead_letters = Vec::new();
        let mut duplicates: FxHashMap<String, u64> = FxHashMap::default();
        for Received { position, decoded } in received {
            if !assigned.contains(&(position.topic.as_str(), position.partition)) {
                summary.revoked_events_dropped += 1;
                metrics::counter!(names::REVOKED_EVENTS_DROPPED_TOTAL).increment(1);
                continue;
            }
            let expected = expected_next.get(position.topic.as_str()).and_then(|partitions| partitions.get(&position.partition));
            let next = match expected {
                Some(next) => Some(*next),
                None => self.state.next_offset(&position.topic, position.partition)?,
            };
            if next.is_some_and(|next| position.offset < next) {
                // Redelivered after a crash or rebalance: already applied (or in flight), and
                // already dead-lettered if it was invalid.
                *duplicates.entry(position.topic).or_insert(0) += 1;
                continue;
            }
            match expected_next.get_mut(position.topic.as_str()) {
                Some(partitions) => {
                    partitions.insert(position.partition, position.offset + 1);
                }
                None => {
                    expected_next.insert(position.topic.clone(), FxHashMap::from_iter([(position.partition, position.offset + 1)]));
                }
            }
            match decoded {
                Ok(record) => records.push(SourcedRecord { position, record }),
                Err(rejected) => {
                    records.push(SourcedRecord { position: position.clone(), record: DecodedRecord::DeadLetter(rejected.invalid.reason) });
                    dead_letters.push((position, rejected));
                }
            }
        }
        for (topic, count) in duplicates {
            metrics::counter!(names::EVENTS_TOTAL, "topic" => topic, "outcome" => ApplyOutcome::Duplicate.as_str()).increment(count);
            *summary.outcomes.entry(ApplyOutcome::Duplicate.as_str()).or_insert(0) += count;
        }
        self.deliver_dead_letters(&dead_letters, shutdown).await?;
        Ok((!records.is_empty()).then_some(records))
    }

    /// Records every batch the writer has finished, then waits for more until at most
    /// `keep_in_flight` batches remain with it.
    async fn finish_written(&self, writer: &mut StateWriter, keep_in_flight: usize, summary: &mut RunSummary) -> anyhow::Result<()> {
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
        let (records, report, write_duration, completed) = applied;
        let report = report?;
        let mut outcome_counts: HashMap<(&str, ApplyOutcome), u64> = HashMap::new();
        let mut dead_letter_counts: HashMap<(&str, DeadLetterReason), u64> = HashMap::new();
        for (record, outcome) in records.iter().zip(&report.outcomes) {
            *outcome_counts.entry((record.position.topic.as_str(), *outcome)).or_insert(0) += 1;
            if let (ApplyOutcome::DeadLettered, DecodedRecord::DeadLetter(reason)) = (outcome, &record.record) {
                *dead_letter_counts.entry((record.position.topic.as_str(), *reason)).or_insert(0) += 1;
            }
        }
        for ((topic, outcome), count) in outcome_counts {
            metrics::counter!(names::EVENTS_TOTAL, "topic" => topic.to_owned(), "outcome" => outcome.as_str()).increment(count);
            *summary.outcomes.entry(outcome.as_str()).or_insert(0) += count;
        }
        for ((topic, reason), count) in dead_letter_counts {
            metrics::counter!(names::DEAD_LETTERS_TOTAL, "topic" => topic.to_owned(), "reason" => reason.as_str()).increment(count);
        }
        summary.batches += 1;
        if let Some(first) = summary.first_event_received {
            summary.active_seconds = completed.saturating_duration_since(first).as_secs_f64();
        }
        metrics::counter!(names::ROCKSDB_WRITE_BYTES_TOTAL).increment(report.write_bytes as u64);
        metrics::histogram!(names::BATCH_EVENTS).record(records.len() as f64);
        metrics::histogram!(names::BATCH_APPLY_DURATION_SECONDS).record(write_duration.as_secs_f64());
        let counts = self.state.counts()?;
        metrics::gauge!(names::STATE_PRODUCTS).set(counts.products as f64);
        metrics::gauge!(names::STATE_JUDGEMENT_PAIRS).set(counts.judgement_pairs as f64);
        tracing::debug!(events = records.len(), write_bytes = report.write_bytes, "batch applied");
        self.commit_to_kafka(&report.next_offsets);
        Ok(())
    }

    /// Sends every dead letter and waits for all acknowledgements; retries failed ones with
    /// back-off until they are delivered or shutdown is requested (then the batch is not applied
    /// and will be consumed again).
    async fn deliver_dead_letters(
        &self,
        dead_letters: &[(SourcePosition, RejectedMessage)],
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut pending: Vec<usize> = (0..dead_letters.len()).collect();
        let mut backoff = Duration::from_millis(100);
        while !pending.is_empty() {
            let sends = pending.iter().map(|&index| {
                let (position, rejected) = &dead_letters[index];
                self.send_dead_letter(position, rejected)
            });
            let results = futures::future::join_all(sends).await;
            let mut still_pending = Vec::new();
            for (&index, result) in pending.iter().zip(results) {
                if let Err(error) = result {
                    metrics::counter!(names::DEAD_LETTER_DELIVERY_FAILURES_TOTAL).increment(1);
                    tracing::warn!(%error, "dead letter delivery failed; retrying");
                    still_pending.push(index);
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => anyhow::bail!("shutdown while dead letters were undelivered; the batch will be consumed again"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        Ok(())
    }

    async fn send_dead_letter(&self, position: &SourcePosition, rejected: &RejectedMessage) -> Result<(), KafkaError> {
        let partition = position.partition.to_string();
        let offset = position.offset.to_string();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(rejected.invalid.reason.as_str()) })
            .insert(Header { key: "detail", value: Some(rejected.invalid.detail.as_str()) })
            .insert(Header { key: "source_topic", value: Some(position.topic.as_str()) })
            .insert(Header { key: "source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "source_offset", value: Some(offset.as_str()) })
            .insert(Header { key: "dead_lettered_at_ms", value: Some(now_ms.as_str()) })
            .insert(Header { key: "indexer_group_id", value: Some(self.config.kafka.group_id.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.config.kafka.topics.dead_letters).headers(headers);
        if let Some(key) = &rejected.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &rejected.payload {
            record = record.payload(payload.as_slice());
        }
        self.dead_letter_producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(error, _)| error)
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

    async fn is_caught_up(&self) -> anyhow::Result<bool> {
        if self.assigned_partitions().is_empty() {
            return Ok(false);
        }
        let consumer = Arc::clone(&self.consumer);
        let state = Arc::clone(&self.state);
        let lags = tokio::task::spawn_blocking(move || partition_lags(&consumer, &state)).await??;
        Ok(lags.iter().all(|lag| lag.lag == 0))
    }

    fn spawn_lag_refresher(&self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let consumer = Arc::clone(&self.consumer);
        let state = Arc::clone(&self.state);
        let interval = Duration::from_millis(self.config.kafka.lag_refresh_interval_ms.max(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
                let consumer = Arc::clone(&consumer);
                let state = Arc::clone(&state);
                match tokio::task::spawn_blocking(move || partition_lags(&consumer, &state)).await {
                    Ok(Ok(lags)) => {
                        for lag in lags {
                            metrics::gauge!(names::CONSUMER_LAG_MESSAGES, "topic" => lag.topic, "partition" => lag.partition.to_string())
                                .set(lag.lag as f64);
                        }
                    }
                    Ok(Err(error)) => tracing::warn!(%error, "refreshing consumer lag failed"),
                    Err(error) => tracing::warn!(%error, "lag task failed"),
                }
            }
        })
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

fn partition_lags(consumer: &StreamConsumer<IngestContext>, state: &StateStore) -> anyhow::Result<Vec<PartitionLag>> {
    let mut lags = Vec::new();
    for (topic, partition) in consumer.context().assigned_partitions() {
        let (low_watermark, high_watermark) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            .with_context(|| format!("fetching watermarks of {topic}/{partition}"))?;
        let next_offset = state.next_offset(&topic, partition)?.unwrap_or(low_watermark).max(low_watermark);
        lags.push(PartitionLag { topic, partition, high_watermark, next_offset, lag: (high_watermark - next_offset).max(0) });
    }
    Ok(lags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_once_settings_win_over_pass_through_and_defaults_yield_to_it() {
        let mut kafka = KafkaConfig::default();
        kafka.properties.insert("enable.auto.commit".into(), "true".into());
        kafka.properties.insert("group.id".into(), "someone-else".into());
        kafka.properties.insert("isolation.level".into(), "read_uncommitted".into());
        kafka.properties.insert("security.protocol".into(), "SASL_SSL".into());
        let client_config = consumer_client_config(&kafka, "broker:9092", "indexer-a").unwrap();
        assert_eq!(client_config.get("enable.auto.commit"), Some("false"));
        assert_eq!(client_config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client_config.get("group.id"), Some("indexer-a"));
        assert_eq!(client_config.get("isolation.level"), Some("read_uncommitted"), "pass-through beats our default");
        assert_eq!(client_config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(client_config.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(client_config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client_config.get("bootstrap.servers"), Some("broker:9092"));
    }
}
