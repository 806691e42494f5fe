//! Every class of malformed event lands in `dead-letters` with its original bytes, its source
//! coordinates and a reason header, is counted in state, and the stream keeps flowing.

mod common;

use std::collections::BTreeMap;

use common::*;
use merge_indexer::events::DeadLetterReason;

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
