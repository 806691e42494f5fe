//! `train-docids` end to end on the real graded ESCI folder: trains (1 epoch), stores a DocID
//! for every product as a bijection, saves the model with its config, and writes the report
//! with the keys the issue names. Skips with a message when the data is absent.

mod inputs;

use std::collections::BTreeSet;
use std::process::Command;

use merge_indexer::eval::datasets::default_esci_graded_dir;
use merge_indexer::state::StateStore;

#[test]
fn train_docids_stores_a_bijection_and_reports() {
    let data = default_esci_graded_dir();
    if !data.join("products.jsonl").is_file() {
        let missing = format!("no graded ESCI data in {} (set MERGE_INDEXER_ESCI_GRADED_DIR)", data.display());
        inputs::skip_or_fail("train_docids_stores_a_bijection_and_reports", &missing);
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let state_dir = directory.path().join("state");
    let report_path = directory.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_merge-indexer"))
        .env("RUST_LOG", "warn")
        .args(["train-docids", "--epochs", "1", "--state-dir", state_dir.to_str().unwrap(), "--report-json", report_path.to_str().unwrap()])
        .output()
        .expect("train-docids runs");
    assert!(output.status.success(), "{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["collisions_after"], 0);
    assert!(report["collisions_before"].as_u64().is_some());
    assert_eq!(report["utilisation_per_level"].as_array().unwrap().len(), 4);
    assert_eq!(report["unique_tokens_per_layer"].as_array().unwrap().len(), 4);
    assert_eq!(report["losses_per_epoch"].as_array().unwrap().len(), 1);
    assert_eq!(report["unique_tokens_per_layer_test"].as_array().unwrap().len(), 4);
    assert_eq!(report["unique_tokens_per_layer_validation"].as_array().unwrap().len(), 4);
    assert_eq!(report["train_queries"].as_u64().unwrap() + report["validation_queries"].as_u64().unwrap(), 165, "validation carved from the train queries");
    assert_eq!(report["test_queries"], 68);

    let state = StateStore::open_read_only(&state_dir).unwrap();
    let pairs = state.docids().unwrap();
    assert_eq!(pairs.len(), 6_122, "every graded product has a DocID");
    assert_eq!(pairs.iter().map(|(_, docid)| docid).collect::<BTreeSet<_>>().len(), pairs.len(), "a bijection");
    assert!(pairs.iter().all(|(product_id, docid)| product_id.starts_with("us:") && docid.0.len() == 4));
    let (product_id, docid) = &pairs[0];
    assert_eq!(state.product_for_docid(docid).unwrap().as_deref(), Some(product_id.as_str()));
    let model_dir = state_dir.join("docid-model");
    assert!(model_dir.join("rqvae.safetensors").is_file() && model_dir.join("config.json").is_file());
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["lambda_align"], 0.01);
    assert_eq!(config["model"]["codebook_size"], 256);
    // The manifest names the encoder whose vectors the model reads, and the model loads back
    // and quantizes to the codes it stored for a product's own vector.
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(model_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["encoder_cache_id"], report["encoder"]);
    assert_eq!(manifest["trained_documents"], 6_122);
    let model = merge_indexer::docid::incremental::DocIdModel::load(&model_dir).unwrap();
    assert_eq!(model.space().levels, 4);
}
