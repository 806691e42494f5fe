//! The binary end to end: `demo` on the embedded default indexes a synthetic catalog until
//! caught up, trains DocIDs on it, indexes a second wave of products that get DocIDs
//! incrementally, and `inspect --json` reads the state it left, read-only.

use std::process::Command;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_merge-indexer"));
    command.env("RUST_LOG", "warn");
    command
}

#[test]
fn demo_then_inspect_reports_the_indexed_catalog() {
    let directory = tempfile::tempdir().unwrap();
    let state_dir = directory.path().join("state");
    let state_arg = state_dir.to_str().unwrap();
    let demo = binary()
        .args(["demo", "--products", "150", "--queries", "20", "--new-products", "30", "--docid-epochs", "3", "--state-dir", state_arg, "--metrics-addr", "127.0.0.1:0"])
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&demo.stderr));
    assert!(stdout.contains("embedded Kafka broker (librdkafka mock cluster) listening on 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("caught up:"), "{stdout}");
    assert!(stdout.contains("products stored: 150"), "{stdout}");

    let inspect = binary().args(["inspect", "--json", "--state-dir", state_arg]).output().expect("inspect runs");
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect prints JSON");
    assert_eq!(report["counts"]["products"], 180, "150 products, then a second wave of 30");
    assert_eq!(report["judgement_pairs_without_product"], 0);
    // DocIDs: the 150 from training plus the 30 assigned incrementally, a bijection.
    assert!(stdout.contains("150 DocIDs in"), "{stdout}");
    assert!(stdout.contains("180 of 180 products hold one (a bijection: true); queue empty"), "{stdout}");
    assert_eq!(report["docids"], 180);
    assert_eq!(report["docid_queue"], 0);
    assert!(state_dir.join("docid-model/manifest.json").is_file());
    // Every stored product got a vector from the default (hashing) encoder, and nothing waits.
    assert!(stdout.contains("queue empty"), "{stdout}");
    assert_eq!(report["embedding_queue"], 0);
    let vectors: Vec<u64> = report["embeddings_by_encoder"].as_object().unwrap().values().map(|count| count.as_u64().unwrap()).collect();
    assert_eq!(vectors.len(), 1, "one encoder: {}", report["embeddings_by_encoder"]);
    assert!(vectors[0] >= 180, "at least one vector per stored product: {vectors:?}");
    let dead_letters: i64 = report["counts"]["dead_letters"].as_object().unwrap().values().map(|count| count.as_i64().unwrap()).sum();
    assert_eq!(dead_letters, 7, "the demo's seven malformed events");
    let produced: i64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("produced ")?.split_whitespace().next()?.parse().ok())
        .expect("demo reports how many events it produced");
    let second_wave: i64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("second wave: produced ")?.split_whitespace().next()?.parse().ok())
        .expect("demo reports its second wave");
    assert_eq!(second_wave, 30);
    let offsets = report["stored_offsets"].as_object().unwrap();
    let stored: i64 = offsets.values().map(|next| next.as_i64().unwrap()).sum();
    assert_eq!(stored, produced + second_wave, "the stored offsets cover every produced event");
    assert!(offsets.keys().all(|partition| partition.starts_with("products/") || partition.starts_with("query-events/")));
    assert!(report["kafka_cluster_id"].as_str().is_some_and(|id| !id.is_empty()));

    // Retraining from what the indexer stored: every product with a vector, the stored
    // judgements as graded queries; the new map replaces the old one, still a bijection.
    let report_path = directory.path().join("from-state.json");
    let retrain = binary()
        .args(["train-docids", "--from-state", "--epochs", "2", "--batch-size", "128", "--state-dir", state_arg, "--report-json", report_path.to_str().unwrap()])
        .output()
        .expect("train-docids runs");
    let retrain_stdout = String::from_utf8_lossy(&retrain.stdout);
    assert!(retrain.status.success(), "{retrain_stdout}\n{}", String::from_utf8_lossy(&retrain.stderr));
    assert!(retrain_stdout.contains("read 180 products with"), "{retrain_stdout}");
    let retrain_report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(retrain_report["source"], "state");
    assert_eq!(retrain_report["collisions_after"], 0);
    assert!(retrain_report["train_queries"].as_u64().unwrap() > 0, "judgements in state become training queries");
    let inspect = binary().args(["inspect", "--json", "--state-dir", state_arg]).output().expect("inspect runs");
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect prints JSON");
    assert_eq!(report["docids"], 180);

    // A second demo starts a new embedded broker: the old state (whose events are gone) is
    // discarded instead of misreading the new cluster's offsets.
    let again = binary()
        .args(["demo", "--products", "40", "--queries", "5", "--docid-epochs", "0", "--state-dir", state_arg, "--metrics-addr", "127.0.0.1:0"])
        .output()
        .expect("second demo runs");
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{stdout}");
    assert!(stdout.contains("products stored: 40"), "{stdout}");
    // The old state's model went with it: without training there is no model to assign with.
    assert!(stdout.contains("DocIDs: no model in"), "{stdout}");
}

#[test]
fn inspect_without_state_is_a_clear_error() {
    let directory = tempfile::tempdir().unwrap();
    let output = binary().args(["inspect", "--state-dir", directory.path().to_str().unwrap()]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds no state yet"));
}

#[test]
fn produce_without_brokers_is_a_clear_error() {
    let output = binary().args(["produce", "synthetic"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("produce needs --brokers"));
}

#[test]
fn embed_prints_one_unit_vector_per_input_line_and_nothing_else() {
    use std::io::Write;
    let mut child = binary()
        .args(["embed", "--encoder", "hashing"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("embed starts");
    child.stdin.take().unwrap().write_all(b"red running shoes\nstainless steel saucepan\nred running shoes\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let vectors: Vec<Vec<f32>> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("stdout line is not a JSON array ({error}): {line}")))
        .collect();
    assert_eq!(vectors.len(), 3);
    assert!(vectors.iter().all(|vector| vector.len() == 384));
    let norm: f32 = vectors[0].iter().map(|value| value * value).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert_eq!(vectors[0], vectors[2], "same text, same vector");
    assert_ne!(vectors[0], vectors[1]);
}

#[test]
fn embed_with_a_missing_model_is_a_clear_error() {
    let directory = tempfile::tempdir().unwrap();
    let output = binary()
        .args(["embed", "--encoder", "minilm", "--model-dir", directory.path().to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.json") && stderr.contains("fetch-minilm.sh"), "{stderr}");
}
