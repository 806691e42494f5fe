//! End to end against a separate Kafka-compatible broker process (CI starts tansu; any Kafka
//! works): topics created through the Admin API, a synthetic catalog with malformed events,
//! the indexer until caught up, dead letters read back. Skipped, with a message, unless
//! `MERGE_INDEXER_E2E_BROKERS` names the broker (fails instead under
//! `MERGE_INDEXER_REQUIRE_TEST_INPUTS=1`, as in CI).

mod common;
mod inputs;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use merge_indexer::synth::{malformed_examples, SyntheticCatalog, SyntheticCatalogSpec};
use merge_indexer::kafka::topics::create_topics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_from_an_external_broker() {
    let Ok(brokers) = std::env::var("MERGE_INDEXER_E2E_BROKERS") else {
        inputs::skip_or_fail("indexes_from_an_external_broker", "MERGE_INDEXER_E2E_BROKERS is not set to a broker address (.ci/run starts tansu)");
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let unique = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    let mut config = test_config(directory.path(), &format!("e2e-{unique}"));
    config.kafka.topics.products = format!("products-{unique}");
    config.kafka.topics.query_events = format!("query-events-{unique}");
    config.kafka.topics.index_versions = format!("index-versions-{unique}");
    config.kafka.topics.dead_letters = format!("dead-letters-{unique}");
    let created = create_topics(&config.kafka, &brokers, Some(3), Some(1)).await.expect("topics created");
    assert_eq!(created.len(), 4);

    let catalog = SyntheticCatalog::generate(&SyntheticCatalogSpec { products: 200, queries: 30, ..Default::default() });
    let topics = &config.kafka.topics;
    let mut messages = catalog.messages(&topics.products, &topics.query_events);
    let malformed = malformed_examples(&topics.products, &topics.query_events);
    messages.extend(malformed.iter().cloned());
    produce(&config, &brokers, &messages).await;

    let state = open_state(&config);
    let summary = run_until_caught_up(&config, state.clone(), &brokers).await;
    assert_eq!(summary.records() as usize, messages.len());
    let counts = state.counts().unwrap();
    assert_eq!(counts.products as usize, catalog.products.len());
    assert_eq!(counts.dead_letters.values().sum::<i64>() as usize, malformed.len());
    let letters = read_dead_letters(&config, &brokers, malformed.len());
    assert_eq!(letters.len(), malformed.len());
    assert!(letters.iter().all(|letter| letter.headers.contains_key("reason")));
}
