//! The topic specs in `topics/` agree with the code: valid examples pass the JSON Schemas and
//! the decoders; invalid examples fail both, the decoder with the stated reason.

use std::path::{Path, PathBuf};

use merge_indexer::config::TopicNames;
use merge_indexer::events::{decode_product_event, decode_query_event, DeadLetterReason, ValidationLimits};
use serde_json::Value;

fn topics_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topics")
}

fn load_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))).unwrap()
}

fn validator(topic: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&load_json(&topics_dir().join(topic).join("schema.json"))).expect("schema compiles")
}

fn example_lines(topic: &str) -> Vec<String> {
    let text = std::fs::read_to_string(topics_dir().join(topic).join("examples.jsonl")).unwrap();
    text.lines().filter(|line| !line.trim().is_empty()).map(str::to_owned).collect()
}

#[test]
fn valid_examples_pass_schema_and_decoder() {
    let limits = ValidationLimits::default();
    for topic in ["products", "query-events", "index-versions", "dead-letters"] {
        let schema = validator(topic);
        let lines = example_lines(topic);
        assert!(!lines.is_empty(), "{topic} has examples");
        for line in lines {
            let value: Value = serde_json::from_str(&line).unwrap();
            let errors: Vec<String> = schema.iter_errors(&value).map(|error| error.to_string()).collect();
            assert!(errors.is_empty(), "{topic} example fails its schema: {errors:?}\n{line}");
            match topic {
                "products" => {
                    let key = value["product_id"].as_str().map(str::as_bytes);
                    decode_product_event(key, Some(line.as_bytes()), &limits).unwrap_or_else(|error| panic!("{error}: {line}"));
                }
                "query-events" => {
                    decode_query_event(Some(line.as_bytes()), &limits).unwrap_or_else(|error| panic!("{error}: {line}"));
                }
                "dead-letters" => {
                    let reason = value["reason"].as_str().unwrap();
                    assert!(DeadLetterReason::from_name(reason).is_some());
                }
                _ => {}
            }
        }
    }
}

#[test]
fn invalid_examples_fail_schema_and_decoder_with_their_reason() {
    let limits = ValidationLimits::default();
    let examples = load_json(&topics_dir().join("invalid-examples.json"));
    let mut reasons_seen = std::collections::BTreeSet::new();
    for example in examples.as_array().unwrap() {
        let topic = example["topic"].as_str().unwrap();
        let payload = example["payload"].as_str().unwrap();
        let expected = DeadLetterReason::from_name(example["reason"].as_str().unwrap()).expect("known reason");
        let error = match topic {
            "products" => {
                let key = example.get("key").and_then(Value::as_str).map(str::as_bytes);
                decode_product_event(key, Some(payload.as_bytes()), &limits).expect_err(payload)
            }
            "query-events" => decode_query_event(Some(payload.as_bytes()), &limits).expect_err(payload),
            other => panic!("unexpected topic {other}"),
        };
        assert_eq!(error.reason, expected, "{payload}");
        reasons_seen.insert(expected);
        // A key mismatch is about the Kafka key, which the value's schema cannot see.
        if expected == DeadLetterReason::KeyMismatch {
            continue;
        }
        if let Ok(value) = serde_json::from_str::<Value>(payload) {
            assert!(!validator(topic).is_valid(&value), "schema accepts an invalid example: {payload}");
        }
    }
    assert!(reasons_seen.len() >= 13, "invalid examples cover the reasons: {reasons_seen:?}");
}

#[test]
fn dead_letter_schema_lists_every_reason() {
    let schema = load_json(&topics_dir().join("dead-letters/schema.json"));
    let listed: Vec<&str> = schema["properties"]["reason"]["enum"].as_array().unwrap().iter().map(|value| value.as_str().unwrap()).collect();
    let known: Vec<&str> = DeadLetterReason::ALL.iter().map(|reason| reason.as_str()).collect();
    assert_eq!(listed, known);
}

#[test]
fn topic_specs_match_default_names() {
    let names = TopicNames::default();
    let spec = load_json(&topics_dir().join("topics.json"));
    let specified: Vec<&str> = spec["topics"].as_array().unwrap().iter().map(|topic| topic["name"].as_str().unwrap()).collect();
    assert_eq!(specified, [names.products.as_str(), names.query_events.as_str(), names.index_versions.as_str(), names.dead_letters.as_str()]);
    for name in specified {
        assert!(topics_dir().join(name).join("README.md").exists(), "{name} has a spec");
    }
}
