//! The embedding cache and the queue of products waiting for a vector: what the encoder stage's
//! workers read and write through [`StateStore`].

use super::*;
use std::collections::BTreeMap;

use rocksdb::{IteratorMode, WriteBatch};

/// The encoder whose vectors state caches: set once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingTarget {
    /// [`crate::encoder::TextEncoder::cache_id`]: the embedding cache's key prefix.
    pub cache_id: String,
    /// The `embedding_model` whose precomputed vectors are stored under `cache_id`.
    pub model_name: String,
    /// Vector length.
    pub dimension: usize,
}

/// One product taken from the embedding queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedProduct {
    /// The product.
    pub product_id: String,
    /// The content hash its vector is wanted for.
    pub content_hash: ContentHash,
}

impl StateStore {
    /// Sets the encoder whose precomputed vectors batch apply stores. Once per store; a
    /// second, different target is refused.
    pub fn set_embedding_target(&self, target: EmbeddingTarget) -> Result<(), EmbeddingTarget> {
        match self.embedding_target.set(target) {
            Ok(()) => Ok(()),
            Err(target) if self.embedding_target.get() == Some(&target) => Ok(()),
            Err(target) => Err(target),
        }
    }

    /// The encoder set with [`StateStore::set_embedding_target`].
    pub fn embedding_target(&self) -> Option<&EmbeddingTarget> {
        self.embedding_target.get()
    }

    /// The cached vector of `content_hash` under encoder `cache_id`.
    pub fn embedding(&self, cache_id: &str, content_hash: &ContentHash) -> Result<Option<Vec<f32>>, StateError> {
        let Some(column_family) = self.try_column_family(EMBEDDINGS_CF) else {
            return Ok(None);
        };
        let key = embedding_key(cache_id, content_hash);
        let value = self.database.get_pinned_cf(column_family, key).map_err(|error| self.rocks_error(error))?;
        value.map(|bytes| decode_vector(&bytes)).transpose()
    }

    /// The vector of a stored product's current content under encoder `cache_id`, if computed.
    pub fn product_embedding(&self, product_id: &str, cache_id: &str) -> Result<Option<Vec<f32>>, StateError> {
        match self.product_content_hash(product_id)? {
            Some(hash) => self.embedding(cache_id, &hash),
            None => Ok(None),
        }
    }

    /// Vectors cached under encoder `cache_id` (a key scan; for `inspect` and summaries).
    pub fn count_embeddings(&self, cache_id: &str) -> Result<u64, StateError> {
        let Some(column_family) = self.try_column_family(EMBEDDINGS_CF) else {
            return Ok(0);
        };
        let prefix = embedding_key_prefix(cache_id);
        let mut count = 0;
        for entry in self.scan(column_family, IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
            let (key, _) = entry.map_err(|error| self.rocks_error(error))?;
            if !key.starts_with(&prefix) {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Up to `limit` products waiting for a vector in key order, starting after `after`
    /// (exclusive), keeping those `accept` says this worker owns.
    pub fn embedding_queue_page(&self, after: Option<&str>, limit: usize, accept: impl Fn(&str) -> bool) -> Result<Vec<QueuedProduct>, StateError> {
        self.queue_page(EMBEDDING_QUEUE_CF, after, limit, accept)?
            .into_iter()
            .map(|(product_id, value)| Ok(QueuedProduct { product_id, content_hash: decode_content_hash(&value, EMBEDDING_QUEUE_CF)? }))
            .collect()
    }

    /// RocksDB's estimate of the queued products (exact after a flush; for the gauge).
    pub fn embedding_queue_estimate(&self) -> Result<u64, StateError> {
        let Some(column_family) = self.try_column_family(EMBEDDING_QUEUE_CF) else {
            return Ok(0);
        };
        Ok(self
            .database
            .property_int_value_cf(column_family, "rocksdb.estimate-num-keys")
            .map_err(|error| self.rocks_error(error))?
            .unwrap_or(0))
    }

    /// Vectors cached per encoder cache id, and the exact number of queued products (key
    /// scans; for `inspect`).
    pub fn embedding_summary(&self) -> Result<(BTreeMap<String, u64>, u64), StateError> {
        let mut by_encoder: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(column_family) = self.try_column_family(EMBEDDINGS_CF) {
            for entry in self.scan(column_family, IteratorMode::Start) {
                let (key, _) = entry.map_err(|error| self.rocks_error(error))?;
                let length = key.get(..2).map_or(0, |prefix| u16::from_be_bytes([prefix[0], prefix[1]]) as usize);
                let cache_id = key.get(2..2 + length).map(String::from_utf8_lossy).unwrap_or_default();
                *by_encoder.entry(cache_id.into_owned()).or_insert(0) += 1;
            }
        }
        Ok((by_encoder, self.count_keys(EMBEDDING_QUEUE_CF)?))
    }

    /// Whether any product is queued (exact).
    pub fn embedding_queue_is_empty(&self) -> Result<bool, StateError> {
        Ok(self.embedding_queue_page(None, 1, |_| true)?.is_empty())
    }

    /// Stores computed vectors and removes their queue entries, in one write. An entry whose
    /// queued hash changed meanwhile (a newer upsert) stays queued; its vector is still cached
    /// under the hash it was computed for. Each dequeued product without a DocID joins the DocID
    /// queue in the same write: its vector now exists, so the DocID worker can place it.
    pub fn store_embeddings(&self, cache_id: &str, computed: &[(QueuedProduct, Vec<f32>)], cache_hits: &[QueuedProduct]) -> Result<usize, StateError> {
        let embeddings = self.column_family(EMBEDDINGS_CF);
        let queue = self.column_family(EMBEDDING_QUEUE_CF);
        let docid_queue = self.column_family(DOCID_QUEUE_CF);
        // Lock order: DocIDs, then the embedding queue (as in batch apply). The DocID lock keeps
        // a delete or an assignment from landing between the DocID check and this write.
        let _docids_exclusive = self.docid_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _exclusive = self.queue_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        for (queued, vector) in computed {
            batch.put_cf(embeddings, embedding_key(cache_id, &queued.content_hash), encode_vector(vector));
        }
        let mut dequeued = 0;
        for queued in computed.iter().map(|(queued, _)| queued).chain(cache_hits) {
            let current = self.database.get_pinned_cf(queue, queued.product_id.as_bytes()).map_err(|error| self.rocks_error(error))?;
            if current.as_deref() == Some(queued.content_hash.as_slice()) {
                batch.delete_cf(queue, queued.product_id.as_bytes());
                dequeued += 1;
                // The entry was current, so the product is stored (a delete removes the entry).
                if self.docid(&queued.product_id)?.is_none() {
                    batch.put_cf(docid_queue, queued.product_id.as_bytes(), []);
                }
            }
        }
        self.database.write(batch).map_err(|error| self.rocks_error(error))?;
        Ok(dequeued)
    }

    /// Queues every stored product whose current content has no vector under `cache_id`: run
    /// at start-up, it covers a new or changed encoder and state written before the queue
    /// existed. Returns how many were queued.
    pub fn enqueue_missing_embeddings(&self, cache_id: &str) -> Result<u64, StateError> {
        let products = self.column_family(PRODUCTS_CF);
        let queue = self.column_family(EMBEDDING_QUEUE_CF);
        let mut missing: Vec<(Vec<u8>, ContentHash)> = Vec::new();
        for entry in self.scan(products, IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            let hash = decode_content_hash(value.get(..CONTENT_HASH_BYTES).unwrap_or_default(), PRODUCTS_CF)?;
            if self.embedding(cache_id, &hash)?.is_none() {
                missing.push((key.to_vec(), hash));
            }
        }
        let _exclusive = self.queue_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        let mut queued = 0;
        for (product_id, hash) in &missing {
            // Re-check under the lock: the product may have changed since the scan.
            if self.product_content_hash(&String::from_utf8_lossy(product_id))? == Some(*hash) {
                batch.put_cf(queue, product_id, hash);
                queued += 1;
            }
        }
        self.database.write(batch).map_err(|error| self.rocks_error(error))?;
        Ok(queued)
    }
}
