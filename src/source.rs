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
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::events::{decode_product_event, decode_query_event, InvalidEvent};
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

/// A message rejected by validation, with the bytes the dead letter carries.
struct RejectedMessage {
    position: SourcePosition,
    invalid: InvalidEvent,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

/// Which of the two subscribed topics a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SubscribedTopic {
    Products,
    QueryEvents,
}

impl SubscribedTopic {
    /// The topic's configured name.
    fn name(self, topics: &crate::config::TopicNames) -> &str {
        match self {
            Self::Products => &topics.products,
            Self::QueryEvents => &topics.query_events,
        }
    }
}

/// One consumed message: its position, and where its key and payload lie in
/// [`RawBatch::bytes`].
#[derive(Debug)]
struct RawMessage {
    topic: SubscribedTopic,
    partition: i32,
    offset: i64,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
}

/// A micro-batch as consumed and not yet decoded. Every message's key and payload is copied
/// out of librdkafka's buffers into one byte arena (one allocation per batch, not per message),
/// so the consumer task only polls and copies; the `batch-preparer` thread decodes.
#[derive(Debug, Default)]
struct RawBatch {
    bytes: Vec<u8>,
    messages: Vec<RawMessage>,
}

impl RawBatch {
    /// Arena bytes reserved per expected message, about a query event's size (product events
    /// are larger); the arena grows past this as needed.
    const RESERVED_BYTES_PER_MESSAGE: usize = 192;

    fn with_capacity(messages: usize) -> Self {
        Self { bytes: Vec::with_capacity(messages * Self::RESERVED_BYTES_PER_MESSAGE), messages: Vec::with_capacity(messages) }
    }

    fn push(&mut self, topic: SubscribedTopic, message: &BorrowedMessage<'_>) {
        let key = message.key().map(|key| self.copy_in(key));
        let payload = message.payload().map(|payload| self.copy_in(payload));
        self.messages.push(RawMessage { topic, partition: message.partition(), offset: message.offset(), key, payload });
    }

    fn copy_in(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    fn bytes_of(&self, range: &Option<Range<usize>>) -> Option<&[u8]> {
        range.as_ref().map(|range| &self.bytes[range.clone()])
    }
}

/// Turns [`RawBatch`]es into records on the `batch-preparer` thread.
#[derive(Debug, Clone)]
struct BatchDecoder {
    /// The `products` and `query-events` topic names, shared by every record's position.
    products_topic: Arc<str>,
    query_events_topic: Arc<str>,
    limits: crate::events::ValidationLimits,
}

impl BatchDecoder {
    fn new(config: &Config) -> Self {
        Self {
            products_topic: config.kafka.topics.products.as_str().into(),
            query_events_topic: config.kafka.topics.query_events.as_str().into(),
            limits: config.validation.clone(),
        }
    }

    /// Decodes and validates every message, in order: one record each (a rejected message
    /// becomes a [`DecodedRecord::DeadLetter`] record), plus the rejected messages' bytes for
    /// the dead-letter topic.
    fn decode(&self, raw: &RawBatch) -> (Vec<SourcedRecord>, Vec<RejectedMessage>) {
        let mut records = Vec::with_capacity(raw.messages.len());
        let mut rejected = Vec::new();
        for message in &raw.messages {
            let key = raw.bytes_of(&message.key);
            let payload = raw.bytes_of(&message.payload);
            let (decoded, topic) = match message.topic {
                SubscribedTopic::Products => {
                    (decode_product_event(key, payload, &self.limits).map(DecodedRecord::Product), &self.products_topic)
                }
                SubscribedTopic::QueryEvents => {
                    (decode_query_event(payload, &self.limits).map(DecodedRecord::Query), &self.query_events_topic)
                }
            };
            let topic = Arc::clone(topic);
            let position = SourcePosition { topic, partition: message.partition, offset: message.offset };
            match decoded {
                Ok(record) => records.push(SourcedRecord { position, record }),
                Err(invalid) => {
                    records.push(SourcedRecord { position: position.clone(), record: DecodedRecord::DeadLetter(invalid.reason) });
                    rejected.push(RejectedMessage { position, invalid, key: key.map(<[u8]>::to_vec), payload: payload.map(<[u8]>::to_vec) });
                }
            }
        }
        (records, rejected)
    }
}

/// When the pipeline threads should stop waiting: the run's shutdown request, or the pipeline
/// being closed (after an error, when nobody will take its results any more).
#[derive(Debug, Clone)]
struct StopSignal {
    shutdown: watch::Receiver<bool>,
    abandoned: Arc<AtomicBool>,
}

impl StopSignal {
    fn is_set(&self) -> bool {
        *self.shutdown.borrow() || self.abandoned.load(Ordering::Acquire)
    }

    /// Sleeps for `duration`, checking the signal every 20 ms; true when it was set.
    fn sleep_unless_stopped(&self, duration: Duration) -> bool {
        crate::sleep_unless_stopped(duration, Duration::from_millis(20), || self.is_set())
    }
}

/// Sends rejected messages to the dead-letter topic, each with its original key and payload
/// and headers naming the reason and the source position.
#[derive(Clone)]
struct DeadLetterSender {
    producer: FutureProducer,
    topic: String,
    group_id: String,
}

impl DeadLetterSender {
    /// Sends every dead letter and blocks until Kafka has acknowledged all of them; retries the
    /// failed ones with back-off until they are delivered or `stop` is set (then the batch is not
    /// applied and will be consumed again).
    fn deliver_blocking(&self, dead_letters: &[RejectedMessage], stop: &StopSignal) -> anyhow::Result<()> {
        let mut pending: Vec<&RejectedMessage> = dead_letters.iter().collect();
        let mut backoff = Duration::from_millis(100);
        while !pending.is_empty() {
            // All sends first, so the acknowledgements are awaited concurrently.
            let deliveries: Vec<_> = pending.iter().map(|rejected| self.send(rejected)).collect();
            let mut still_pending = Vec::new();
            for (rejected, delivery) in pending.into_iter().zip(deliveries) {
                let acknowledged = delivery.and_then(|delivery| match futures::executor::block_on(delivery) {
                    Ok(Ok(_delivery)) => Ok(()),
                    Ok(Err((error, _message))) => Err(error.to_string()),
                    Err(_canceled) => Err("the producer dropped the delivery report".to_owned()),
                });
                if let Err(error) = acknowledged {
                    metrics::counter!(names::DEAD_LETTER_DELIVERY_FAILURES_TOTAL).increment(1);
                    tracing::warn!(%error, topic = %rejected.position.topic, partition = rejected.position.partition,
                        offset = rejected.position.offset, "dead letter delivery failed; retrying");
                    still_pending.push(rejected);
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                break;
            }
            if stop.sleep_unless_stopped(backoff) {
                anyhow::bail!("stopped while {} dead letters were undelivered; the batch will be consumed again", pending.len());
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        Ok(())
    }

    /// Hands one dead letter to the producer; the future resolves on Kafka's acknowledgement.
    fn send(&self, rejected: &RejectedMessage) -> Result<rdkafka::producer::DeliveryFuture, String> {
        let position = &rejected.position;
        let partition = position.partition.to_string();
        let offset = position.offset.to_string();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(rejected.invalid.reason.as_str()) })
            .insert(Header { key: "detail", value: Some(rejected.invalid.detail.as_str()) })
            .insert(Header { key: "source_topic", value: Some(&*position.topic) })
            .insert(Header { key: "source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "source_offset", value: Some(offset.as_str()) })
            .insert(Header { key: "dead_lettered_at_ms", value: Some(now_ms.as_str()) })
            .insert(Header { key: "indexer_group_id", value: Some(self.group_id.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &rejected.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &rejected.payload {
            record = record.payload(payload.as_slice());
        }
        self.producer.send_result(record).map_err(|(error, _record)| error.to_string())
    }
}

/// What the pipeline hands back per batch.
struct AppliedBatch {
    /// The write's report (with the records counted by outcome), or why the batch was not
    /// written.
    report: anyhow::Result<crate::state::BatchReport>,
    /// How long the RocksDB write took.
    write_duration: Duration,
    /// When the write completed.
    completed: Instant,
    /// CPU time the `batch-preparer` thread spent on the batch (decode, dead letters, prepare).
    prepare_cpu: Duration,
    /// CPU time the `state-writer` thread spent on the batch.
    write_cpu: Duration,
}

/// A batch on its way from the preparer to the writer, with the preparer's CPU time for it.
type PreparedHandoff = (anyhow::Result<PreparedBatch>, Duration);

/// The batch pipeline behind the consumer task: two threads, strictly in submission order.
/// `batch-preparer` decodes and validates each [`RawBatch`], delivers its dead letters (a batch
/// is written only after Kafka acknowledged them), then encodes product values, keys judgements
/// and sorts ([`PreparedBatch::prepare`]); `state-writer` reads, folds and writes it
/// ([`StateStore::apply_prepared`]). The consumer task meanwhile polls and copies the next
/// batches, so the three stages overlap and, on a machine with fewer cores than stages, the
/// scheduler gives idle time to whichever stage has work.
struct BatchPipeline {
    batches: Option<std::sync::mpsc::Sender<RawBatch>>,
    applied: tokio::sync::mpsc::UnboundedReceiver<AppliedBatch>,
    threads: Vec<std::thread::JoinHandle<()>>,
    abandoned: Arc<AtomicBool>,
    /// Batches submitted and not yet taken back with [`BatchPipeline::take_applied`].
    in_flight: usize,
}

impl BatchPipeline {
    fn start(
        state: Arc<StateStore>,
        mapping: crate::events::RelevanceMapping,
        decoder: BatchDecoder,
        dead_letters: DeadLetterSender,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let (batches, pending) = std::sync::mpsc::channel::<RawBatch>();
        let (prepared_sender, prepared) = std::sync::mpsc::channel::<PreparedHandoff>();
        let (applied_sender, applied) = tokio::sync::mpsc::unbounded_channel();
        // Written batches go back to the preparer to be freed: their records were allocated
        // there, so freeing them there is the allocator's fast path, and the writer (the
        // pipeline's bottleneck) spent ~18 % of its time in those frees (perf, 2026-11-26).
        let (spent_sender, spent) = std::sync::mpsc::channel::<PreparedBatch>();
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = StopSignal { shutdown, abandoned: Arc::clone(&abandoned) };
        let preparer = std::thread::Builder::new()
            .name("batch-preparer".into())
            .spawn(move || {
                for raw in pending {
                    let cpu_before = crate::metrics::thread_cpu_time();
                    spent.try_iter().for_each(drop);
                    let (records, rejected) = decoder.decode(&raw);
                    drop(raw);
                    let prepared = dead_letters.deliver_blocking(&rejected, &stop).map(|()| PreparedBatch::prepare(records));
                    // A batch whose dead letters could not be delivered stops the pipeline: a
                    // later batch's offsets would otherwise cover its events.
                    let failed = prepared.is_err();
                    let prepare_cpu = crate::metrics::thread_cpu_time().saturating_sub(cpu_before);
                    if prepared_sender.send((prepared, prepare_cpu)).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the batch preparer thread")?;
        let writer = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                for (prepared, prepare_cpu) in prepared {
                    let (started, cpu_before) = (Instant::now(), crate::metrics::thread_cpu_time());
                    let report = prepared.and_then(|batch| Ok((state.apply_prepared(&batch, &mapping)?, batch)));
                    let (write_duration, completed) = (started.elapsed(), Instant::now());
                    // After a failed batch no later batch may land: its offsets would cover the
                    // failed batch's events. The consumer task stops on the error it receives.
                    let failed = report.is_err();
                    let report = report.map(|(report, batch)| {
                        // Once the preparer has stopped, the batch is dropped here instead.
                        let _ = spent_sender.send(batch);
                        report
                    });
                    let write_cpu = crate::metrics::thread_cpu_time().saturating_sub(cpu_before);
                    let applied = AppliedBatch { report, write_duration, completed, prepare_cpu, write_cpu };
                    if applied_sender.send(applied).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the state writer thread")?;
        Ok(Self { batches: Some(batches), applied, threads: vec![preparer, writer], abandoned, in_flight: 0 })
    }

    fn submit(&mut self, batch: RawBatch) -> anyhow::Result<()> {
        let sender = self.batches.as_ref().context("the batch pipeline is closed")?;
        sender.send(batch).map_err(|_| anyhow::anyhow!("the batch pipeline has stopped"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// The next written batch: waits for it when `wait`, else only takes one already written.
    async fn take_applied(&mut self, wait: bool) -> anyhow::Result<Option<AppliedBatch>> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let applied = if wait {
            self.applied.recv().await.context("the batch pipeline has stopped")?
        } else {
            match self.applied.try_recv() {
                Ok(applied) => applied,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => anyhow::bail!("the batch pipeline has stopped"),
            }
        };
        self.in_flight -= 1;
        Ok(Some(applied))
    }

    /// Stops the threads once they have finished what was submitted; a dead-letter delivery
    /// still retrying gives up.
    fn close(&mut self) {
        self.abandoned.store(true, Ordering::Release);
        self.batches = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a batch pipeline thread panicked");
            }
        }
    }
}

impl Drop for BatchPipeline {
    fn drop(&mut self) {
        self.close();
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

/// Lag of every assigned partition. The watermarks of all partitions come from two batched
/// ListOffsets round trips (earliest, latest), not two per partition: per-partition queries to
/// 80 partitions took ~30 s against the embedded broker and, made when a batch came back empty,
/// held the consume loop for that long (a stall seen in `bench ingest`).
fn partition_lags(consumer: &StreamConsumer<IngestContext>, state: &StateStore) -> anyhow::Result<Vec<PartitionLag>> {
    let assigned = consumer.context().assigned_partitions();
    if assigned.is_empty() {
        return Ok(Vec::new());
    }
    let low_watermarks = list_offsets(consumer, &assigned, Offset::Beginning)?;
    let high_watermarks = list_offsets(consumer, &assigned, Offset::End)?;
    let mut lags = Vec::with_capacity(assigned.len());
    for (topic, partition) in assigned {
        let key = (topic, partition);
        let (Some(&low_watermark), Some(&high_watermark)) = (low_watermarks.get(&key), high_watermarks.get(&key)) else {
            anyhow::bail!("the broker returned no watermark for {}/{}", key.0, key.1);
        };
        let (topic, partition) = key;
        let next_offset = state.next_offset(&topic, partition)?.unwrap_or(low_watermark).max(low_watermark);
        lags.push(PartitionLag { topic, partition, high_watermark, next_offset, lag: (high_watermark - next_offset).max(0) });
    }
    Ok(lags)
}

/// The earliest (`Offset::Beginning`) or latest (`Offset::End`) offset of each of `partitions`,
/// in one ListOffsets request per broker.
fn list_offsets(consumer: &StreamConsumer<IngestContext>, partitions: &BTreeSet<TopicPartition>, which: Offset) -> anyhow::Result<FxHashMap<(String, i32), i64>> {
    debug_assert!(matches!(which, Offset::Beginning | Offset::End));
    let mut request = TopicPartitionList::with_capacity(partitions.len());
    for (topic, partition) in partitions {
        request.add_partition_offset(topic, *partition, which).with_context(|| format!("listing offsets of {topic}/{partition}"))?;
    }
    let answer = consumer.offsets_for_times(request, Duration::from_secs(5)).context("listing partition offsets")?;
    let mut offsets = FxHashMap::default();
    for element in answer.elements() {
        element.error().with_context(|| format!("listing offsets of {}/{}", element.topic(), element.partition()))?;
        let Offset::Offset(offset) = element.offset() else {
            anyhow::bail!("the broker answered {:?} for {}/{}", element.offset(), element.topic(), element.partition());
        };
        offsets.insert((element.topic().to_owned(), element.partition()), offset);
    }
    Ok(offsets)
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
