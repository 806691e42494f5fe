//! The burn MiniLM encoder against sentence-transformers' own output on real ESCI text
//! (`tests/fixtures/minilm_reference.json`, written by `scripts/reference/minilm_reference.py`):
//! identical token ids, cosine ≥ 0.999 per text, and padding that does not change a vector.
//!
//! Needs the model (`scripts/fetch-minilm.sh`; `$MERGE_INDEXER_MODEL_DIR` overrides where it is
//! looked for) and the graded ESCI folder (`$MERGE_INDEXER_ESCI_GRADED_DIR`); each test skips
//! with a message on stderr when either is absent (and fails instead under
//! `MERGE_INDEXER_REQUIRE_TEST_INPUTS=1`, as in CI).

mod inputs;

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine;
use merge_indexer::eval::datasets::{default_esci_graded_dir, EsciGraded};
use merge_indexer::encoder::{cosine_similarity, product_text, InferenceBackend, ProductTextConfig, SentenceTransformer, TextEncoder};
use sha2::{Digest, Sha256};

#[derive(serde::Deserialize)]
struct Fixture {
    model_safetensors_sha256: String,
    max_seq_length: usize,
    texts: Vec<FixtureText>,
}

#[derive(serde::Deserialize)]
struct FixtureText {
    kind: String,
    id: String,
    text_sha256: String,
    token_ids: Vec<u32>,
    vector_f16_base64: String,
}

fn model_dir() -> PathBuf {
    std::env::var_os("MERGE_INDEXER_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"))
}

fn load_encoder() -> Option<SentenceTransformer<InferenceBackend>> {
    let directory = model_dir();
    if !directory.join("model.safetensors").is_file() {
        let missing = format!("no MiniLM model in {} (run scripts/fetch-minilm.sh or set MERGE_INDEXER_MODEL_DIR)", directory.display());
        inputs::skip_or_fail("minilm_reference", &missing);
        return None;
    }
    Some(SentenceTransformer::load(&directory, "sentence-transformers/all-MiniLM-L6-v2", None, Default::default()).expect("the model loads"))
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_reference.json");
    serde_json::from_slice(&std::fs::read(path).expect("fixture present")).expect("fixture parses")
}

/// The fixture's texts, rebuilt from the shared ESCI folder (the repository holds only ids and hashes).
fn fixture_texts(fixture: &Fixture) -> Option<Vec<String>> {
    let directory = default_esci_graded_dir();
    if !directory.join("products.jsonl").is_file() {
        let missing = format!("no graded ESCI data in {} (set MERGE_INDEXER_ESCI_GRADED_DIR)", directory.display());
        inputs::skip_or_fail("minilm_reference", &missing);
        return None;
    }
    let data = EsciGraded::load(&directory).expect("graded ESCI loads");
    let products: HashMap<&str, _> = data.products.iter().map(|product| (product.product_id.as_str(), product)).collect();
    let queries: HashMap<&str, &str> = data.test.iter().map(|row| (row.query_id.as_str(), row.query.as_str())).collect();
    let texts = fixture
        .texts
        .iter()
        .map(|entry| {
            let text = match entry.kind.as_str() {
                "title" => products[entry.id.as_str()].title.clone(),
                "product_text" => product_text(&products[entry.id.as_str()].content(), &ProductTextConfig::default()),
                "query" => queries[entry.id.as_str()].to_owned(),
                other => panic!("unknown fixture kind {other}"),
            };
            assert_eq!(hex::encode(Sha256::digest(text.as_bytes())), entry.text_sha256, "{} {}: our text differs from the reference's: {text:?}", entry.kind, entry.id);
            text
        })
        .collect();
    Some(texts)
}

fn reference_vector(entry: &FixtureText) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(&entry.vector_f16_base64).expect("base64");
    bytes.chunks_exact(2).map(|pair| burn::tensor::f16::from_bits(u16::from_le_bytes([pair[0], pair[1]])).to_f32()).collect()
}

#[test]
fn token_ids_and_vectors_match_sentence_transformers() {
    let fixture = fixture();
    let Some(texts) = fixture_texts(&fixture) else { return };
    let Some(encoder) = load_encoder() else { return };
    let weights = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&weights)), fixture.model_safetensors_sha256, "the fixture was made with other weights");
    assert_eq!(fixture.max_seq_length, 256);
    assert!(texts.len() >= 20);
    for (entry, text) in fixture.texts.iter().zip(&texts) {
        assert_eq!(encoder.token_ids(text).unwrap(), entry.token_ids, "token ids of {} {}", entry.kind, entry.id);
    }
    // One padded batch of everything: short queries next to a 256-token product text.
    let borrowed: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = encoder.encode(&borrowed).unwrap();
    let mut worst = f32::MAX;
    for ((entry, vector), text) in fixture.texts.iter().zip(&vectors).zip(&texts) {
        assert_eq!(vector.len(), 384);
        let cosine = cosine_similarity(vector, &reference_vector(entry));
        assert!(cosine >= 0.999, "{} {} ({text:?}): cosine {cosine} < 0.999", entry.kind, entry.id);
        worst = worst.min(cosine);
    }
    eprintln!("{} texts, lowest cosine to sentence-transformers {worst:.6}", texts.len());
}

#[test]
fn padding_does_not_change_a_vector() {
    let Some(encoder) = load_encoder() else { return };
    let short = "stainless steel frying pan";
    let long = "title: Cast iron skillet description: pre-seasoned, oven safe to 500 degrees, works on induction, gas and electric hobs, with a helper handle and pouring spouts on both sides";
    let alone = encoder.encode(&[short]).unwrap().remove(0);
    let in_batch = encoder.encode(&[long, short, long]).unwrap();
    let max_difference = alone.iter().zip(&in_batch[1]).map(|(a, b)| (a - b).abs()).fold(0.0_f32, f32::max);
    assert!(max_difference < 1e-5, "padding moved the vector by {max_difference}");
    assert!((cosine_similarity(&in_batch[0], &in_batch[2]) - 1.0).abs() < 1e-6);
    assert!(cosine_similarity(&alone, &in_batch[0]) < 0.95, "different texts give different vectors");
}
