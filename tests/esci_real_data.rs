//! Real data: the ESCI (Amazon Shopping Queries) subset in ../shared/data/esci goes through the
//! embedded broker into state. Skipped, with a message, where the folder is absent (fails instead
//! under `MERGE_INDEXER_REQUIRE_TEST_INPUTS=1`, as in CI).

mod common;
mod inputs;

use common::*;
use merge_indexer::eval::datasets::{default_esci_dir, EsciDataset, ESCI_DIR_ENV};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esci_products_and_judgements_are_ingested() {
    let esci_dir = default_esci_dir();
    if !esci_dir.join("products.jsonl").exists() {
        let missing = format!("ESCI data not found at {} (set {ESCI_DIR_ENV} to its folder)", esci_dir.display());
        inputs::skip_or_fail("esci_products_and_judgements_are_ingested", &missing);
        return;
    }
    let dataset = EsciDataset::load(&esci_dir).expect("ESCI loads");
    assert!(dataset.products.len() > 2_000, "the subset has ~2.6k products");
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "esci");
    config.batch.max_events = 500;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let messages = dataset.messages(&config.kafka.topics.products, &config.kafka.topics.query_events);
    produce(&config, &bootstrap, &messages).await;

    let state = open_state(&config);
    let summary = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(summary.records() as usize, messages.len());
    assert_eq!(summary.outcomes.get("dead_lettered"), None, "real ESCI rows are all valid events");

    let counts = state.counts().unwrap();
    assert_eq!(counts.products as usize, dataset.products.len());
    let pairs = dataset.distinct_pairs();
    assert_eq!(counts.judgement_pairs as usize, pairs.len());
    // Every judged product is in the subset, so no pair lacks its product.
    assert_eq!(state.count_judgements_without_product().unwrap(), 0);
    // Each stored pair's max level is the highest label ESCI gave it.
    for judgement in &dataset.judgements {
        let stored = state.judgement(&judgement.locale, &judgement.query, &judgement.product_id).unwrap().expect("pair stored");
        let max_label = dataset
            .judgements
            .iter()
            .filter(|other| other.locale == judgement.locale && other.query == judgement.query && other.product_id == judgement.product_id)
            .map(|other| other.level)
            .max();
        assert_eq!(stored.max_level, max_label);
    }
    // Multilingual text survives byte for byte.
    let (product_id, payload) = dataset.products.iter().find(|(id, _)| id.starts_with("jp:")).expect("a jp product");
    let stored = state.product(product_id).unwrap().expect("jp product stored");
    let original: serde_json::Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(stored.content.title, original["title"].as_str().unwrap());
}
