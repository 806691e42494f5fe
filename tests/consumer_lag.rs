//! Consumer lag (the `merge_indexer_consumer_lag_messages` gauge and the caught-up check behind
//! `demo` and `bench ingest`): per assigned partition, the broker's high watermark minus the
//! next offset stored in state.

mod common;

use std::sync::Arc;

use common::*;
use merge_indexer::events::{encode_product_upsert, ProductContent};
use merge_indexer::kafka::OutgoingMessage;
use merge_indexer::ingest::{Indexer, RunOptions};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_the_high_watermark_minus_the_stored_offset_and_reaches_zero() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "consumer-lag");
    config.batch.max_events = 40;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    // Keyed product upserts spread over the topic's three partitions.
    let messages: Vec<OutgoingMessage> = (0..600)
        .map(|index| {
            let product_id = format!("P{index:04}");
            let payload = encode_product_upsert(&product_id, &ProductContent::with_title(format!("product {index}")));
            OutgoingMessage { topic: config.kafka.topics.products.clone(), key: Some(product_id.into_bytes()), payload: Some(payload) }
        })
        .collect();
    produce(&config, &bootstrap, &messages).await;
    let watermarks = high_watermarks(&config, &bootstrap);

    let state = open_state(&config);
    let indexer = Indexer::connect(Arc::new(config.clone()), state.clone(), &bootstrap).unwrap();
    let (_sender, shutdown) = watch::channel(false);
    indexer.run(shutdown.clone(), RunOptions { stop_when_caught_up: false, max_batches: Some(3) }).await.unwrap();
    let lags = indexer.partition_lags_async().await.unwrap();
    assert_eq!(lags.len(), 2 * config.kafka.embedded_partitions as usize, "every assigned partition of both topics: {lags:?}");
    for lag in &lags {
        let high = watermarks[&(lag.topic.clone(), lag.partition)];
        let next = state.next_offset(&lag.topic, lag.partition).unwrap().unwrap_or(0);
        assert_eq!((lag.high_watermark, lag.next_offset, lag.lag), (high, next, high - next), "{lag:?}");
    }
    let applied: i64 = state.stored_offsets().unwrap().values().sum();
    assert!(applied > 0 && applied < 600, "three batches applied part of the stream ({applied})");
    assert_eq!(lags.iter().map(|lag| lag.lag).sum::<i64>(), 600 - applied);

    // The same indexer runs on until it is caught up; then every lag is zero.
    indexer.run(shutdown, RunOptions { stop_when_caught_up: true, max_batches: None }).await.unwrap();
    let lags = indexer.partition_lags_async().await.unwrap();
    assert!(!lags.is_empty() && lags.iter().all(|lag| lag.lag == 0), "{lags:?}");
    assert_eq!(state.stored_offsets().unwrap().values().sum::<i64>(), 600);
}
