//! The encoder stage: product and query text → dense vectors.
//!
//! - [`text`] renders a product as encoder input (MERGE's `title: … description: …` format).
//! - [`hashing`] is the zero-weight default: hashed word and character n-grams, randomly projected.
//! - [`bert`] and [`minilm`] run a sentence-transformers BERT model (all-MiniLM-L6-v2) in burn
//!   from its safetensors weights, on burn's Flex CPU backend or, with the `cuda` feature, the GPU.
//! - [`cache`] fills the embedding cache (kept in state by (encoder, content hash)) with worker
//!   threads off the ingest path.
//!
//! Owns the encoders and [`InferenceBackend`]. May call `state` (the embedding queue and cache,
//! through [`StateStore`](crate::state::StateStore)), `events` (product content) and `metrics`;
//! never Kafka, and never RocksDB directly.

pub mod bert;
pub mod cache;
pub mod hashing;
pub mod minilm;
pub mod text;

use std::path::PathBuf;
use std::sync::Arc;

pub use hashing::{HashingEncoder, HashingEncoderConfig};
pub use minilm::SentenceTransformer;
pub use text::{product_text, ProductTextConfig};

/// The burn backend training and inference run on: burn's CPU Flex backend, or CUDA with the
/// `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub type InferenceBackend = burn::backend::Flex;
/// The burn backend training and inference run on: burn's CPU Flex backend, or CUDA with the
/// `cuda` feature.
#[cfg(feature = "cuda")]
pub type InferenceBackend = burn_cuda::Cuda<f32, i32>;

/// Errors of the encoder stage.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// A model file is absent.
    #[error("model file {0} not found (fetch the model with scripts/fetch-minilm.sh, or set encoder.model_dir)")]
    MissingFile(PathBuf),
    /// A model file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A model file is malformed or describes an unsupported model.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// Tokenisation failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tensor backend failed.
    #[error("backend: {0}")]
    Backend(String),
}

/// Turns texts into L2-normalised vectors of a fixed dimension.
pub trait TextEncoder: Send + Sync {
    /// The model name product events must carry in `embedding_model` for their precomputed
    /// vectors to be used (e.g. `sentence-transformers/all-MiniLM-L6-v2`).
    fn model_name(&self) -> &str;
    /// Identifies the exact function text → vector (model, weights digest, settings): the
    /// embedding cache's key prefix. Changes whenever an output could change.
    fn cache_id(&self) -> &str;
    /// Output dimension.
    fn dimension(&self) -> usize;
    /// Encodes a batch; one vector per text, in order.
    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError>;
}

/// Which encoder to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    /// [`HashingEncoder`]: no weights, instant, lexical.
    Hashing,
    /// all-MiniLM-L6-v2 (or another BERT sentence-transformers model) from `model_dir`.
    Minilm,
}

/// `[encoder]` configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// `hashing` (default, zero set-up) or `minilm`.
    pub kind: EncoderKind,
    /// Directory with `config.json`, `tokenizer.json`, `model.safetensors` for `minilm`
    /// (default: `$MERGE_INDEXER_MODEL_DIR`, else `models/all-MiniLM-L6-v2`).
    pub model_dir: Option<PathBuf>,
    /// The name precomputed vectors must carry in `embedding_model` for `minilm`.
    pub model_name: String,
    /// Tokens per text for `minilm` (default: the model's `sentence_bert_config.json`, 256).
    pub max_sequence_length: Option<usize>,
    /// Texts per encoder call.
    pub batch_size: usize,
    /// Embedding worker threads (each takes batches of products needing vectors).
    pub workers: usize,
    /// Product text rendering.
    pub text: ProductTextConfig,
    /// Hashing encoder parameters.
    pub hashing: HashingEncoderConfig,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            kind: EncoderKind::Hashing,
            model_dir: None,
            model_name: "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
            max_sequence_length: None,
            batch_size: 32,
            workers: 1,
            text: ProductTextConfig::default(),
            hashing: HashingEncoderConfig::default(),
        }
    }
}

impl EncoderConfig {
    /// The model directory `minilm` loads from.
    pub fn resolved_model_dir(&self) -> PathBuf {
        self.model_dir.clone().unwrap_or_else(minilm::default_model_dir)
    }
}

/// Builds the configured encoder (loading weights for `minilm`).
pub fn build_encoder(config: &EncoderConfig) -> Result<Arc<dyn TextEncoder>, EncoderError> {
    match config.kind {
        EncoderKind::Hashing => Ok(Arc::new(HashingEncoder::new(config.hashing.clone())?)),
        EncoderKind::Minilm => {
            let device = burn::tensor::Device::<InferenceBackend>::default();
            let encoder = SentenceTransformer::<InferenceBackend>::load(&config.resolved_model_dir(), &config.model_name, config.max_sequence_length, device)?;
            Ok(Arc::new(encoder))
        }
    }
}

/// Encodes `texts` in calls of at most `batch_size` texts; one vector per text, in order.
pub fn encode_in_batches(encoder: &dyn TextEncoder, texts: &[String], batch_size: usize) -> Result<Vec<Vec<f32>>, EncoderError> {
    let mut vectors = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch_size.max(1)) {
        let borrowed: Vec<&str> = chunk.iter().map(String::as_str).collect();
        vectors.extend(encoder.encode(&borrowed)?);
    }
    Ok(vectors)
}

/// Scales `vector` to unit L2 norm (the zero vector stays zero).
pub fn l2_normalise(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    if norm > 1e-12 {
        for value in &mut vector {
            *value /= norm;
        }
    }
    vector
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine_similarity(left: &[f32], right: &[f32]) -> f32 {
    debug_assert_eq!(left.len(), right.len());
    let dot: f32 = left.iter().zip(right).map(|(a, b)| a * b).sum();
    let norms = left.iter().map(|a| a * a).sum::<f32>().sqrt() * right.iter().map(|b| b * b).sum::<f32>().sqrt();
    if norms <= 1e-12 {
        0.0
    } else {
        dot / norms
    }
}
