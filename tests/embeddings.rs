//! The embedding stage end to end: the queue written with each product change, the cache keyed
//! by (encoder, content hash) — a product is re-encoded only when its content changes —, the
//! worker's handling of races with newer upserts, precomputed vectors, and the dead letter for a
//! precomputed vector of the wrong dimension.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use merge_indexer::encoder::cache::{embedding_target, EmbeddingPool, EmbeddingWorker};
use merge_indexer::encoder::{product_text, EncoderError, HashingEncoder, HashingEncoderConfig, ProductTextConfig, TextEncoder};
use merge_indexer::events::{DeadLetterReason, ExpectedEmbedding, PrecomputedEmbedding, ProductContent, ProductEvent, RelevanceMapping};
use merge_indexer::state::{DecodedRecord, QueuedProduct, SourcePosition, SourcedRecord, StateOptions, StateStore};

/// The hashing encoder, counting the texts it is asked to encode.
struct CountingEncoder {
    inner: HashingEncoder,
    texts_encoded: AtomicUsize,
}

impl TextEncoder for CountingEncoder {
    fn model_name(&self) -> &str {
        self.inner.model_name()
    }
    fn cache_id(&self) -> &str {
        self.inner.cache_id()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.texts_encoded.fetch_add(texts.len(), Ordering::SeqCst);
        self.inner.encode(texts)
    }
}

fn counting_encoder() -> Arc<CountingEncoder> {
    Arc::new(CountingEncoder { inner: HashingEncoder::new(HashingEncoderConfig::default()).unwrap(), texts_encoded: AtomicUsize::new(0) })
}

struct Stream {
    offset: i64,
}

impl Stream {
    fn upsert(&mut self, product_id: &str, title: &str, embedding: Option<PrecomputedEmbedding>) -> SourcedRecord {
        self.offset += 1;
        SourcedRecord {
            position: SourcePosition { topic: "products".into(), partition: 0, offset: self.offset },
            record: DecodedRecord::Product(ProductEvent::Upsert { product_id: product_id.into(), content: ProductContent::with_title(title), embedding }),
        }
    }

    fn delete(&mut self, product_id: &str) -> SourcedRecord {
        self.offset += 1;
        SourcedRecord {
            position: SourcePosition { topic: "products".into(), partition: 0, offset: self.offset },
            record: DecodedRecord::Product(ProductEvent::Delete { product_id: product_id.into() }),
        }
    }
}

fn expected_vector(encoder: &dyn TextEncoder, title: &str) -> Vec<f32> {
    let text = product_text(&ProductContent::with_title(title), &ProductTextConfig::default());
    encoder.encode(&[text.as_str()]).unwrap().remove(0)
}

#[test]
fn products_are_encoded_once_per_content_and_cached_by_content_hash() {
    let directory = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(directory.path(), &StateOptions::default()).unwrap());
    let encoder = counting_encoder();
    let cache_id = encoder.cache_id().to_owned();
    let worker = EmbeddingWorker::new(Arc::clone(&state), encoder.clone(), ProductTextConfig::default(), 2, 0, 1);
    let mapping = RelevanceMapping::default();
    let mut stream = Stream { offset: -1 };

    let batch = [stream.upsert("P1", "red running shoes", None), stream.upsert("P2", "blue denim jacket", None), stream.upsert("P3", "steel saucepan", None)];
    state.apply_batch(&batch, &mapping).unwrap();
    assert!(!state.embedding_queue_is_empty().unwrap(), "product changes are queued in the same write");
    let report = worker.drain().unwrap();
    assert_eq!((report.encoded, report.cache_hits, report.stale), (3, 0, 0), "pages of 2 drain all three");
    assert!(state.embedding_queue_is_empty().unwrap());
    assert_eq!(state.product_embedding("P1", &cache_id).unwrap().unwrap(), expected_vector(&encoder.inner, "red running shoes"));

    // Same content again: unchanged, nothing queued, nothing encoded.
    state.apply_batch(&[stream.upsert("P1", "red running shoes", None)], &mapping).unwrap();
    assert!(state.embedding_queue_is_empty().unwrap());
    assert_eq!(worker.drain().unwrap().encoded, 0);

    // New text: encoded again, and the vector follows the content.
    state.apply_batch(&[stream.upsert("P1", "red trail running shoes", None)], &mapping).unwrap();
    assert_eq!(worker.drain().unwrap().encoded, 1);
    assert_eq!(state.product_embedding("P1", &cache_id).unwrap().unwrap(), expected_vector(&encoder.inner, "red trail running shoes"));

    // Back to old text, and a new product with an existing product's text: cache hits.
    state.apply_batch(&[stream.upsert("P1", "red running shoes", None), stream.upsert("P4", "steel saucepan", None)], &mapping).unwrap();
    let report = worker.drain().unwrap();
    assert_eq!((report.encoded, report.cache_hits), (0, 2));
    assert_eq!(encoder.texts_encoded.load(Ordering::SeqCst), 4, "3 products + 1 text change, nothing more");
    assert_eq!(state.product_embedding("P4", &cache_id).unwrap(), state.product_embedding("P3", &cache_id).unwrap());

    // Deleting a queued product dequeues it; nothing stale is encoded.
    state.apply_batch(&[stream.upsert("P5", "wool socks", None), stream.delete("P5")], &mapping).unwrap();
    assert!(state.embedding_queue_is_empty().unwrap());
    assert_eq!(state.count_embeddings(&cache_id).unwrap(), 4, "vectors of 4 distinct contents");
}

#[test]
fn a_vector_computed_for_replaced_content_does_not_dequeue_the_newer_content() {
    let directory = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(directory.path(), &StateOptions::default()).unwrap());
    let encoder = counting_encoder();
    let cache_id = encoder.cache_id().to_owned();
    let mapping = RelevanceMapping::default();
    let mut stream = Stream { offset: -1 };
    state.apply_batch(&[stream.upsert("P1", "old title", None)], &mapping).unwrap();
    let taken: Vec<QueuedProduct> = state.embedding_queue_page(None, 10, |_| true).unwrap();
    assert_eq!(taken.len(), 1);
    // A worker took the entry; then a newer upsert arrives before it stores its vector.
    state.apply_batch(&[stream.upsert("P1", "new title", None)], &mapping).unwrap();
    let stale_vector = expected_vector(&encoder.inner, "old title");
    let dequeued = state.store_embeddings(&cache_id, &[(taken[0].clone(), stale_vector)], &[]).unwrap();
    assert_eq!(dequeued, 0, "the newer content stays queued");
    let worker = EmbeddingWorker::new(Arc::clone(&state), encoder.clone(), ProductTextConfig::default(), 8, 0, 1);
    assert_eq!(worker.drain().unwrap().encoded, 1);
    assert_eq!(state.product_embedding("P1", &cache_id).unwrap().unwrap(), expected_vector(&encoder.inner, "new title"));
    assert!(state.embedding_queue_is_empty().unwrap());
}

#[test]
fn precomputed_vectors_are_stored_and_a_new_encoder_queues_everything_again() {
    let directory = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(directory.path(), &StateOptions::default()).unwrap());
    let encoder = counting_encoder();
    let target = embedding_target(encoder.as_ref());
    state.set_embedding_target(target.clone()).unwrap();
    let mapping = RelevanceMapping::default();
    let mut stream = Stream { offset: -1 };
    let given: Vec<f32> = (0..384).map(|index| (index as f32).sin()).collect();
    let precomputed = PrecomputedEmbedding { model: target.model_name.clone(), vector: given.clone() };
    state.apply_batch(&[stream.upsert("P1", "anything", Some(precomputed)), stream.upsert("P2", "plain", None)], &mapping).unwrap();
    assert_eq!(state.product_embedding("P1", &target.cache_id).unwrap().unwrap(), given, "the producer's vector is the product's vector");
    let queued: Vec<String> = state.embedding_queue_page(None, 10, |_| true).unwrap().into_iter().map(|queued| queued.product_id).collect();
    assert_eq!(queued, ["P2"], "only the product without a vector waits for the encoder");
    assert_eq!(state.docid_queue_page(None, 10).unwrap(), ["P1"], "a product whose vector came with it is queued for a DocID at once");

    // Another encoder (here: other hashing parameters) finds nothing cached and queues both.
    let other = HashingEncoder::new(HashingEncoderConfig { dimension: 64, ..Default::default() }).unwrap();
    assert_ne!(other.cache_id(), target.cache_id);
    assert_eq!(state.enqueue_missing_embeddings(other.cache_id()).unwrap(), 2);
    // A running pool binds the state to one encoder only.
    assert!(EmbeddingPool::start(&state, Arc::new(other), &ProductTextConfig::default(), 8, 1).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precomputed_vector_of_the_wrong_dimension_is_dead_lettered() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "embeddings");
    config.kafka.embedded_partitions = 1;
    let encoder: Arc<dyn TextEncoder> = counting_encoder();
    let model = encoder.model_name().to_owned();
    config.validation.expected_embedding = Some(ExpectedEmbedding { model_name: model.clone(), dimension: encoder.dimension() });
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let products = config.kafka.topics.products.clone();
    let right: Vec<f32> = (0..384).map(|index| if index == 7 { 1.0 } else { 0.0 }).collect();
    let wrong_payload = format!(r#"{{"schema_version":1,"product_id":"WRONG","title":"t","embedding":[0.5,0.5,0.5],"embedding_model":"{model}"}}"#);
    let right_payload = format!(
        r#"{{"schema_version":1,"product_id":"RIGHT","title":"t","embedding":{},"embedding_model":"{model}"}}"#,
        serde_json::to_string(&right).unwrap()
    );
    let other_payload = r#"{"schema_version":1,"product_id":"OTHER","title":"other model","embedding":[1,2,3],"embedding_model":"someone/else"}"#;
    let messages = vec![
        message(&products, Some("WRONG"), &wrong_payload),
        message(&products, Some("RIGHT"), &right_payload),
        message(&products, Some("OTHER"), other_payload),
    ];
    produce(&config, &bootstrap, &messages).await;

    let state = open_state(&config);
    let pool = EmbeddingPool::start(&state, Arc::clone(&encoder), &ProductTextConfig::default(), 8, 1).unwrap();
    let summary = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(summary.outcomes.get("dead_lettered").copied(), Some(1));
    let letters = read_dead_letters(&config, &bootstrap, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].headers["reason"], DeadLetterReason::EmbeddingDimensionMismatch.as_str());
    assert_eq!(letters[0].payload.as_deref(), Some(wrong_payload.as_bytes()), "original bytes kept");
    assert!(letters[0].headers["detail"].contains("3 components"), "{}", letters[0].headers["detail"]);

    wait_until("the embedding queue to drain", std::time::Duration::from_secs(60), || state.embedding_queue_is_empty().unwrap());
    let report = pool.stop();
    assert_eq!(report.encoded, 1, "only OTHER was encoded: RIGHT brought its vector");
    let cache_id = encoder.cache_id();
    assert_eq!(state.product_embedding("RIGHT", cache_id).unwrap().unwrap(), right);
    let reference = HashingEncoder::new(HashingEncoderConfig::default()).unwrap();
    assert_eq!(state.product_embedding("OTHER", cache_id).unwrap().unwrap(), expected_vector(&reference, "other model"));
    assert!(state.product("WRONG").unwrap().is_none());
}
