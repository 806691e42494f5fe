//! DocIDs between retrains: a model trained and saved like `train-docids` does, loaded back,
//! and the worker that gives every product new to state a DocID once its vector exists —
//! quantized with the saved model, resolved against the stored map, persisted with its queue
//! entry in one write. Deletes free DocIDs in the product's own batch; updates keep them.


use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use merge_indexer::docid::incremental::{DocIdModel, DocIdModelError, DocIdModelManifest, DocIdWorker, MANIFEST_FORMAT_VERSION};
use merge_indexer::docid::model::RqVaeConfig;
use merge_indexer::docid::train::{train_docids, DocIdTrainingConfig, Variant};
use merge_indexer::docid::DocId;
use merge_indexer::encoder::cache::{embedding_target, EmbeddingWorker};
use merge_indexer::encoder::{HashingEncoder, HashingEncoderConfig, InferenceBackend, ProductTextConfig, TextEncoder};
use merge_indexer::events::{ProductContent, ProductEvent, RelevanceMapping};
use merge_indexer::state::{DecodedRecord, SourcePosition, SourcedRecord, StateOptions, StateStore};

const WORDS: [&str; 16] = [
    "red", "blue", "steel", "cotton", "running", "shoes", "jacket", "saucepan", "lamp", "desk", "wireless", "charger", "leather", "wallet", "garden", "hose",
];

/// A deterministic title for product `index`: three words picked by the index's digits.
fn title(index: usize) -> String {
    format!("{} {} {} model {}", WORDS[index % 16], WORDS[(index / 16) % 16], WORDS[(index * 7 + 3) % 16], index % 5)
}

struct Stream {
    offset: i64,
}

impl Stream {
    fn record(&mut self, event: ProductEvent) -> SourcedRecord {
        self.offset += 1;
        SourcedRecord { position: SourcePosition { topic: "products".into(), partition: 0, offset: self.offset }, record: DecodedRecord::Product(event) }
    }

    fn upsert(&mut self, product_id: &str, title: &str) -> SourcedRecord {
        self.record(ProductEvent::Upsert { product_id: product_id.into(), content: ProductContent::with_title(title), embedding: None })
    }

    fn delete(&mut self, product_id: &str) -> SourcedRecord {
        self.record(ProductEvent::Delete { product_id: product_id.into() })
    }
}

/// A small model (3 levels × 8 codes: 512 DocIDs) so collisions, last-level resolution and the
/// overflow rule all happen with ~150 products.
fn small_training_config(input_dim: usize) -> DocIdTrainingConfig {
    let model = RqVaeConfig::new(input_dim).with_hidden_dims(vec![64]).with_latent_dim(8).with_levels(3).with_codebook_size(8);
    DocIdTrainingConfig::new(model).with_variant(Variant::Vanilla).with_epochs(3).with_batch_size(64)
}

fn manifest_for(encoder: &dyn TextEncoder, documents: usize) -> DocIdModelManifest {
    DocIdModelManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        encoder_cache_id: encoder.cache_id().to_owned(),
        encoder_model: encoder.model_name().to_owned(),
        embedding_dimension: encoder.dimension(),
        variant: Variant::Vanilla,
        trained_documents: documents,
        epochs: 3,
        created_unix_seconds: 0,
    }
}

/// Asserts the stored map is a bijection over exactly `live` products, and returns it.
fn assert_bijection(state: &StateStore, live: &HashSet<String>) -> BTreeMap<String, DocId> {
    let pairs: BTreeMap<String, DocId> = state.docids().unwrap().into_iter().collect();
    let holders: HashSet<String> = pairs.keys().cloned().collect();
    assert_eq!(&holders, live, "exactly the stored products hold DocIDs");
    let distinct: HashSet<&DocId> = pairs.values().collect();
    assert_eq!(distinct.len(), pairs.len(), "no two products share a DocID");
    for (product_id, docid) in &pairs {
        assert_eq!(state.product_for_docid(docid).unwrap().as_deref(), Some(product_id.as_str()), "reverse entry of {product_id}");
    }
    pairs
}

#[test]
fn new_products_get_docids_from_the_saved_model_and_deletes_free_them() {
    let directory = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(&directory.path().join("state"), &StateOptions::default()).unwrap());
    let encoder: Arc<dyn TextEncoder> = Arc::new(HashingEncoder::new(HashingEncoderConfig::default()).unwrap());
    state.set_embedding_target(embedding_target(encoder.as_ref())).unwrap();
    let embedder = EmbeddingWorker::new(Arc::clone(&state), Arc::clone(&encoder), ProductTextConfig::default(), 64, 0, 1);
    let mapping = RelevanceMapping::default();
    let mut stream = Stream { offset: -1 };

    // 1. A first catalog of 100 products, embedded; the "retrain" covers its first 80.
    let first: Vec<SourcedRecord> = (0..100).map(|index| stream.upsert(&format!("P{index:03}"), &title(index))).collect();
    state.apply_batch(&first, &mapping).unwrap();
    embedder.drain().unwrap();
    let trained_ids: Vec<String> = (0..80).map(|index| format!("P{index:03}")).collect();
    let vectors: Vec<Vec<f32>> = trained_ids.iter().map(|id| state.product_embedding(id, encoder.cache_id()).unwrap().expect("embedded")).collect();
    let training = small_training_config(encoder.dimension());
    let device = burn::tensor::Device::<InferenceBackend>::default();
    let (docids, _report, model) = train_docids::<burn::backend::Autodiff<InferenceBackend>>(&training, &vectors, &[], &device, |_, _| {}).unwrap();
    let pairs: Vec<(String, DocId)> = trained_ids.iter().cloned().zip(docids).collect();
    state.replace_docids(&pairs).unwrap();
    let model_dir = directory.path().join("docid-model");
    DocIdModel::save(&model_dir, &manifest_for(encoder.as_ref(), vectors.len()), &training, &model).unwrap();

    // 2. The saved model loads and quantizes exactly like the trained one.
    let loaded = Arc::new(DocIdModel::load(&model_dir).unwrap());
    assert_eq!(loaded.space().levels, 3);
    let rows: Vec<usize> = (0..vectors.len()).collect();
    let from_training = merge_indexer::docid::train::quantize_documents(&model, &vectors, &rows, &device);
    let from_disk = loaded.quantize(&vectors);
    assert_eq!(
        from_training.iter().map(|document| &document.codes).collect::<Vec<_>>(),
        from_disk.iter().map(|document| &document.codes).collect::<Vec<_>>(),
        "the loaded model picks the same codes"
    );

    // 3. Start-up queues the 20 stored products the retrain left out; the worker assigns them.
    assert_eq!(state.enqueue_missing_docids().unwrap(), 20);
    let worker = DocIdWorker::new(Arc::clone(&state), Arc::clone(&loaded), encoder.cache_id(), 16).unwrap();
    let report = worker.drain().unwrap();
    assert_eq!(report.newly_assigned(), 20, "{report:?}");
    assert_eq!(state.docid_queue_len().unwrap(), 0);
    let mut live: HashSet<String> = (0..100).map(|index| format!("P{index:03}")).collect();
    let before = assert_bijection(&state, &live);
    for id in &trained_ids {
        assert_eq!(before[id], pairs.iter().find(|(product, _)| product == id).unwrap().1, "a retrained DocID is not moved");
    }

    // 4. Streaming: 60 new products, 10 deletes, 5 content updates, and a product created and
    //    deleted inside one batch. New products join the DocID queue once their vector is stored.
    let mut second: Vec<SourcedRecord> = (100..160).map(|index| stream.upsert(&format!("P{index:03}"), &title(index))).collect();
    second.extend((0..10).map(|index| stream.delete(&format!("P{:03}", index * 3))));
    second.extend((50..55).map(|index| stream.upsert(&format!("P{index:03}"), &format!("{} renewed", title(index)))));
    second.push(stream.upsert("EPHEMERAL", "gone before it got a DocID"));
    second.push(stream.delete("EPHEMERAL"));
    state.apply_batch(&second, &mapping).unwrap();
    for index in 0..10 {
        live.remove(&format!("P{:03}", index * 3));
    }
    live.extend((100..160).map(|index| format!("P{index:03}")));
    let deleted_docids: Vec<&DocId> = (0..10).map(|index| &before[&format!("P{:03}", index * 3)]).collect();
    for docid in &deleted_docids {
        assert_eq!(state.product_for_docid(docid).unwrap(), None, "a delete frees its DocID in the same batch");
    }
    assert_eq!(state.docid_queue_len().unwrap(), 0, "no vectors yet, so nothing is queued for a DocID");
    let waiting = worker.drain().unwrap();
    assert_eq!(waiting.newly_assigned(), 0, "no vectors yet: {waiting:?}");

    embedder.drain().unwrap();
    assert_eq!(state.docid_queue_len().unwrap(), 60, "only products new to state are queued, each once its vector is stored");
    let report = worker.drain().unwrap();
    assert_eq!(report.newly_assigned(), 60, "{report:?}");
    let after = assert_bijection(&state, &live);
    for index in 50..55 {
        let id = format!("P{index:03}");
        assert_eq!(after[&id], before[&id], "a content update keeps the DocID until the next retrain");
    }
    // Each new product got its quantizer codes unless another product already held them.
    let new_ids: Vec<String> = (100..160).map(|index| format!("P{index:03}")).collect();
    let new_vectors: Vec<Vec<f32>> = new_ids.iter().map(|id| state.product_embedding(id, encoder.cache_id()).unwrap().unwrap()).collect();
    let mut exact = 0;
    for (id, document) in new_ids.iter().zip(loaded.quantize(&new_vectors)) {
        let codes = DocId(document.codes.clone());
        if after[id] == codes {
            exact += 1;
        } else {
            let holder = state.product_for_docid(&codes).unwrap();
            assert!(holder.is_some_and(|holder| &holder != id), "{id} was moved off free codes {codes}");
        }
    }
    assert_eq!(
        exact as u64,
        report.placements.get("quantizer_codes").copied().unwrap_or(0),
        "the report's count of exact placements matches the map"
    );
    assert!(exact < 60, "with 8 codes per level some new products must collide: {report:?}");

    // 5. Idle: nothing queued, nothing changes.
    let idle = worker.drain().unwrap();
    assert_eq!(idle.newly_assigned(), 0);
    assert_eq!(assert_bijection(&state, &live), after);
}

#[test]
fn a_model_for_another_encoder_or_a_damaged_model_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(&directory.path().join("state"), &StateOptions::default()).unwrap());
    let encoder = HashingEncoder::new(HashingEncoderConfig::default()).unwrap();
    let other = HashingEncoder::new(HashingEncoderConfig { seed: 99, ..HashingEncoderConfig::default() }).unwrap();
    assert_ne!(encoder.cache_id(), other.cache_id());
    let training = small_training_config(encoder.dimension());
    let device = burn::tensor::Device::<InferenceBackend>::default();
    let model = training.model.init::<InferenceBackend>(&device, 1);
    let model_dir = directory.path().join("docid-model");
    DocIdModel::save(&model_dir, &manifest_for(&encoder, 0), &training, &model).unwrap();

    let loaded = Arc::new(DocIdModel::load(&model_dir).unwrap());
    match DocIdWorker::new(Arc::clone(&state), Arc::clone(&loaded), other.cache_id(), 16) {
        Err(DocIdModelError::EncoderMismatch { model_encoder, configured_encoder, .. }) => {
            assert_eq!(model_encoder, encoder.cache_id());
            assert_eq!(configured_encoder, other.cache_id());
        }
        other => panic!("expected an encoder mismatch, got {other:?}"),
    }

    // Truncated weights: a clear error naming the file, not a half-loaded model.
    let weights = model_dir.join("rqvae.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let error = DocIdModel::load(&model_dir).unwrap_err();
    assert!(matches!(error, DocIdModelError::Invalid { ref path, .. } if path == &weights), "{error}");
    std::fs::remove_file(&weights).unwrap();
    assert!(matches!(DocIdModel::load(&model_dir).unwrap_err(), DocIdModelError::Io { .. }));
}
