//! Helpers shared by the integration tests: an embedded broker with our topics, a producer,
//! a dead-letter reader and an indexer over a temporary state directory.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use merge_indexer::config::Config;
use merge_indexer::kafka::{base_client_config, produce_all, reliable_producer, EmbeddedBroker, OutgoingMessage};
use merge_indexer::ingest::{Indexer, RunOptions, RunSummary};
use merge_indexer::state::{StateOptions, StateStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

/// A config for tests: small batches, short windows, unique group.
pub fn test_config(state_dir: &Path, group_id: &str) -> Config {
    let mut config = Config { state_dir: state_dir.to_owned(), ..Config::default() };
    config.kafka.group_id = group_id.to_owned();
    config.kafka.embedded_partitions = 3;
    config.batch.max_events = 100;
    config.batch.max_wait_ms = 50;
    config.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    config.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    config
}

/// Starts the embedded broker with the topics of `config`.
pub fn start_broker(config: &Config) -> EmbeddedBroker {
    EmbeddedBroker::start_for(config).expect("embedded broker starts")
}

/// Produces messages and waits for all acknowledgements.
pub async fn produce(config: &Config, bootstrap: &str, messages: &[OutgoingMessage]) {
    let producer = reliable_producer(&config.kafka, bootstrap).expect("producer");
    let delivered = produce_all(&producer, messages).await.expect("delivery");
    assert_eq!(delivered, messages.len());
}

/// Polls `condition` every 20 ms until it holds; fails the test, naming `what`, once `timeout`
/// passes. For waits on a condition instead of fixed sleeps.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for async tests: yields to the runtime between polls.
pub async fn wait_until_async(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message for `topic` with an optional key.
pub fn message(topic: &str, key: Option<&str>, payload: &str) -> OutgoingMessage {
    OutgoingMessage { topic: topic.into(), key: key.map(|key| key.as_bytes().to_vec()), payload: Some(payload.as_bytes().to_vec()) }
}

/// Opens the state of `config`.
pub fn open_state(config: &Config) -> Arc<StateStore> {
    Arc::new(StateStore::open(&config.state_dir, &StateOptions::default()).expect("state opens"))
}

/// Runs an indexer over `state` with `options`; gives up after `limit`.
pub async fn run_indexer(config: &Config, state: Arc<StateStore>, bootstrap: &str, options: RunOptions, limit: Duration) -> RunSummary {
    let indexer = Indexer::connect(Arc::new(config.clone()), state, bootstrap).expect("indexer connects");
    let (_sender, shutdown) = watch::channel(false);
    tokio::time::timeout(limit, indexer.run(shutdown, options)).await.expect("indexer finished in time").expect("indexer ran")
}

/// Runs an indexer until every partition is caught up.
pub async fn run_until_caught_up(config: &Config, state: Arc<StateStore>, bootstrap: &str) -> RunSummary {
    run_indexer(config, state, bootstrap, RunOptions { stop_when_caught_up: true, max_batches: None }, Duration::from_secs(120)).await
}

/// A message read back from the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub payload: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Reads every message of the dead-letter topic (partition 0) from the beginning.
pub fn read_dead_letters(config: &Config, bootstrap: &str, expected: usize) -> Vec<DeadLetter> {
    let mut client_config = base_client_config(&config.kafka, bootstrap).unwrap();
    // Manual assignment, no group membership; librdkafka still wants a group id.
    client_config.set("group.id", "dead-letter-reader").set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client_config.create().unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&config.kafka.topics.dead_letters, 0, Offset::Beginning).unwrap();
    consumer.assign(&assignment).unwrap();
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while letters.len() < expected && std::time::Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = result.expect("dead-letter consume");
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key.to_owned(), String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        letters.push(DeadLetter { payload: message.payload().map(<[u8]>::to_vec), key: message.key().map(<[u8]>::to_vec), headers });
    }
    // One more short poll: more than `expected` would be a bug (a duplicate dead letter).
    if let Some(Ok(extra)) = consumer.poll(Duration::from_millis(500)) {
        letters.push(DeadLetter { payload: extra.payload().map(<[u8]>::to_vec), key: extra.key().map(<[u8]>::to_vec), headers: Default::default() });
    }
    letters
}

/// High watermark of every partition of `products` and `query-events`.
pub fn high_watermarks(config: &Config, bootstrap: &str) -> std::collections::BTreeMap<(String, i32), i64> {
    let consumer: BaseConsumer = base_client_config(&config.kafka, bootstrap).unwrap().create().unwrap();
    let mut watermarks = std::collections::BTreeMap::new();
    for topic in [&config.kafka.topics.products, &config.kafka.topics.query_events] {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        for partition in metadata.topics()[0].partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10)).expect("watermarks");
            watermarks.insert((topic.clone(), partition.id()), high);
        }
    }
    watermarks
}
