//! The embedding cache and its workers. Batch apply queues every product whose content changed
//! (`embedding_queue`, written in the same RocksDB batch as the product); workers take queued
//! products in pages, reuse a vector already cached for the content hash, encode the rest in
//! batches and store vectors under (encoder cache id, content hash) while dequeuing — off the
//! ingest path, so ingest never waits for the encoder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use super::{product_text, ProductTextConfig, TextEncoder};
use crate::metrics as names;
use crate::state::{EmbeddingTarget, QueuedProduct, StateError, StateStore};

/// What one pass over the queue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmbeddingPassReport {
    /// Products encoded.
    pub encoded: u64,
    /// Products whose vector was already cached.
    pub cache_hits: u64,
    /// Queue entries skipped: the product was deleted or changed since it was queued.
    pub stale: u64,
}

impl EmbeddingPassReport {
    fn add(&mut self, other: Self) {
        self.encoded += other.encoded;
        self.cache_hits += other.cache_hits;
        self.stale += other.stale;
    }
}

/// Errors of the embedding workers.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    /// State could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The encoder failed.
    #[error(transparent)]
    Encoder(#[from] super::EncoderError),
}

/// Fills the embedding cache from the queue with one encoder.
pub struct EmbeddingWorker {
    state: Arc<StateStore>,
    encoder: Arc<dyn TextEncoder>,
    text: ProductTextConfig,
    batch_size: usize,
    /// This worker takes the products whose id hashes to `shard` modulo `shards`.
    shard: u64,
    shards: u64,
}

impl std::fmt::Debug for EmbeddingWorker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EmbeddingWorker")
            .field("encoder", &self.encoder.cache_id())
            .field("shard", &self.shard)
            .field("shards", &self.shards)
            .finish()
    }
}

/// The target a state store caches `encoder`'s vectors under.
pub fn embedding_target(encoder: &dyn TextEncoder) -> EmbeddingTarget {
    EmbeddingTarget { cache_id: encoder.cache_id().to_owned(), model_name: encoder.model_name().to_owned(), dimension: encoder.dimension() }
}

impl EmbeddingWorker {
    /// A worker owning shard `shard` of `shards` (use 0 of 1 for a single worker).
    pub fn new(state: Arc<StateStore>, encoder: Arc<dyn TextEncoder>, text: ProductTextConfig, batch_size: usize, shard: usize, shards: usize) -> Self {
        debug_assert!(shard < shards.max(1));
        Self { state, encoder, text, batch_size: batch_size.max(1), shard: shard as u64, shards: shards.max(1) as u64 }
    }

    fn owns(&self, product_id: &str) -> bool {
        self.shards == 1 || xxh3_64(product_id.as_bytes()) % self.shards == self.shard
    }

    /// Works through everything queued now (and whatever gets queued meanwhile), page by page.
    pub fn drain(&self) -> Result<EmbeddingPassReport, EmbeddingError> {
        let mut report = EmbeddingPassReport::default();
        let mut after: Option<String> = None;
        loop {
            let page = self.state.embedding_queue_page(after.as_deref(), self.batch_size, |product_id| self.owns(product_id))?;
            let Some(last) = page.last() else {
                return Ok(report);
            };
            after = Some(last.product_id.clone());
            report.add(self.process_page(page)?);
        }
    }

    /// Encodes one page of queued products (cache hits and stale entries are not encoded).
    fn process_page(&self, page: Vec<QueuedProduct>) -> Result<EmbeddingPassReport, EmbeddingError> {
        let cache_id = self.encoder.cache_id();
        let mut report = EmbeddingPassReport::default();
        let mut to_encode: Vec<(QueuedProduct, String)> = Vec::with_capacity(page.len());
        let mut cache_hits = Vec::new();
        for queued in page {
            if self.state.embedding(cache_id, &queued.content_hash)?.is_some() {
                cache_hits.push(queued);
                continue;
            }
            let Some(product) = self.state.product(&queued.product_id)? else {
                report.stale += 1;
                continue;
            };
            if hex::decode(&product.content_hash).ok().as_deref() != Some(queued.content_hash.as_slice()) {
                // Changed after queuing; the newer queue entry is picked up on a later page.
                report.stale += 1;
                continue;
            }
            to_encode.push((queued, product_text(&product.content, &self.text)));
        }
        let mut computed = Vec::with_capacity(to_encode.len());
        if !to_encode.is_empty() {
            let texts: Vec<&str> = to_encode.iter().map(|(_, text)| text.as_str()).collect();
            let started = Instant::now();
            let vectors = self.encoder.encode(&texts)?;
            metrics::histogram!(names::EMBEDDING_BATCH_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
            debug_assert_eq!(vectors.len(), texts.len());
            computed = to_encode.into_iter().map(|(queued, _)| queued).zip(vectors).collect();
        }
        report.encoded = computed.len() as u64;
        report.cache_hits = cache_hits.len() as u64;
        self.state.store_embeddings(cache_id, &computed, &cache_hits)?;
        metrics::counter!(names::EMBEDDINGS_COMPUTED_TOTAL, "encoder" => self.encoder.model_name().to_owned()).increment(report.encoded);
        metrics::counter!(names::EMBEDDING_CACHE_HITS_TOTAL).increment(report.cache_hits);
        tracing::debug!(encoded = report.encoded, cache_hits = report.cache_hits, stale = report.stale, "embedding page done");
        Ok(report)
    }

    /// Runs [`EmbeddingWorker::drain`] on its own thread until `stop` is set, polling the queue
    /// every `idle_poll` while it is empty. An encoder or state error is logged and retried
    /// after a pause: nothing is dequeued without its vector.
    pub fn spawn(self, stop: Arc<AtomicBool>, idle_poll: Duration) -> std::io::Result<JoinHandle<EmbeddingPassReport>> {
        let name = format!("embed-{}", self.shard);
        std::thread::Builder::new().name(name).spawn(move || {
            let mut total = EmbeddingPassReport::default();
            while !stop.load(Ordering::Acquire) {
                match self.drain() {
                    Ok(report) => {
                        total.add(report);
                        if let Ok(estimate) = self.state.embedding_queue_estimate() {
                            metrics::gauge!(names::EMBEDDING_QUEUE_PRODUCTS).set(estimate as f64);
                        }
                        if report == EmbeddingPassReport::default() {
                            std::thread::sleep(idle_poll);
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, shard = self.shard, "embedding worker failed; retrying in 5 s");
                        std::thread::sleep(Duration::from_secs(5));
                    }
                }
            }
            total
        })
    }
}

/// A running pool of embedding workers.
#[derive(Debug)]
pub struct EmbeddingPool {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<EmbeddingPassReport>>,
}

impl EmbeddingPool {
    /// Binds `state` to `encoder` (precomputed vectors of its model are stored at apply time),
    /// queues every product missing a vector, and starts `workers` threads.
    pub fn start(state: &Arc<StateStore>, encoder: Arc<dyn TextEncoder>, text: &ProductTextConfig, batch_size: usize, workers: usize) -> anyhow::Result<Self> {
        let target = embedding_target(encoder.as_ref());
        if let Err(previous) = state.set_embedding_target(target.clone()) {
            anyhow::bail!("state is already bound to encoder {}, not {}", previous.cache_id, target.cache_id);
        }
        let queued = state.enqueue_missing_embeddings(&target.cache_id)?;
        tracing::info!(encoder = %target.cache_id, queued, workers, "embedding workers starting");
        let stop = Arc::new(AtomicBool::new(false));
        let workers = workers.max(1);
        let handles = (0..workers)
            .map(|shard| {
                EmbeddingWorker::new(Arc::clone(state), Arc::clone(&encoder), text.clone(), batch_size, shard, workers)
                    .spawn(Arc::clone(&stop), Duration::from_millis(100))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { stop, workers: handles })
    }

    /// Whether any worker thread has ended (they only end when stopped, or on a panic).
    pub fn any_finished(&self) -> bool {
        self.workers.iter().any(JoinHandle::is_finished)
    }

    /// Stops the workers after their current page; returns what they did in total.
    pub fn stop(self) -> EmbeddingPassReport {
        self.stop.store(true, Ordering::Release);
        let mut total = EmbeddingPassReport::default();
        for worker in self.workers {
            match worker.join() {
                Ok(report) => total.add(report),
                Err(_) => tracing::error!("an embedding worker panicked"),
            }
        }
        total
    }
}
