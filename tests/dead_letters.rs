//! Every class of malformed event lands in `dead-letters` with its original bytes, its source
//! coordinates and a reason header, is counted in state, and the stream keeps flowing.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use merge_indexer::events::DeadLetterReason;
use merge_indexer::ingest::{Indexer, RunOptions};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_and_the_stream_keeps_flowing() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "dead-letters");
    config.validation.max_event_bytes = 4_096;
    config.validation.max_title_bytes = 100;
    config.kafka.embedded_partitions = 1;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let products = config.kafka.topics.products.clone();
    let queries = config.kafka.topics.query_events.clone();
    let oversize_event = format!(r#"{{"schema_version":1,"product_id":"X9","title":"t","description":"{}"}}"#, "d".repeat(5_000));
    let oversize_title = format!(r#"{{"schema_version":1,"product_id":"X10","title":"{}"}}"#, "t".repeat(101));
    let malformed: Vec<(&str, Option<&str>, String, DeadLetterReason)> = vec![
        (&products, Some("X1"), "{\"schema_version\":1,".into(), DeadLetterReason::InvalidJson),
        (&products, Some("X2"), "\"just a string\"".into(), DeadLetterReason::NotAnObject),
        (&products, Some("X3"), r#"{"schema_version":1,"product_id":"X3"}"#.into(), DeadLetterReason::MissingField),
        (&products, Some("X4"), r#"{"schema_version":1,"product_id":"X4","title":["a"]}"#.into(), DeadLetterReason::WrongType),
        (&products, Some("X5"), r#"{"schema_version":3,"product_id":"X5","title":"t"}"#.into(), DeadLetterReason::UnsupportedSchemaVersion),
        (&products, Some("X6"), r#"{"schema_version":1,"product_id":"X6","title":"t","op":"patch"}"#.into(), DeadLetterReason::UnknownOperation),
        (&products, Some("NOT-X7"), r#"{"schema_version":1,"product_id":"X7","title":"t"}"#.into(), DeadLetterReason::KeyMismatch),
        (&products, Some("X8"), r#"{"schema_version":1,"product_id":"X 8","title":"t"}"#.into(), DeadLetterReason::InvalidValue),
        (&products, Some("X9"), oversize_event, DeadLetterReason::OversizeEvent),
        (&products, Some("X10"), oversize_title, DeadLetterReason::OversizeField),
        (&queries, None, r#"{"schema_version":1,"query":"q","product_id":"P1","label":"Exact"}"#.into(), DeadLetterReason::UnknownLabel),
        (&queries, None, r#"{"schema_version":1,"query":"q","product_id":"P1","action":"wishlist"}"#.into(), DeadLetterReason::UnknownAction),
        (&queries, None, r#"{"schema_version":1,"query":"q","product_id":"P1","label":"E","action":"click"}"#.into(), DeadLetterReason::AmbiguousQueryEvent),
        (&queries, None, "".into(), DeadLetterReason::EmptyPayload),
    ];
    // Valid events before, between and after the bad ones.
    let mut messages = Vec::new();
    let mut valid_products = 0;
    for (index, (topic, key, payload, _)) in malformed.iter().enumerate() {
        let product_id = format!("OK{index}");
        messages.push(message(&products, Some(&product_id), &format!(r#"{{"schema_version":1,"product_id":"{product_id}","title":"fine {index}"}}"#)));
        valid_products += 1;
        messages.push(message(topic, *key, payload));
        messages.push(message(&queries, None, &format!(r#"{{"schema_version":1,"query":"good {index}","product_id":"{product_id}","label":"E"}}"#)));
    }
    produce(&config, &bootstrap, &messages).await;

    let state = open_state(&config);
    let summary = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(summary.outcomes.get("dead_lettered").copied(), Some(malformed.len() as u64));

    let counts = state.counts().unwrap();
    assert_eq!(counts.products, valid_products, "valid events around the bad ones were applied");
    assert_eq!(counts.judgement_pairs, malformed.len() as i64);
    let mut expected_counts: BTreeMap<String, i64> = BTreeMap::new();
    for (_, _, _, reason) in &malformed {
        *expected_counts.entry(reason.as_str().to_owned()).or_default() += 1;
    }
    assert_eq!(counts.dead_letters, expected_counts);

    let letters = read_dead_letters(&config, &bootstrap, malformed.len());
    assert_eq!(letters.len(), malformed.len(), "one dead letter per malformed event, no duplicates");
    for (topic, key, payload, reason) in &malformed {
        let letter = letters
            .iter()
            .find(|letter| letter.headers.get("reason").map(String::as_str) == Some(reason.as_str()))
            .unwrap_or_else(|| panic!("no dead letter with reason {reason}"));
        assert_eq!(letter.headers["source_topic"], *topic);
        assert!(letter.headers["source_offset"].parse::<i64>().is_ok());
        assert_eq!(letter.headers["source_partition"], "0");
        assert!(!letter.headers["detail"].is_empty());
        assert_eq!(letter.key.as_deref(), key.map(str::as_bytes), "original key kept");
        let original: &[u8] = payload.as_bytes();
        assert_eq!(letter.payload.as_deref().unwrap_or_default(), original, "original bytes kept for {reason}");
    }

    // Restarting does not dead-letter anything twice.
    drop(state);
    let state = open_state(&config);
    let again = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(again.outcomes.get("dead_lettered"), None);
    assert_eq!(read_dead_letters(&config, &bootstrap, malformed.len()).len(), malformed.len());
}

/// A batch is written only after Kafka has acknowledged its dead letters. While the broker
/// rejects every write to the dead-letter topic, the indexer keeps retrying, writes nothing of
/// the batch (not even the valid event before the bad one) and, asked to stop, says why; once
/// the broker accepts writes again, the dead letter lands exactly once and the whole batch is
/// applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_its_dead_letters_and_retries_failed_deliveries() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "dead-letter-retries");
    config.kafka.embedded_partitions = 1;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let products = config.kafka.topics.products.clone();
    let messages = vec![
        message(&products, Some("OK1"), r#"{"schema_version":1,"product_id":"OK1","title":"before"}"#),
        message(&products, Some("BAD"), "{not json"),
        message(&products, Some("OK2"), r#"{"schema_version":1,"product_id":"OK2","title":"after"}"#),
    ];
    produce(&config, &bootstrap, &messages).await;
    // From here on the broker refuses the next 6 produce requests. The indexer is stopped once it
    // has seen two of them refused (back-off 100 ms, then 200 ms), while it is retrying; the
    // restarted indexer meets the remaining refusals and retries past them.
    let refusal = rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    broker.fail_next_produce_requests(&[refusal; 6]).unwrap();

    let state = open_state(&config);
    let indexer = Arc::new(Indexer::connect(Arc::new(config.clone()), state.clone(), &bootstrap).unwrap());
    let (stop, shutdown) = watch::channel(false);
    let watched = Arc::clone(&indexer);
    let stopper = tokio::spawn(async move {
        wait_until_async("two refused dead-letter deliveries", Duration::from_secs(30), || watched.dead_letter_delivery_failures() >= 2).await;
        let _ = stop.send(true);
    });
    let stopped = tokio::time::timeout(Duration::from_secs(60), indexer.run(shutdown, RunOptions::default()))
        .await
        .expect("the indexer stops when asked, even while retrying");
    stopper.await.unwrap();
    let error = stopped.expect_err("a run that could not deliver its dead letters ends with an error").to_string();
    assert!(error.contains("dead letters were undelivered"), "unexpected error: {error}");
    assert_eq!(state.counts().unwrap().products, 0, "nothing of the batch was written");
    assert_eq!(state.next_offset(&products, 0).unwrap(), None, "no offset was stored");
    assert!(read_dead_letters(&config, &bootstrap, 0).is_empty(), "every delivery so far was refused");
    drop(indexer);

    // The broker accepts writes again once the remaining refusals are used up.
    let summary = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(summary.outcomes.get("dead_lettered").copied(), Some(1));
    assert_eq!(summary.outcomes.get("applied").copied(), Some(2));
    assert_eq!(state.counts().unwrap().products, 2);
    assert_eq!(state.next_offset(&products, 0).unwrap(), Some(3));
    let letters = read_dead_letters(&config, &bootstrap, 1);
    assert_eq!(letters.len(), 1, "delivered once, no duplicate from the refused attempts");
    assert_eq!(letters[0].headers["reason"], "invalid_json");
    assert_eq!(letters[0].payload.as_deref(), Some(b"{not json".as_slice()));
}
