//! Sentence embeddings with a BERT-family sentence-transformers model (all-MiniLM-L6-v2 by
//! default): Hugging Face tokenizer, [`BertModel`] in burn, mean pooling over the attention
//! mask, L2 normalisation — the `Transformer → Pooling(mean) → Normalize` pipeline of the
//! model's `modules.json`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::bert::{load_bert_weights, BertConfig, BertModel};
use super::{l2_normalise, EncoderError, TextEncoder};

/// Files a model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// A loaded sentence encoder on backend `B`.
pub struct SentenceTransformer<B: Backend> {
    model: BertModel<B>,
    tokenizer: Tokenizer,
    device: B::Device,
    config: BertConfig,
    model_name: String,
    cache_id: String,
    max_sequence_length: usize,
    /// Serialises forward passes: the model is shared by the worker pool, and one forward at a
    /// time already uses every core of the CPU backend.
    forward_lock: Mutex<()>,
}

impl<B: Backend> std::fmt::Debug for SentenceTransformer<B> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SentenceTransformer")
            .field("model_name", &self.model_name)
            .field("cache_id", &self.cache_id)
            .field("max_sequence_length", &self.max_sequence_length)
            .finish()
    }
}

impl<B: Backend> SentenceTransformer<B> {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `model_dir`.
    /// `max_sequence_length` caps tokens per text (special tokens included); `None` takes the
    /// model's `sentence_bert_config.json` value, else 256.
    pub fn load(model_dir: &Path, model_name: &str, max_sequence_length: Option<usize>, device: B::Device) -> Result<Self, EncoderError> {
        for file in MODEL_FILES {
            let path = model_dir.join(file);
            if !path.is_file() {
                return Err(EncoderError::MissingFile(path));
            }
        }
        let config = BertConfig::from_file(&model_dir.join("config.json"))?;
        let max_sequence_length = max_sequence_length
            .or_else(|| sentence_bert_max_length(model_dir))
            .unwrap_or(256)
            .clamp(2, config.max_position_embeddings);
        let mut tokenizer = Tokenizer::from_file(model_dir.join("tokenizer.json"))
            .map_err(|error| EncoderError::InvalidModel(format!("tokenizer.json: {error}")))?;
        // We pad each batch to its own longest text (tokenizer.json pins a fixed length).
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_sequence_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|error| EncoderError::InvalidModel(format!("tokenizer truncation: {error}")))?;
        let mut model = config.init::<B>(&device);
        load_bert_weights(&mut model, &model_dir.join("model.safetensors"))?;
        let weights_digest = file_sha256(&model_dir.join("model.safetensors"))?;
        let cache_id = format!("bert:{model_name}:{}:len{max_sequence_length}", &weights_digest[..16]);
        tracing::info!(model_dir = %model_dir.display(), %cache_id, hidden = config.hidden_size, "sentence encoder loaded");
        Ok(Self { model, tokenizer, device, config, model_name: model_name.to_owned(), cache_id, max_sequence_length, forward_lock: Mutex::new(()) })
    }

    /// The model's `config.json` as read.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Token ids of `text` as the model sees them (special tokens included, truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        let encoding = self.tokenizer.encode(text, true).map_err(|error| EncoderError::Tokenizer(error.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Mean-pooled, L2-normalised embeddings of a batch. Texts are sorted by token count and
    /// run in groups of similar length (at most [`MAX_TEXTS_PER_FORWARD`] texts and
    /// [`MAX_TOKENS_PER_FORWARD`] padded tokens each), so short queries are not padded to the
    /// longest product text; vectors come back in input order.
    ///
    /// # Shapes
    /// - returns `texts.len()` vectors of `hidden_size` floats
    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|error| EncoderError::Tokenizer(error.to_string()))?;
        let token_ids: Vec<&[u32]> = encodings.iter().map(|encoding| encoding.get_ids()).collect();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&index| token_ids[index].len());
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        let mut group_start = 0;
        while group_start < order.len() {
            // Sorted ascending, so the group's last text is its longest.
            let mut group_end = group_start + 1;
            while group_end < order.len()
                && group_end - group_start < MAX_TEXTS_PER_FORWARD
                && (group_end - group_start + 1) * token_ids[order[group_end]].len() <= MAX_TOKENS_PER_FORWARD
            {
                group_end += 1;
            }
            let group = &order[group_start..group_end];
            let group_ids: Vec<&[u32]> = group.iter().map(|&index| token_ids[index]).collect();
            for (&index, vector) in group.iter().zip(self.forward_group(&group_ids)?) {
                vectors[index] = vector;
            }
            group_start = group_end;
        }
        Ok(vectors)
    }

    /// One forward pass over texts padded to the longest of them.
    ///
    /// # Shapes
    /// - `token_ids`: `batch` id sequences of at most `sequence` ids
    /// - returns `batch` vectors of `hidden_size` floats
    fn forward_group(&self, token_ids: &[&[u32]]) -> Result<Vec<Vec<f32>>, EncoderError> {
        let batch = token_ids.len();
        let sequence = token_ids.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        debug_assert!(sequence <= self.max_sequence_length, "the tokenizer truncates");
        let mut padded_ids = vec![0_i64; batch * sequence];
        let mut mask = vec![0_f32; batch * sequence];
        for (row, ids) in token_ids.iter().enumerate() {
            for (column, &id) in ids.iter().enumerate() {
                padded_ids[row * sequence + column] = i64::from(id);
                mask[row * sequence + column] = 1.0;
            }
        }
        let padded_ids = Tensor::<B, 2, Int>::from_data(TensorData::new(padded_ids, [batch, sequence]), &self.device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [batch, sequence]), &self.device);
        let pooled = {
            let _forward = self.forward_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let hidden = self.model.forward(padded_ids, mask.clone());
            mean_pool(hidden, mask)
        };
        let width = self.config.hidden_size;
        let values = pooled
            .into_data()
            .to_vec::<f32>()
            .map_err(|error| EncoderError::Backend(format!("reading embeddings: {error:?}")))?;
        debug_assert_eq!(values.len(), batch * width);
        Ok(values.chunks_exact(width).map(|row| l2_normalise(row.to_vec())).collect())
    }
}

/// Most texts in one forward pass of [`SentenceTransformer`].
pub const MAX_TEXTS_PER_FORWARD: usize = 64;
/// Most padded tokens (texts × longest text) in one forward pass.
pub const MAX_TOKENS_PER_FORWARD: usize = 8_192;

/// Mean of the token vectors where `mask` is 1.
///
/// # Shapes
/// - `hidden`: `[batch, sequence, hidden]`
/// - `mask`: `[batch, sequence]`
/// - returns `[batch, hidden]`
pub fn mean_pool<B: Backend>(hidden: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [batch, sequence, width] = hidden.dims();
    let expanded_mask = mask.reshape([batch, sequence, 1]);
    let summed = (hidden * expanded_mask.clone()).sum_dim(1).reshape([batch, width]);
    // sentence-transformers clamps the token count at 1e-9.
    let counts = expanded_mask.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
    summed / counts
}

impl<B: Backend> TextEncoder for SentenceTransformer<B>
where
    B::Device: Send + Sync,
{
    fn model_name(&self) -> &str {
        &self.model_name
    }

    fn cache_id(&self) -> &str {
        &self.cache_id
    }

    fn dimension(&self) -> usize {
        self.config.hidden_size
    }

    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.embed_batch(texts)
    }
}

fn sentence_bert_max_length(model_dir: &Path) -> Option<usize> {
    let bytes = std::fs::read(model_dir.join("sentence_bert_config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("max_seq_length")?.as_u64().map(|length| length as usize)
}

fn file_sha256(path: &Path) -> Result<String, EncoderError> {
    let mut file = std::fs::File::open(path).map_err(|source| EncoderError::Io { path: path.to_owned(), source })?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| EncoderError::Io { path: path.to_owned(), source })?;
    Ok(hex::encode(hasher.finalize()))
}

/// Where `merge-indexer` looks for the MiniLM model when no directory is configured:
/// `$MERGE_INDEXER_MODEL_DIR`, else `models/all-MiniLM-L6-v2` under the working directory
/// (where `scripts/fetch-minilm.sh` puts it).
pub fn default_model_dir() -> PathBuf {
    std::env::var_os("MERGE_INDEXER_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models/all-MiniLM-L6-v2"))
}
