//! Kafka plumbing shared by ingest, the producer commands and the benchmarks: client
//! configuration with pass-through properties, reliable producers, JSONL → messages, the embedded
//! broker (librdkafka's mock cluster) used when no `--brokers` is given, and topic administration
//! ([`topics`]).
//!
//! Owns every Kafka client setting. May read `config`; must not touch state or decode events.

pub mod topics;

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::config::{Config, KafkaConfig, TopicNames};

/// Base client configuration: bootstrap servers, client id and every pass-through property
/// (secrets resolved from the environment). Consumer- or producer-specific keys are added by
/// the callers.
pub fn base_client_config(kafka: &KafkaConfig, bootstrap_servers: &str) -> anyhow::Result<ClientConfig> {
    let mut client_config = ClientConfig::new();
    client_config.set("bootstrap.servers", bootstrap_servers);
    client_config.set("client.id", &kafka.client_id);
    for (property, value) in kafka.resolved_properties()? {
        client_config.set(property, value);
    }
    Ok(client_config)
}

/// A producer that waits for all in-sync replicas and never duplicates on retry.
pub fn reliable_producer(kafka: &KafkaConfig, bootstrap_servers: &str) -> anyhow::Result<FutureProducer> {
    let mut client_config = base_client_config(kafka, bootstrap_servers)?;
    client_config.set("acks", "all");
    client_config.set("enable.idempotence", "true");
    client_config.set("linger.ms", "5");
    client_config.set("message.timeout.ms", "30000");
    client_config.create().context("creating Kafka producer")
}

/// Topics the embedded cluster creates, with their partition counts.
pub fn embedded_topic_layout(kafka: &KafkaConfig) -> Vec<(String, i32)> {
    let TopicNames { products, query_events, index_versions, dead_letters } = &kafka.topics;
    vec![
        (products.clone(), kafka.embedded_partitions),
        (query_events.clone(), kafka.embedded_partitions),
        (index_versions.clone(), 1),
        (dead_letters.clone(), 1),
    ]
}

/// librdkafka's in-process mock cluster, a real Kafka-protocol broker on loopback. It lives
/// on its own thread (the handle is not `Send`) until this value is dropped.
pub struct EmbeddedBroker {
    bootstrap_servers: String,
    control: Option<mpsc::Sender<BrokerControl>>,
    thread: Option<JoinHandle<()>>,
}

/// Requests to the embedded broker's thread (the mock cluster handle is not `Send`).
enum BrokerControl {
    /// Fail the next Produce requests with these errors, in order; acknowledged when set.
    FailProduceRequests(Vec<RDKafkaRespErr>, mpsc::Sender<()>),
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EmbeddedBroker").field("bootstrap_servers", &self.bootstrap_servers).finish()
    }
}

impl EmbeddedBroker {
    /// Starts a one-broker mock cluster and creates `topics` (name, partitions) on it.
    pub fn start(topics: &[(String, i32)]) -> anyhow::Result<Self> {
        let (ready_sender, ready_receiver) = mpsc::channel::<anyhow::Result<String>>();
        let (control_sender, control_receiver) = mpsc::channel::<BrokerControl>();
        let topics = topics.to_vec();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let started = MockCluster::new(1).map_err(|error| anyhow!("starting mock cluster: {error}")).and_then(|cluster| {
                    for (topic, partitions) in &topics {
                        cluster
                            .create_topic(topic, *partitions, 1)
                            .map_err(|error| anyhow!("creating topic {topic}: {error}"))?;
                    }
                    Ok(cluster)
                });
                let cluster = match started {
                    Ok(cluster) => cluster,
                    Err(error) => {
                        let _ = ready_sender.send(Err(error));
                        return;
                    }
                };
                let _ = ready_sender.send(Ok(cluster.bootstrap_servers()));
                // Serves control requests until the handle is dropped, then shuts down.
                for request in control_receiver {
                    match request {
                        BrokerControl::FailProduceRequests(errors, done) => {
                            cluster.request_errors(RDKafkaApiKey::Produce, &errors);
                            let _ = done.send(());
                        }
                    }
                }
                drop(cluster);
            })
            .context("spawning the embedded broker thread")?;
        let bootstrap_servers = ready_receiver
            .recv_timeout(Duration::from_secs(30))
            .context("embedded broker did not start within 30 s")??;
        Ok(Self { bootstrap_servers, control: Some(control_sender), thread: Some(thread) })
    }

    /// Starts the embedded broker with the topics of `config`.
    pub fn start_for(config: &Config) -> anyhow::Result<Self> {
        Self::start(&embedded_topic_layout(&config.kafka))
    }

    /// The `bootstrap.servers` string of the embedded broker (`127.0.0.1:PORT`).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Fault injection: the broker answers its next `errors.len()` Produce requests (from any
    /// client) with these errors, one per request, in order, instead of storing the messages.
    /// For tests of delivery failures; returns once the errors are in place.
    pub fn fail_next_produce_requests(&self, errors: &[RDKafkaRespErr]) -> anyhow::Result<()> {
        let control = self.control.as_ref().context("the embedded broker has stopped")?;
        let (done, acknowledged) = mpsc::channel();
        control
            .send(BrokerControl::FailProduceRequests(errors.to_vec(), done))
            .map_err(|_| anyhow!("the embedded broker thread has stopped"))?;
        acknowledged.recv_timeout(Duration::from_secs(10)).context("the embedded broker did not take the errors")
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Dropping the control channel ends the broker thread's loop.
        self.control = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Destination topic.
    pub topic: String,
    /// Message key, if any.
    pub key: Option<Vec<u8>>,
    /// Payload; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
}

/// Produces `messages` in order per key and waits for every delivery; returns how many were
/// delivered or the first error.
pub async fn produce_all(producer: &FutureProducer, messages: &[OutgoingMessage]) -> anyhow::Result<usize> {
    use futures::stream::{FuturesOrdered, StreamExt};
    let mut in_flight = FuturesOrdered::new();
    let mut delivered = 0usize;
    for message in messages {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&message.topic);
        if let Some(key) = &message.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &message.payload {
            record = record.payload(payload.as_slice());
        }
        in_flight.push_back(producer.send(record, Duration::from_secs(30)));
        // Bound memory and keep the producer queue below its limit.
        if in_flight.len() >= 10_000 {
            if let Some(result) = in_flight.next().await {
                result.map_err(|(error, _)| anyhow!("delivery failed: {error}"))?;
                delivered += 1;
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        result.map_err(|(error, _)| anyhow!("delivery failed: {error}"))?;
        delivered += 1;
    }
    Ok(delivered)
}

/// Reads a JSONL file into messages, one per non-blank line, unchanged. For the products
/// topic the key is the line's `product_id` when the line is JSON with one (so compaction
/// works), otherwise no key.
pub fn jsonl_messages(path: &std::path::Path, topic: &str, keyed_by_product_id: bool) -> anyhow::Result<Vec<OutgoingMessage>> {
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
