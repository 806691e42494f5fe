//! The topic layout as `topics/topics.json` specifies it (embedded at build time, so the
//! binary and the documented spec cannot drift), and `merge-indexer topics create`, which
//! creates the topics on a cluster with the Kafka Admin API.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;

use crate::config::KafkaConfig;
use crate::kafka::base_client_config;

/// `topics/topics.json`, compiled in.
pub const TOPICS_SPEC_JSON: &str = include_str!("../../topics/topics.json");

/// One topic of the spec.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TopicSpec {
    /// Default name (the configuration may rename it).
    pub name: String,
    /// Recommended partitions.
    pub partitions: i32,
    /// Recommended replication factor.
    pub replication_factor: i32,
    /// Topic-level configuration (`cleanup.policy`, `retention.ms`, …).
    pub config: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TopicsSpecFile {
    topics: Vec<TopicSpec>,
}

/// The four topics of the spec, with the names `kafka.topics` gives them.
pub fn topic_specs(kafka: &KafkaConfig) -> anyhow::Result<Vec<TopicSpec>> {
    let file: TopicsSpecFile = serde_json::from_str(TOPICS_SPEC_JSON).context("parsing the embedded topics/topics.json")?;
    let names = &kafka.topics;
    file.topics
        .into_iter()
        .map(|mut spec| {
            spec.name = match spec.name.as_str() {
                "products" => names.products.clone(),
                "query-events" => names.query_events.clone(),
                "index-versions" => names.index_versions.clone(),
                "dead-letters" => names.dead_letters.clone(),
                other => bail!("topics/topics.json names an unknown topic {other:?}"),
            };
            Ok(spec)
        })
        .collect()
}

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicCreation {
    /// Created now.
    Created,
    /// It already existed (left unchanged).
    AlreadyExists,
}

/// Creates every topic of the spec that does not exist yet. `partitions` and
/// `replication_factor` override the spec (a one-broker test cluster needs replication 1).
pub async fn create_topics(
    kafka: &KafkaConfig,
    bootstrap_servers: &str,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
) -> anyhow::Result<Vec<(String, TopicCreation)>> {
    let specs = topic_specs(kafka)?;
    let admin: AdminClient<DefaultClientContext> =
        base_client_config(kafka, bootstrap_servers)?.create().context("creating Kafka admin client")?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            let partitions = if spec.partitions > 1 { partitions.unwrap_or(spec.partitions) } else { 1 };
            let replication = TopicReplication::Fixed(replication_factor.unwrap_or(spec.replication_factor));
            let mut topic = NewTopic::new(&spec.name, partitions, replication);
            for (key, value) in &spec.config {
                if key == "min.insync.replicas" && replication_factor.is_some_and(|factor| factor < 2) {
                    continue;
                }
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new_topics, &options).await.context("CreateTopics request")?;
    let mut outcomes = Vec::new();
    for result in results {
        match result {
            Ok(name) => outcomes.push((name, TopicCreation::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => outcomes.push((name, TopicCreation::AlreadyExists)),
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_covers_the_four_topics_under_their_configured_names() {
        let mut kafka = KafkaConfig::default();
        kafka.topics.dead_letters = "catalog.dead-letters".into();
        let specs = topic_specs(&kafka).unwrap();
        let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
        assert_eq!(names, ["products", "query-events", "index-versions", "catalog.dead-letters"]);
        assert_eq!(specs[0].config["cleanup.policy"], "compact", "products is compacted");
    }
}
