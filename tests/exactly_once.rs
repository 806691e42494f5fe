//! Exactly-once ingest: the consumer is stopped abruptly many times — between batches, inside
//! an open batch, and by SIGKILL of a separate process — and every event's effect must be in
//! state exactly once, with the stored offsets equal to the number of messages produced.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use merge_indexer::config::Config;
use merge_indexer::events::{encode_product_upsert, encode_query_event, InteractionAction, ProductContent, QuerySignal};
use merge_indexer::kafka::OutgoingMessage;
use merge_indexer::ingest::RunOptions;
use merge_indexer::state::StateStore;
use tokio::sync::watch;

/// `products` product upserts plus `interactions` interaction events spread over 40 queries.
/// Every interaction adds exactly one to one action counter, so the sum of all counters
/// equals the number of interactions applied — a double apply or a loss changes the sum.
fn workload(config: &Config, products: usize, interactions: usize) -> Vec<OutgoingMessage> {
    let topics = &config.kafka.topics;
    let mut messages = Vec::new();
    for index in 0..products {
        let product_id = format!("P{index:05}");
        let content = ProductContent::with_title(format!("product {index}"));
        messages.push(OutgoingMessage {
            topic: topics.products.clone(),
            key: Some(product_id.clone().into_bytes()),
            payload: Some(encode_product_upsert(&product_id, &content)),
        });
    }
    for index in 0..interactions {
        let action = InteractionAction::ALL[index % 4];
        let payload = encode_query_event(&format!("query {}", index % 40), None, &format!("P{:05}", index % products), QuerySignal::Interaction(action));
        messages.push(OutgoingMessage { topic: topics.query_events.clone(), key: None, payload: Some(payload) });
    }
    messages
}

fn assert_exactly_once(state: &StateStore, config: &Config, bootstrap: &str, products: usize, interactions: usize) {
    let mut action_total = 0u64;
    let mut per_action = [0u64; 4];
    state
        .for_each_judgement(|_, aggregate| {
            for (slot, count) in aggregate.action_counts.iter().enumerate() {
                per_action[slot] += u64::from(*count);
                action_total += u64::from(*count);
            }
        })
        .unwrap();
    assert_eq!(action_total, interactions as u64, "each interaction counted exactly once");
    for count in per_action {
        assert_eq!(count, (interactions / 4) as u64);
    }
    let counts = state.counts().unwrap();
    assert_eq!(counts.products, products as i64);
    let offsets = state.stored_offsets().unwrap();
    let sum_for = |topic: &str| -> i64 { offsets.iter().filter(|((name, _), _)| name == topic).map(|(_, next)| next).sum() };
    assert_eq!(sum_for(&config.kafka.topics.products), products as i64, "stored offsets cover every product message");
    assert_eq!(sum_for(&config.kafka.topics.query_events), interactions as i64, "stored offsets cover every query event");
    // Per partition: the stored next offset is the partition's high watermark, and partitions
    // that received nothing (null-key messages are sticky-partitioned) have no entry.
    let watermarks = high_watermarks(config, bootstrap);
    let non_empty: std::collections::BTreeMap<(String, i32), i64> =
        watermarks.into_iter().filter(|(_, high)| *high > 0).collect();
    assert_eq!(offsets, non_empty, "stored offsets equal the high watermarks");
    let applied: i64 = counts.events.iter().filter(|(name, _)| name.ends_with("/applied")).map(|(_, count)| count).sum();
    assert_eq!(applied, (products + interactions) as i64, "event counters match");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_stops_between_and_inside_batches_apply_each_event_once() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "exactly-once-in-process");
    config.batch.max_events = 37;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let (products, interactions) = (300, 2_400);
    produce(&config, &bootstrap, &workload(&config, products, interactions)).await;

    // Stops right after a batch was written (no final commit, consumer dropped).
    for max_batches in [1, 4, 9] {
        let state = open_state(&config);
        let summary = run_indexer(&config, state, &bootstrap, RunOptions { stop_when_caught_up: false, max_batches: Some(max_batches) }, Duration::from_secs(60)).await;
        assert_eq!(summary.batches, max_batches);
        // Each stage's thread reports the CPU time its batches took (bench ingest and the
        // merge_indexer_batch_cpu_seconds histogram rest on these).
        assert!(summary.prepare_cpu_seconds > 0.0, "preparer CPU time recorded: {summary:?}");
        assert!(summary.write_cpu_seconds > 0.0, "writer CPU time recorded: {summary:?}");
    }
    // Stops inside an open batch: a monitor fires shutdown once progress passes a threshold,
    // while the next batch is being collected from a topic that still has events.
    let total = (products + interactions) as i64;
    for threshold in [0.3f64, 0.5, 0.7] {
        let state = open_state(&config);
        let indexer = merge_indexer::ingest::Indexer::connect(std::sync::Arc::new(config.clone()), state.clone(), &bootstrap).unwrap();
        let (sender, shutdown) = watch::channel(false);
        let monitor = tokio::spawn(async move {
            loop {
                let applied: i64 = state.stored_offsets().unwrap().values().sum();
                if applied as f64 >= threshold * total as f64 {
                    let _ = sender.send(true);
                    return applied;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        indexer.run(shutdown, RunOptions::default()).await.unwrap();
        let stopped_at = monitor.await.unwrap();
        assert!(stopped_at < total, "stopped before the end of the stream");
    }
    let progress = open_state(&config).stored_offsets().unwrap().values().sum::<i64>();
    assert!(progress < (products + interactions) as i64, "the interrupted runs must not have finished the stream ({progress})");

    let state = open_state(&config);
    let summary = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert!(summary.records() > 0);
    assert_exactly_once(&state, &config, &bootstrap, products, interactions);

    // Running again over the same stream changes nothing: every event is already applied.
    drop(state);
    let state = open_state(&config);
    let before = state.counts().unwrap();
    run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(state.counts().unwrap(), before);
}

/// Kills a real `merge-indexer run` process with SIGKILL at several points of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_indexer_process_neither_loses_nor_duplicates() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "exactly-once-sigkill");
    config.batch.max_events = 25;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let (products, interactions) = (500, 12_000);
    let total = (products + interactions) as i64;
    produce(&config, &bootstrap, &workload(&config, products, interactions)).await;
    let config_file = directory.path().join("indexer.toml");
    std::fs::write(
        &config_file,
        format!(
            // fsync per batch: the durable setting, and slow enough (hundreds of small batches)
            // that the kills land mid-stream even on a fast machine.
            "state_dir = {:?}\n[kafka]\ngroup_id = \"sigkill\"\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n[batch]\nmax_events = 25\nmax_wait_ms = 20\n[state]\nsync_writes = true\n",
            directory.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let state_dir = directory.path().join("state");
    let mut kill_points = BTreeMap::new();
    for (round, threshold) in [0.1f64, 0.35, 0.6, 0.85].into_iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_merge-indexer"))
            .args(["--config", config_file.to_str().unwrap(), "run", "--brokers", &bootstrap, "--metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("merge-indexer starts");
        let started = Instant::now();
        let mut applied = 0;
        while started.elapsed() < Duration::from_secs(90) {
            tokio::time::sleep(Duration::from_millis(30)).await;
            applied = applied_offsets(&state_dir);
            if applied as f64 >= threshold * total as f64 {
                break;
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        let after_kill = applied_offsets(&state_dir);
        kill_points.insert(round, after_kill);
        assert!(after_kill >= applied);
    }
    eprintln!("events applied at each SIGKILL: {kill_points:?} of {total}");
    assert!(kill_points.values().any(|&applied| applied > 0 && applied < total), "at least one kill mid-stream: {kill_points:?}");
    let config = Config { state_dir: state_dir.clone(), ..config };
    let state = open_state(&config);
    run_until_caught_up(&Config { kafka: merge_indexer::config::KafkaConfig { group_id: "sigkill".into(), ..config.kafka.clone() }, ..config.clone() }, state.clone(), &bootstrap).await;
    assert_exactly_once(&state, &config, &bootstrap, products, interactions);
}

/// Sum of stored next offsets, read through a read-only view beside the writer.
fn applied_offsets(state_dir: &std::path::Path) -> i64 {
    if !state_dir.join("CURRENT").exists() {
        return 0;
    }
    // A read-only open races with the writer's file rotation now and then: retry, and say so.
    for attempt in 1..=5 {
        match StateStore::open_read_only(state_dir).map_err(|error| error.to_string()).and_then(|state| state.stored_offsets().map_err(|error| error.to_string())) {
            Ok(offsets) => return offsets.values().sum(),
            Err(error) => eprintln!("reading offsets (attempt {attempt}): {error}"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    0
}
