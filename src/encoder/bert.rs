//! A BERT encoder (the architecture of sentence-transformers' MiniLM models) in burn, loaded
//! from a Hugging Face `model.safetensors` with burn's store: PyTorch linear weights are
//! transposed and `LayerNorm.weight/bias` become `gamma/beta` by `PyTorchToBurnAdapter`; the
//! few names that differ from ours are remapped by regex (see [`load_bert_weights`]).

use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::EncoderError;

/// The fields of a Hugging Face BERT `config.json` this implementation reads; saved with every
/// model that uses it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BertConfig {
    /// Word-piece vocabulary size.
    pub vocab_size: usize,
    /// Hidden width (384 for MiniLM-L6).
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; `hidden_size` must be a multiple.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Token-type (segment) vocabulary size.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward layer; only `gelu` (the exact, erf-based one) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

fn default_hidden_act() -> String {
    "gelu".to_owned()
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, EncoderError> {
        let bytes = std::fs::read(path).map_err(|source| EncoderError::Io { path: path.to_owned(), source })?;
        let config: Self = serde_json::from_slice(&bytes)
            .map_err(|error| EncoderError::InvalidModel(format!("{}: {error}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), EncoderError> {
        if self.hidden_act != "gelu" {
            return Err(EncoderError::InvalidModel(format!("hidden_act {:?} is not supported (only gelu)", self.hidden_act)));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(EncoderError::InvalidModel(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// Builds a randomly initialised model of this shape on `device` (weights are then loaded).
    pub fn init<B: Backend>(&self, device: &B::Device) -> BertModel<B> {
        let layer_norm = || LayerNormConfig::new(self.hidden_size).with_epsilon(self.layer_norm_eps).init(device);
        let linear = |input: usize, output: usize| LinearConfig::new(input, output).init(device);
        let embeddings = BertEmbeddings {
            word_embeddings: EmbeddingConfig::new(self.vocab_size, self.hidden_size).init(device),
            position_embeddings: EmbeddingConfig::new(self.max_position_embeddings, self.hidden_size).init(device),
            token_type_embeddings: EmbeddingConfig::new(self.type_vocab_size, self.hidden_size).init(device),
            layer_norm: layer_norm(),
        };
        let layer = (0..self.num_hidden_layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    self_attention: BertSelfAttention {
                        query: linear(self.hidden_size, self.hidden_size),
                        key: linear(self.hidden_size, self.hidden_size),
                        value: linear(self.hidden_size, self.hidden_size),
                        heads: self.num_attention_heads,
                    },
                    output: BertResidualOutput { dense: linear(self.hidden_size, self.hidden_size), layer_norm: layer_norm() },
                },
                intermediate: BertIntermediate { dense: linear(self.hidden_size, self.intermediate_size) },
                output: BertResidualOutput { dense: linear(self.intermediate_size, self.hidden_size), layer_norm: layer_norm() },
            })
            .collect();
        BertModel { embeddings, encoder: BertEncoder { layer } }
    }
}

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    word_embeddings: Embedding<B>,
    position_embeddings: Embedding<B>,
    token_type_embeddings: Embedding<B>,
    layer_norm: LayerNorm<B>,
}

impl<B: Backend> BertEmbeddings<B> {
    /// # Shapes
    /// - `token_ids`: `[batch, sequence]`
    /// - returns `[batch, sequence, hidden]`
    fn forward(&self, token_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, sequence] = token_ids.dims();
        let device = token_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..sequence as i64, &device).unsqueeze::<2>().repeat_dim(0, batch);
        // Single-segment input: every token has type 0.
        let token_types = Tensor::<B, 2, Int>::zeros([batch, sequence], &device);
        let summed = self.word_embeddings.forward(token_ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(token_types);
        self.layer_norm.forward(summed)
    }
}

/// Multi-head self-attention (the `attention.self` block of a BERT layer).
#[derive(Module, Debug)]
pub struct BertSelfAttention<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    heads: usize,
}

impl<B: Backend> BertSelfAttention<B> {
    /// # Shapes
    /// - `hidden`: `[batch, sequence, hidden]`
    /// - `attention_bias`: `[batch, 1, 1, sequence]`, 0 for tokens, a large negative for padding
    /// - returns `[batch, sequence, hidden]`
    fn forward(&self, hidden: Tensor<B, 3>, attention_bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, sequence, width] = hidden.dims();
        let head_width = width / self.heads;
        let split_heads = |projected: Tensor<B, 3>| projected.reshape([batch, sequence, self.heads, head_width]).swap_dims(1, 2);
        let query = split_heads(apply_per_token(&self.query, hidden.clone()));
        let key = split_heads(apply_per_token(&self.key, hidden.clone()));
        let value = split_heads(apply_per_token(&self.value, hidden));
        let scores = query.matmul(key.swap_dims(2, 3)).div_scalar((head_width as f64).sqrt()) + attention_bias;
        let weights = softmax(scores, 3);
        weights.matmul(value).swap_dims(1, 2).reshape([batch, sequence, width])
    }
}

/// Applies `linear` to every token as ONE `[batch × sequence, width]` matrix product: a 3-d
/// input would be multiplied per sequence (batch small products), several times slower on
/// the CPU backend.
///
/// # Shapes
/// - `input`: `[batch, sequence, d_input]`
/// - returns `[batch, sequence, d_output]`
fn apply_per_token<B: Backend>(linear: &Linear<B>, input: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, sequence, width] = input.dims();
    let output = linear.forward(input.reshape([batch * sequence, width]));
    let [_, output_width] = output.dims();
    output.reshape([batch, sequence, output_width])
}

/// A dense projection, added to the block's input and normalised (`attention.output` and
/// `output` of a BERT layer).
#[derive(Module, Debug)]
pub struct BertResidualOutput<B: Backend> {
    dense: Linear<B>,
    layer_norm: LayerNorm<B>,
}

impl<B: Backend> BertResidualOutput<B> {
    /// # Shapes
    /// - `block_output`: `[batch, sequence, block width]`
    /// - `block_input`: `[batch, sequence, hidden]`
    /// - returns `[batch, sequence, hidden]`
    fn forward(&self, block_output: Tensor<B, 3>, block_input: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layer_norm.forward(apply_per_token(&self.dense, block_output) + block_input)
    }
}

/// Self-attention plus its residual output.
#[derive(Module, Debug)]
pub struct BertAttention<B: Backend> {
    self_attention: BertSelfAttention<B>,
    output: BertResidualOutput<B>,
}

/// The feed-forward expansion with GELU.
#[derive(Module, Debug)]
pub struct BertIntermediate<B: Backend> {
    dense: Linear<B>,
}

/// One transformer layer.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    attention: BertAttention<B>,
    intermediate: BertIntermediate<B>,
    output: BertResidualOutput<B>,
}

impl<B: Backend> BertLayer<B> {
    /// # Shapes
    /// - `hidden`: `[batch, sequence, hidden]`
    /// - `attention_bias`: `[batch, 1, 1, sequence]`
    /// - returns `[batch, sequence, hidden]`
    fn forward(&self, hidden: Tensor<B, 3>, attention_bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let attended = self.attention.self_attention.forward(hidden.clone(), attention_bias);
        let attended = self.attention.output.forward(attended, hidden);
        let expanded = gelu(apply_per_token(&self.intermediate.dense, attended.clone()));
        self.output.forward(expanded, attended)
    }
}

/// The layer stack.
#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    layer: Vec<BertLayer<B>>,
}

/// A BERT model without pooler: token ids in, last hidden states out.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    embeddings: BertEmbeddings<B>,
    encoder: BertEncoder<B>,
}

impl<B: Backend> BertModel<B> {
    /// # Shapes
    /// - `token_ids`: `[batch, sequence]`
    /// - `attention_mask`: `[batch, sequence]`, 1.0 for tokens and 0.0 for padding
    /// - returns the last hidden states, `[batch, sequence, hidden]`
    pub fn forward(&self, token_ids: Tensor<B, 2, Int>, attention_mask: Tensor<B, 2>) -> Tensor<B, 3> {
        let [batch, sequence] = attention_mask.dims();
        // Padding gets -10,000 before the softmax (what BERT was trained with): exp() of it is 0
        // in f32, and unlike -inf it cannot produce NaN for an all-padding row.
        let attention_bias = (attention_mask.neg() + 1.0).mul_scalar(-10_000.0).reshape([batch, 1, 1, sequence]);
        let mut hidden = self.embeddings.forward(token_ids);
        for layer in &self.encoder.layer {
            hidden = layer.forward(hidden, attention_bias.clone());
        }
        hidden
    }
}

/// Loads a Hugging Face BERT `model.safetensors` into `model`. Every parameter of the model
/// must be found (the checkpoint may hold more, e.g. `pooler.*`, which is ignored).
pub fn load_bert_weights<B: Backend>(model: &mut BertModel<B>, weights: &Path) -> Result<(), EncoderError> {
    if !weights.is_file() {
        return Err(EncoderError::MissingFile(weights.to_owned()));
    }
    let mut store = SafetensorsStore::from_file(weights)
        .with_from_adapter(PyTorchToBurnAdapter)
        // Some exports prefix every key with the architecture name.
        .with_key_remapping(r"^bert\.", "")
        .with_key_remapping(r"\.LayerNorm\.", ".layer_norm.")
        .with_key_remapping(r"\.attention\.self\.", ".attention.self_attention.")
        .allow_partial(true);
    let result = model.load_from(&mut store).map_err(|error| EncoderError::InvalidModel(format!("{}: {error}", weights.display())))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        return Err(EncoderError::InvalidModel(format!(
            "{}: missing tensors {:?}, errors {:?}",
            weights.display(),
            result.missing,
            result.errors
        )));
    }
    tracing::debug!(applied = result.applied.len(), skipped = result.skipped.len(), unused = result.unused.len(), "bert weights loaded");
    Ok(())
}
