//! Rebalances under load: a second member joins the indexer's consumer group mid-stream, takes
//! some partitions (the indexer's open batch loses their events), then leaves; the indexer gets
//! the partitions back, seeks to the offsets in its state, and ends with every event applied
//! exactly once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use merge_indexer::events::{encode_query_event, InteractionAction, QuerySignal};
use merge_indexer::kafka::{base_client_config, OutgoingMessage};
use merge_indexer::ingest::{Indexer, RunOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_taken_away_mid_stream_come_back_without_loss_or_duplicates() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "rebalance");
    config.kafka.embedded_partitions = 4;
    config.batch.max_events = 20;
    config.batch.max_wait_ms = 20;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let interactions = 20_000;
    let messages: Vec<OutgoingMessage> = (0..interactions)
        .map(|index| OutgoingMessage {
            topic: config.kafka.topics.query_events.clone(),
            key: Some(format!("k{}", index % 97).into_bytes()),
            payload: Some(encode_query_event(&format!("q{}", index % 50), None, "P1", QuerySignal::Interaction(InteractionAction::Click))),
        })
        .collect();
    produce(&config, &bootstrap, &messages).await;

    let state = open_state(&config);
    let indexer = Arc::new(Indexer::connect(Arc::new(config.clone()), state.clone(), &bootstrap).unwrap());
    let (stop, shutdown) = watch::channel(false);
    let running = {
        let indexer = Arc::clone(&indexer);
        tokio::spawn(async move { indexer.run(shutdown, RunOptions::default()).await })
    };

    // Wait for some progress, then let a second member join the group for a while.
    let applied = || -> i64 { state.stored_offsets().unwrap().values().sum() };
    let started = Instant::now();
    while applied() < 1_000 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let generation_before = indexer.rebalance_generation();
    let mut intruder_config = base_client_config(&config.kafka, &bootstrap).unwrap();
    intruder_config
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("auto.offset.reset", "earliest");
    let topics = [config.kafka.topics.products.clone(), config.kafka.topics.query_events.clone()];
    let intruder_assignment = tokio::task::spawn_blocking(move || {
        let intruder: BaseConsumer = intruder_config.create().unwrap();
        intruder.subscribe(&[topics[0].as_str(), topics[1].as_str()]).unwrap();
        // Up to 30 s for the group to rebalance (a slow machine took over 10 s once), then the
        // intruder holds its partitions for 3 s.
        let mut largest_assignment = 0;
        let mut first_assigned: Option<Instant> = None;
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && first_assigned.is_none_or(|assigned| assigned.elapsed() < Duration::from_secs(3)) {
            let _ = intruder.poll(Duration::from_millis(100));
            largest_assignment = largest_assignment.max(intruder.assignment().map(|list| list.count()).unwrap_or(0));
            if largest_assignment > 0 {
                first_assigned.get_or_insert_with(Instant::now);
            }
        }
        largest_assignment // dropping the intruder leaves the group: partitions go back
    })
    .await
    .unwrap();
    assert!(intruder_assignment > 0, "the second member received partitions");

    let started = Instant::now();
    while applied() < interactions as i64 && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    let summary = running.await.unwrap().unwrap();
    assert!(indexer.rebalance_generation() >= generation_before + 2, "revoke and re-assign happened");

    let mut clicks = 0u64;
    state.for_each_judgement(|_, aggregate| clicks += u64::from(aggregate.action_counts[1])).unwrap();
    assert_eq!(clicks, interactions as u64, "every click counted exactly once across the rebalances");
    assert_eq!(applied(), interactions as i64, "stored offsets equal the events produced");
    eprintln!("revoked events dropped from open batches: {}", summary.revoked_events_dropped);
}
