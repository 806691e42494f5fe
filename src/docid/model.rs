//! The RQ-VAE of MERGE (paper §3.1.1): an MLP encoder to a small latent, `levels` residual
//! codebooks with nearest-codeword quantisation and a straight-through estimator, and a mirrored
//! MLP decoder.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Where the gradient of a level's residual flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidualGradient {
    /// The paper's intent: r_{l+1} = r_l − sg[e_l], so losses on any level's residual reach the
    /// encoder (codewords are trained by L_rq only).
    ThroughResidual,
    /// MERGE's reference code: r_{l+1} is computed from detached values, so the encoder gets no
    /// gradient from levels ≥ 1 and per-level relevance losses there train nothing.
    DetachedLikeReference,
}

/// RQ-VAE shape and behaviour; saved with every trained model.
#[derive(Config, Debug)]
pub struct RqVaeConfig {
    /// Input embedding width (384 for MiniLM).
    pub input_dim: usize,
    /// Encoder hidden widths, in order; the decoder mirrors them.
    #[config(default = "vec![2048, 1024, 512, 256, 128, 64]")]
    pub hidden_dims: Vec<usize>,
    /// Latent width.
    #[config(default = 32)]
    pub latent_dim: usize,
    /// Codebooks (DocID length).
    #[config(default = 4)]
    pub levels: usize,
    /// Codewords per codebook.
    #[config(default = 256)]
    pub codebook_size: usize,
    /// Residual gradient flow.
    #[config(default = "ResidualGradient::ThroughResidual")]
    pub residual_gradient: ResidualGradient,
}

impl RqVaeConfig {
    /// A model with Xavier-uniform layers (zero biases) and standard-normal codebooks (k-means
    /// replaces them before training), all drawn from a ChaCha stream seeded with `seed`, so a
    /// seed fixes the model regardless of the backend's own random state.
    pub fn init<B: Backend>(&self, device: &B::Device, seed: u64) -> RqVae<B> {
        use rand::{Rng, SeedableRng};
        let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut widths = vec![self.input_dim];
        widths.extend(&self.hidden_dims);
        widths.push(self.latent_dim);
        let mut layers = |widths: &[usize]| -> Vec<Linear<B>> {
            widths
                .windows(2)
                .map(|pair| {
                    let (fan_in, fan_out) = (pair[0], pair[1]);
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                    let weights: Vec<f32> = (0..fan_in * fan_out).map(|_| random.random_range(-bound..bound)).collect();
                    let mut layer = LinearConfig::new(fan_in, fan_out).with_initializer(Initializer::Zeros).init(device);
                    layer.weight = Param::from_tensor(Tensor::from_data(TensorData::new(weights, [fan_in, fan_out]), device));
                    layer
                })
                .collect()
        };
        let encoder = layers(&widths);
        let reversed: Vec<usize> = widths.iter().rev().copied().collect();
        let decoder = layers(&reversed);
        let codebooks = (0..self.levels)
            .map(|_| {
                let values: Vec<f32> = (0..self.codebook_size * self.latent_dim).map(|_| random.sample::<f32, _>(rand_distr_normal())).collect();
                Param::from_tensor(Tensor::from_data(TensorData::new(values, [self.codebook_size, self.latent_dim]), device))
            })
            .collect();
        RqVae { encoder, decoder, codebooks, residual_gradient: self.residual_gradient }
    }
}

/// A standard normal sampler (Box–Muller over two uniforms), to avoid another dependency.
fn rand_distr_normal() -> impl rand::distr::Distribution<f32> {
    use rand::distr::Distribution;
    rand::distr::StandardUniform.map(|(first, second): (f32, f32)| {
        let radius = (-2.0 * (1.0 - first).ln()).sqrt();
        radius * (std::f32::consts::TAU * second).cos()
    })
}

/// The model.
#[derive(Module, Debug)]
pub struct RqVae<B: Backend> {
    encoder: Vec<Linear<B>>,
    decoder: Vec<Linear<B>>,
    codebooks: Vec<Param<Tensor<B, 2>>>,
    residual_gradient: ResidualGradient,
}

/// Everything one forward pass produces.
#[derive(Debug, Clone)]
pub struct RqVaeOutput<B: Backend> {
    /// Encoder output z, `[n, latent]`.
    pub encoded: Tensor<B, 2>,
    /// The residual entering each level, `levels × [n, latent]` (r_0 = z).
    pub residuals: Vec<Tensor<B, 2>>,
    /// The codeword each level selected, `levels × [n, latent]`.
    pub codewords: Vec<Tensor<B, 2>>,
    /// Selected code per level, `[n, levels]`.
    pub codes: Tensor<B, 2, Int>,
    /// Squared distance of the last residual to every last-level codeword, `[n, codebook]`:
    /// the costs collision resolution uses.
    pub last_level_costs: Tensor<B, 2>,
    /// Decoder output from the straight-through quantised latent, `[n, input]`.
    pub reconstruction: Tensor<B, 2>,
}

impl<B: Backend> RqVae<B> {
    /// The encoder MLP (ReLU between layers, none after the last).
    ///
    /// # Shapes
    /// - `input`: `[n, input]` → `[n, latent]`
    pub fn encode(&self, input: Tensor<B, 2>) -> Tensor<B, 2> {
        mlp(&self.encoder, input)
    }

    /// The codebooks, `levels × [codebook, latent]`.
    pub fn codebooks(&self) -> Vec<Tensor<B, 2>> {
        self.codebooks.iter().map(Param::val).collect()
    }

    /// Replaces the values of codebook `level` (k-means initialisation, dead-code re-seeding).
    /// The parameter keeps its id, so an optimizer's state for it (AdamW's moments) carries on
    /// instead of restarting under a new id while the old entry lingers.
    ///
    /// # Shapes
    /// - `codewords`: `[codebook, latent]`
    pub fn set_codebook(&mut self, level: usize, codewords: Tensor<B, 2>) {
        debug_assert_eq!(codewords.dims(), self.codebooks[level].val().dims());
        let id = self.codebooks[level].id;
        self.codebooks[level] = Param::initialized(id, codewords.require_grad());
    }

    /// Encodes, quantises level by level (nearest codeword by squared L2) and decodes the
    /// straight-through quantised latent z + sg[ẑ − z].
    ///
    /// # Shapes
    /// - `input`: `[n, input]`; see [`RqVaeOutput`] for the outputs
    pub fn forward(&self, input: Tensor<B, 2>) -> RqVaeOutput<B> {
        let encoded = self.encode(input);
        let mut residual = encoded.clone();
        let mut residuals = Vec::with_capacity(self.codebooks.len());
        let mut codewords = Vec::with_capacity(self.codebooks.len());
        let mut codes = Vec::with_capacity(self.codebooks.len());
        let mut last_level_costs = None;
        for codebook in &self.codebooks {
            let nearest = nearest_codewords(residual.clone(), codebook.val());
            residuals.push(residual.clone());
            codes.push(nearest.codes);
            residual = match self.residual_gradient {
                ResidualGradient::ThroughResidual => residual - nearest.codewords.clone().detach(),
                ResidualGradient::DetachedLikeReference => (residual - nearest.codewords.clone()).detach(),
            };
            codewords.push(nearest.codewords);
            last_level_costs = Some(nearest.distances);
        }
        let quantised = codewords.iter().skip(1).fold(codewords[0].clone(), |sum, codeword| sum + codeword.clone());
        let straight_through = encoded.clone() + (quantised - encoded.clone()).detach();
        let reconstruction = mlp(&self.decoder, straight_through);
        RqVaeOutput {
            encoded,
            residuals,
            codewords,
            codes: Tensor::cat(codes, 1),
            last_level_costs: last_level_costs.expect("at least one level"),
            reconstruction,
        }
    }
}

impl<B: Backend> RqVae<B> {
    /// Codes only (no decoder): the selected code per level and the squared distance of the
    /// last residual to every last-level codeword.
    ///
    /// # Shapes
    /// - `input`: `[n, input]` → (`[n, levels]`, `[n, codebook]`)
    pub fn quantize(&self, input: Tensor<B, 2>) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
        let mut residual = self.encode(input);
        let mut codes = Vec::with_capacity(self.codebooks.len());
        let mut last_level_costs = None;
        for codebook in &self.codebooks {
            let nearest = nearest_codewords(residual.clone(), codebook.val());
            residual = residual - nearest.codewords;
            codes.push(nearest.codes);
            last_level_costs = Some(nearest.distances);
        }
        (Tensor::cat(codes, 1), last_level_costs.expect("at least one level"))
    }
}

fn mlp<B: Backend>(layers: &[Linear<B>], input: Tensor<B, 2>) -> Tensor<B, 2> {
    let last = layers.len() - 1;
    layers.iter().enumerate().fold(input, |hidden, (index, layer)| {
        let output = layer.forward(hidden);
        if index == last {
            output
        } else {
            relu(output)
        }
    })
}

/// One quantisation step: each residual row's nearest codeword by squared L2.
#[derive(Debug, Clone)]
pub struct NearestCodewords<B: Backend> {
    /// Index of the nearest codeword per row, `[n, 1]`.
    pub codes: Tensor<B, 2, Int>,
    /// The selected codewords, `[n, latent]`; gradients flow into the codebook through them.
    pub codewords: Tensor<B, 2>,
    /// Squared distance of every row to every codeword, `[n, codebook]` (no gradient).
    pub distances: Tensor<B, 2>,
}

/// Selects each residual's nearest codeword (squared L2 on detached values; the selected rows of
/// `codebook` keep their gradient). The one quantisation step behind [`RqVae::forward`],
/// [`RqVae::quantize`] and the k-means initialisation of training.
///
/// # Shapes
/// - `residual`: `[n, latent]`, `codebook`: `[codebook, latent]`; see [`NearestCodewords`]
pub fn nearest_codewords<B: Backend>(residual: Tensor<B, 2>, codebook: Tensor<B, 2>) -> NearestCodewords<B> {
    let distances = squared_distances(residual.detach(), codebook.clone().detach());
    let [rows, _] = distances.dims();
    let codes = distances.clone().argmin(1);
    let codewords = codebook.select(0, codes.clone().reshape([rows]));
    NearestCodewords { codes, codewords, distances }
}

/// ‖a_i − b_k‖² for every row pair.
///
/// # Shapes
/// - `left`: `[n, d]`, `right`: `[k, d]` → `[n, k]`
pub fn squared_distances<B: Backend>(left: Tensor<B, 2>, right: Tensor<B, 2>) -> Tensor<B, 2> {
    let left_norms = left.clone().powi_scalar(2).sum_dim(1);
    let right_norms = right.clone().powi_scalar(2).sum_dim(1).transpose();
    (left_norms + right_norms - left.matmul(right.transpose()).mul_scalar(2.0)).clamp_min(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use crate::encoder::InferenceBackend;

    type B = Autodiff<InferenceBackend>;

    fn small(residual_gradient: ResidualGradient) -> (RqVae<B>, Tensor<B, 2>) {
        let device = Default::default();
        let config = RqVaeConfig::new(8).with_hidden_dims(vec![16]).with_latent_dim(4).with_levels(3).with_codebook_size(5).with_residual_gradient(residual_gradient);
        let model = config.init::<B>(&device, 1);
        let input = Tensor::<B, 2>::random([6, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        (model, input)
    }

    #[test]
    fn forward_shapes_and_nearest_codewords() {
        let (model, input) = small(ResidualGradient::ThroughResidual);
        let output = model.forward(input);
        assert_eq!(output.encoded.dims(), [6, 4]);
        assert_eq!(output.residuals.len(), 3);
        assert_eq!(output.codes.dims(), [6, 3]);
        assert_eq!(output.last_level_costs.dims(), [6, 5]);
        assert_eq!(output.reconstruction.dims(), [6, 8]);
        // Each selected code is the argmin of the distances at its level.
        let codebooks = model.codebooks();
        let codes = output.codes.clone().into_data().convert::<i64>().to_vec::<i64>().unwrap();
        for (level, residual) in output.residuals.iter().enumerate() {
            let distances = squared_distances(residual.clone(), codebooks[level].clone()).into_data().to_vec::<f32>().unwrap();
            for row in 0..6 {
                let chosen = codes[row * 3 + level] as usize;
                let best = (0..5).min_by(|a, b| distances[row * 5 + a].total_cmp(&distances[row * 5 + b])).unwrap();
                assert!((distances[row * 5 + chosen] - distances[row * 5 + best]).abs() < 1e-5);
            }
        }
        // r_{l+1} = r_l − e_l.
        let next = (output.residuals[0].clone() - output.codewords[0].clone()).into_data().to_vec::<f32>().unwrap();
        let actual = output.residuals[1].clone().into_data().to_vec::<f32>().unwrap();
        assert!(next.iter().zip(&actual).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    fn encoder_gradient_norm_from_level_two(residual_gradient: ResidualGradient) -> f32 {
        let (model, input) = small(residual_gradient);
        let output = model.forward(input);
        let loss = output.residuals[2].clone().powi_scalar(2).sum();
        let gradients = loss.backward();
        let gradient = model.encoder[0].weight.grad(&gradients);
        gradient.map_or(0.0, |gradient| gradient.powi_scalar(2).sum().into_scalar())
    }

    #[test]
    fn a_level_two_loss_reaches_the_encoder_only_through_the_residual() {
        assert!(encoder_gradient_norm_from_level_two(ResidualGradient::ThroughResidual) > 0.0, "the paper's intent: gradient flows through r_l");
        assert_eq!(encoder_gradient_norm_from_level_two(ResidualGradient::DetachedLikeReference), 0.0, "the reference's detached residual blocks it");
    }

    #[test]
    fn reseeding_a_codebook_keeps_its_parameter_and_its_optimizer_state() {
        use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
        let (mut model, input) = small(ResidualGradient::ThroughResidual);
        let mut optimizer = AdamWConfig::new().init::<B, RqVae<B>>();
        let step = |model: RqVae<B>, optimizer: &mut _| {
            let output = model.forward(input.clone());
            let loss = crate::docid::losses::reconstruction_loss(input.clone(), output.reconstruction)
                + crate::docid::losses::rq_loss(&output.residuals, &output.codewords, 1.0);
            let gradients = GradientsParams::from_grads(loss.backward(), &model);
            Optimizer::step(optimizer, 1e-3, model, gradients)
        };
        model = step(model, &mut optimizer);
        let id = model.codebooks[1].id;
        let states = optimizer.to_record().len();
        assert!(optimizer.to_record().contains_key(&id), "the codebook has optimizer state");
        let device = Default::default();
        model.set_codebook(1, Tensor::<B, 2>::random([5, 4], burn::tensor::Distribution::Normal(0.0, 1.0), &device));
        assert_eq!(model.codebooks[1].id, id, "same parameter after the reseed");
        model = step(model, &mut optimizer);
        let record = optimizer.to_record();
        assert_eq!(record.len(), states, "no second optimizer state for the reseeded codebook");
        assert!(record.contains_key(&id));
        assert!(model.codebooks[1].val().is_require_grad(), "still trained");
    }

    #[test]
    fn the_straight_through_estimator_passes_reconstruction_gradient_to_the_encoder() {
        let (model, input) = small(ResidualGradient::ThroughResidual);
        let output = model.forward(input.clone());
        let loss = crate::docid::losses::reconstruction_loss(input, output.reconstruction);
        let gradients = loss.backward();
        let encoder_gradient = model.encoder[0].weight.grad(&gradients).expect("encoder gradient");
        assert!(encoder_gradient.powi_scalar(2).sum().into_scalar() > 0.0);
    }
}
