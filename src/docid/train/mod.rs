//! Training the RQ-VAE with MERGE's losses: relevance-aware batches, k-means++ codebook
//! initialisation, AdamW steps, then codes for every document, collision resolution and the
//! report (`train-docids`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::assign::{resolve_collisions, AssignmentReport, CodeSpace, DocId, DocumentCodes, SinkhornConfig};
use super::losses::{alignment_loss, inner_loss, outer_loss, reconstruction_loss, relevance_loss, rq_loss, AlignmentQuery, TripletMetric};
use super::model::{nearest_codewords, RqVae, RqVaeConfig};

/// Which losses train the model (the paper's ablations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// All losses.
    Merge,
    /// L_recon + L_rq only.
    Vanilla,
    /// Without L_align.
    NoAlign,
    /// Without L_outer (β = 0 at every level).
    NoOuter,
    /// Without L_inner (β = 1 at every level).
    NoInner,
}

/// Training settings (paper defaults); saved with the model.
#[derive(Config, Debug)]
pub struct DocIdTrainingConfig {
    /// The model.
    pub model: RqVaeConfig,
    /// Loss variant.
    #[config(default = "Variant::Merge")]
    pub variant: Variant,
    /// α of L_rq.
    #[config(default = 1.0)]
    pub alpha: f64,
    /// β_l per level.
    #[config(default = "vec![1.0, 0.75, 0.5, 0.25]")]
    pub betas: Vec<f64>,
    /// λ1 (L_align).
    #[config(default = 0.01)]
    pub lambda_align: f64,
    /// λ2 (L_rel).
    #[config(default = 0.001)]
    pub lambda_relevance: f64,
    /// InfoNCE temperature τ.
    #[config(default = 0.7)]
    pub temperature: f64,
    /// Triplet margin γ.
    #[config(default = 0.2)]
    pub margin: f64,
    /// Triplet closeness.
    #[config(default = "TripletMetric::Cosine")]
    pub triplet_metric: TripletMetric,
    /// AdamW learning rate.
    #[config(default = 1e-3)]
    pub learning_rate: f64,
    /// Anchor documents per batch.
    #[config(default = 2048)]
    pub batch_size: usize,
    /// Passes over the anchor documents.
    #[config(default = 300)]
    pub epochs: usize,
    /// Seed of sampling and initialisation.
    #[config(default = 7)]
    pub seed: u64,
    /// Share of the training queries held out as the validation split (seeded): they take no
    /// part in the relevance losses and are reported separately.
    #[config(default = 0.1)]
    pub validation_fraction: f64,
    /// Clip each parameter's gradient to this L2 norm before the AdamW step (none by default,
    /// as in the paper).
    #[config(default = "None")]
    pub gradient_clip_norm: Option<f64>,
    /// After each epoch, move every codeword no document selected to the residual of a random
    /// document at that level (the paper's reference has no remedy for codebook collapse).
    #[config(default = true)]
    pub reseed_dead_codes: bool,
}

impl DocIdTrainingConfig {
    fn effective_betas(&self) -> Vec<f64> {
        let levels = self.model.levels;
        let beta = |level: usize| self.betas.get(level).copied().unwrap_or(*self.betas.last().unwrap_or(&0.5));
        (0..levels)
            .map(|level| match self.variant {
                Variant::NoOuter => 0.0,
                Variant::NoInner => 1.0,
                _ => beta(level),
            })
            .collect()
    }
}

/// Graded documents of one training query (indices into the document list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrainingQuery {
    /// `(level, documents)`: 0 = I, 1 = C, 2 = S, 3 = E.
    pub levels: Vec<(usize, Vec<usize>)>,
}

impl TrainingQuery {
    /// One query per distinct key, in key order, from `(query key, level index, document)`
    /// judgements; each level's documents keep their input order.
    pub fn group_by_query<K: Ord>(judged: impl IntoIterator<Item = (K, usize, usize)>) -> Vec<TrainingQuery> {
        let mut by_query: BTreeMap<K, BTreeMap<usize, Vec<usize>>> = BTreeMap::new();
        for (query, level, document) in judged {
            by_query.entry(query).or_default().entry(level).or_default().push(document);
        }
        by_query.into_values().map(|levels| TrainingQuery { levels: levels.into_iter().collect() }).collect()
    }
}

/// Documents and graded queries to train on, read from the indexer's state.
#[derive(Debug, Clone, Default)]
pub struct TrainingSet {
    /// Product id of each document, in order.
    pub product_ids: Vec<String>,
    /// Each document's vector.
    pub embeddings: Vec<Vec<f32>>,
    /// Graded queries over those documents.
    pub queries: Vec<TrainingQuery>,
    /// Stored products left out because their vector under the encoder is not computed yet.
    pub products_without_vector: usize,
}

impl TrainingSet {
    /// Every stored product with a vector under encoder `cache_id`, and one query per (locale,
    /// query text) grouping its judged products by their highest level. Pairs with only
    /// interactions below any level, or whose product is missing, are left out.
    pub fn from_state(state: &crate::state::StateStore, cache_id: &str) -> Result<Self, crate::state::StateError> {
        let mut set = TrainingSet::default();
        let mut index_of: HashMap<String, usize> = HashMap::new();
        for product_id in state.product_ids()? {
            match state.product_embedding(&product_id, cache_id)? {
                Some(vector) => {
                    index_of.insert(product_id.clone(), set.product_ids.len());
                    set.product_ids.push(product_id);
                    set.embeddings.push(vector);
                }
                None => set.products_without_vector += 1,
            }
        }
        let mut judged = Vec::new();
        state.for_each_judgement(|key, aggregate| {
            if let (Some(level), Some(&document)) = (aggregate.max_level, index_of.get(&key.product_id)) {
                judged.push(((key.locale, key.query), level.index(), document));
            }
        })?;
        set.queries = TrainingQuery::group_by_query(judged);
        Ok(set)
    }
}

/// Mean loss terms of one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LossTerms {
    /// L_recon.
    pub reconstruction: f64,
    /// L_rq.
    pub rq: f64,
    /// L_align (unweighted).
    pub align: f64,
    /// L_rel (unweighted).
    pub relevance: f64,
    /// The weighted total.
    pub total: f64,
}

/// The training report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DocIdReport {
    /// Settings.
    pub variant: Variant,
    /// Loss terms of each epoch.
    pub losses_per_epoch: Vec<LossTerms>,
    /// Documents sharing their quantizer code with another, before resolution.
    pub collisions_before: usize,
    /// After resolution (0).
    pub collisions_after: usize,
    /// Resolution details.
    pub assignment: AssignmentReport,
    /// Distinct codes used per level ÷ codebook size.
    pub utilisation_per_level: Vec<f64>,
    /// Perplexity of code usage per level.
    pub perplexity_per_level: Vec<f64>,
    /// Paper Table 3: mean over queries of the number of distinct tokens per level among the
    /// query's relevant (E/S/C) documents; lower = relevant documents share more of their DocID.
    pub unique_tokens_per_layer: Vec<f64>,
    /// Seconds per training step (mean).
    pub seconds_per_step: f64,
    /// Dead codewords re-seeded during training, all levels and epochs.
    pub reseeded_codes: usize,
}

/// One training batch: rows, and the relevance structure in row indices.
struct Batch {
    documents: Vec<usize>,
    pairs: Vec<(usize, usize)>,
    triplets: Vec<(usize, usize, usize)>,
    alignment: Vec<AlignmentQuery>,
}

/// One optimisation step: forward, the variant's losses, backward, AdamW. Returns the updated
/// model and the step's loss terms.
///
/// # Shapes
/// - `input`: `[batch.documents.len(), input_dim]`
fn train_step<B: AutodiffBackend, O: Optimizer<RqVae<B>, B>>(
    model: RqVae<B>,
    optimizer: &mut O,
    config: &DocIdTrainingConfig,
    betas: &[f64],
    input: Tensor<B, 2>,
    batch: &Batch,
) -> (RqVae<B>, LossTerms) {
    let output = model.forward(input.clone());
    let reconstruction = reconstruction_loss(input, output.reconstruction.clone());
    let rq = rq_loss(&output.residuals, &output.codewords, config.alpha);
    let mut total = reconstruction.clone() + rq.clone();
    let mut terms = LossTerms::default();
    if config.variant != Variant::Vanilla {
        if config.variant != Variant::NoAlign {
            let align = alignment_loss(output.encoded.clone(), &batch.alignment, 3);
            terms.align = scalar(&align);
            total = total + align.mul_scalar(config.lambda_align);
        }
        let outer: Vec<_> = output.residuals.iter().map(|residual| outer_loss(residual.clone(), &batch.pairs, config.temperature)).collect();
        let inner: Vec<_> = output.residuals.iter().map(|residual| inner_loss(residual.clone(), &batch.triplets, config.margin, config.triplet_metric)).collect();
        let relevance = relevance_loss(&outer, &inner, betas);
        terms.relevance = scalar(&relevance);
        total = total + relevance.mul_scalar(config.lambda_relevance);
    }
    terms.reconstruction = scalar(&reconstruction);
    terms.rq = scalar(&rq);
    terms.total = scalar(&total);
    let gradients = GradientsParams::from_grads(total.backward(), &model);
    (optimizer.step(config.learning_rate, model, gradients), terms)
}

/// Times training steps at the shapes of `merge_step_torch.py`: `anchors` anchors plus as many
/// InfoNCE partners, triplet positives and triplet negatives (4 × anchors rows) of random
/// `input_dim` embeddings; each anchor's query grades its four rows E, E, S, C. Runs `warm_up`
/// steps untimed, then returns the seconds of each of `steps` timed steps.
pub fn time_steps<B: AutodiffBackend>(config: &DocIdTrainingConfig, anchors: usize, warm_up: usize, steps: usize, device: &B::Device) -> Vec<f64> {
    let mut random = ChaCha8Rng::seed_from_u64(config.seed);
    let rows = 4 * anchors;
    let embeddings: Vec<Vec<f32>> = (0..rows).map(|_| (0..config.model.input_dim).map(|_| random.random_range(-1.0..1.0)).collect()).collect();
    let mut model: RqVae<B> = config.model.init(device, config.seed);
    let batch = Batch {
        documents: (0..rows).collect(),
        pairs: (0..anchors).map(|anchor| (anchor, anchors + anchor)).collect(),
        triplets: (0..anchors).map(|anchor| (anchor, 2 * anchors + anchor, 3 * anchors + anchor)).collect(),
        alignment: (0..anchors)
            .map(|anchor| AlignmentQuery { levels: vec![(3, vec![anchor, anchors + anchor]), (2, vec![2 * anchors + anchor]), (1, vec![3 * anchors + anchor])] })
            .collect(),
    };
    let input = matrix::<B>(&embeddings, &batch.documents, device);
    let betas = config.effective_betas();
    let mut optimizer = AdamWConfig::new().with_weight_decay(1e-4).init();
    let mut timings = Vec::with_capacity(steps);
    for step in 0..warm_up + steps {
        let started = std::time::Instant::now();
        let (updated, terms) = train_step(model, &mut optimizer, config, &betas, input.clone(), &batch);
        model = updated;
        debug_assert!(terms.total.is_finite());
        if step >= warm_up {
            timings.push(started.elapsed().as_secs_f64());
        }
    }
    timings
}

/// Builds a batch from anchor documents: each anchor with a training query it is relevant to
/// (E/S/C) samples one such query, one other relevant document of it (the InfoNCE pair) and,
/// where the query has a lower level, a triplet (anchor, another document of the anchor's level,
/// a document of a lower level; I counts as the lowest). Rows are the anchors and the sampled
/// documents, each once, through an explicit document → row map.
///
/// L_align's query vector q (eq. 3) is the mean encoding of *all* the query's documents at its
/// highest relevance level in the training judgements (D_q^L), so every sampled query brings
/// those rows into the batch, not only the ones that happened to be sampled. A query without E
/// documents takes its highest level present (S, else C) as D_q^L; one with no relevant document
/// is never sampled.
/// The queries each of `documents` documents is relevant (E/S/C) to: an anchor samples one of
/// them, never a query that judged it irrelevant (which could give it neither a pair nor a
/// triplet).
fn relevant_queries_of(documents: usize, queries: &[TrainingQuery]) -> Vec<Vec<usize>> {
    let mut queries_of: Vec<Vec<usize>> = vec![Vec::new(); documents];
    for (query_index, query) in queries.iter().enumerate() {
        for (_, members) in query.levels.iter().filter(|(level, _)| *level >= 1) {
            for &document in members {
                queries_of[document].push(query_index);
            }
        }
    }
    queries_of
}

fn build_batch(anchors: &[usize], queries_of: &[Vec<usize>], queries: &[TrainingQuery], random: &mut ChaCha8Rng) -> Batch {
    let mut row_of: HashMap<usize, usize> = HashMap::new();
    let mut documents = Vec::new();
    let mut row = |document: usize, documents: &mut Vec<usize>| -> usize {
        *row_of.entry(document).or_insert_with(|| {
            documents.push(document);
            documents.len() - 1
        })
    };
    for &anchor in anchors {
        row(anchor, &mut documents);
    }
    let mut pairs = Vec::new();
    let mut triplets = Vec::new();
    let mut sampled_queries = BTreeSet::new();
    for &anchor in anchors {
        let Some(&query_index) = queries_of[anchor].choose(random) else { continue };
        let query = &queries[query_index];
        if sampled_queries.insert(query_index) {
            let top = query.levels.iter().filter(|(level, members)| *level >= 1 && !members.is_empty()).max_by_key(|(level, _)| *level);
            for &document in top.map(|(_, members)| members.as_slice()).unwrap_or_default() {
                row(document, &mut documents);
            }
        }
        let Some(anchor_level) = query.levels.iter().find(|(_, members)| members.contains(&anchor)).map(|(level, _)| *level) else { continue };
        let relevant: Vec<usize> = query.levels.iter().filter(|(level, _)| *level >= 1).flat_map(|(_, members)| members.iter().copied()).filter(|document| *document != anchor).collect();
        if anchor_level >= 1 {
            if let Some(&partner) = relevant.choose(random) {
                let anchor_row = row(anchor, &mut documents);
                let partner_row = row(partner, &mut documents);
                pairs.push((anchor_row, partner_row));
            }
        }
        let same_level: Vec<usize> = query.levels.iter().filter(|(level, _)| *level == anchor_level).flat_map(|(_, members)| members.iter().copied()).filter(|document| *document != anchor).collect();
        let lower: Vec<usize> = query.levels.iter().filter(|(level, _)| *level < anchor_level).flat_map(|(_, members)| members.iter().copied()).collect();
        if let (Some(&positive), Some(&negative)) = (same_level.choose(random), lower.choose(random)) {
            let anchor_row = row(anchor, &mut documents);
            triplets.push((anchor_row, row(positive, &mut documents), row(negative, &mut documents)));
        }
    }
    let alignment = sampled_queries
        .into_iter()
        .map(|query_index| AlignmentQuery {
            levels: queries[query_index]
                .levels
                .iter()
                .filter(|(level, _)| *level >= 1)
                .map(|(level, members)| (*level, members.iter().filter_map(|document| row_of.get(document).copied()).collect::<Vec<_>>()))
                .filter(|(_, rows)| !rows.is_empty())
                .collect(),
        })
        .collect();
    Batch { documents, pairs, triplets, alignment }
}

fn matrix<B: Backend>(embeddings: &[Vec<f32>], documents: &[usize], device: &B::Device) -> Tensor<B, 2> {
    let width = embeddings[0].len();
    let flat: Vec<f32> = documents.iter().flat_map(|document| embeddings[*document].iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [documents.len(), width]), device)
}

/// Each listed document's codes and last-level costs under `model`, in chunks of 4,096 rows
/// (the input of [`resolve_collisions`] and of incremental assignment).
pub fn quantize_documents<B: Backend>(model: &RqVae<B>, embeddings: &[Vec<f32>], documents: &[usize], device: &B::Device) -> Vec<DocumentCodes> {
    let mut quantized = Vec::with_capacity(documents.len());
    for chunk in documents.chunks(4096) {
        let (codes, costs) = model.quantize(matrix::<B>(embeddings, chunk, device));
        let [rows, levels] = codes.dims();
        let [_, size] = costs.dims();
        debug_assert_eq!(rows, chunk.len());
        let codes = codes.into_data().convert::<i64>().to_vec::<i64>().expect("codes");
        let costs = costs.into_data().convert::<f32>().to_vec::<f32>().expect("costs");
        for row in 0..rows {
            quantized.push(DocumentCodes {
                codes: codes[row * levels..(row + 1) * levels].iter().map(|code| *code as u8).collect(),
                last_level_costs: costs[row * size..(row + 1) * size].to_vec(),
            });
        }
    }
    quantized
}

/// k-means++ seeding then Lloyd iterations on the rows of `points`; returns `k` centroids
/// (rows repeat when there are fewer distinct points than `k`).
///
/// # Shapes
/// - `points`: `[n, d]` → `[k, d]`
pub fn kmeans<B: Backend>(points: Tensor<B, 2>, k: usize, iterations: usize, random: &mut ChaCha8Rng) -> Tensor<B, 2> {
    let [count, width] = points.dims();
    let device = points.device();
    let values = points.clone().into_data().to_vec::<f32>().expect("f32 points");
    let row = |index: usize| &values[index * width..(index + 1) * width];
    let distance = |left: &[f32], right: &[f32]| left.iter().zip(right).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
    let mut centroids: Vec<Vec<f32>> = vec![row(random.random_range(0..count)).to_vec()];
    let mut nearest: Vec<f32> = (0..count).map(|index| distance(row(index), &centroids[0])).collect();
    while centroids.len() < k {
        let total: f32 = nearest.iter().sum();
        let chosen = if total <= 0.0 {
            random.random_range(0..count)
        } else {
            let mut target = random.random_range(0.0..total);
            nearest.iter().position(|weight| {
                target -= weight;
                target <= 0.0
            }).unwrap_or(count - 1)
        };
        centroids.push(row(chosen).to_vec());
        let newest = centroids.last().expect("just pushed").clone();
        for (index, slot) in nearest.iter_mut().enumerate() {
            *slot = slot.min(distance(row(index), &newest));
        }
    }
    for _ in 0..iterations {
        let mut sums = vec![vec![0.0_f32; width]; k];
        let mut counts = vec![0usize; k];
        for index in 0..count {
            let best = (0..k).min_by(|a, b| distance(row(index), &centroids[*a]).total_cmp(&distance(row(index), &centroids[*b]))).expect("k > 0");
            counts[best] += 1;
            for (sum, value) in sums[best].iter_mut().zip(row(index)) {
                *sum += value;
            }
        }
        for cluster in 0..k {
            if counts[cluster] > 0 {
                centroids[cluster] = sums[cluster].iter().map(|sum| sum / counts[cluster] as f32).collect();
            }
        }
    }
    let flat: Vec<f32> = centroids.into_iter().flatten().collect();
    Tensor::from_data(TensorData::new(flat, [k, width]), &device)
}

/// Trains on `embeddings` (one per document) with the graded `queries`, then assigns every
/// document a unique DocID. Returns the DocIDs in document order and the report.
pub fn train_docids<B: AutodiffBackend>(
    config: &DocIdTrainingConfig,
    embeddings: &[Vec<f32>],
    queries: &[TrainingQuery],
    device: &B::Device,
    mut on_epoch: impl FnMut(usize, &LossTerms),
) -> anyhow::Result<(Vec<DocId>, DocIdReport, RqVae<B::InnerBackend>)> {
    anyhow::ensure!(!embeddings.is_empty(), "no documents to train on");
    let mut random = ChaCha8Rng::seed_from_u64(config.seed);
    let mut model: RqVae<B> = config.model.init(device, config.seed);
    let queries_of = relevant_queries_of(embeddings.len(), queries);
    // Every document is an anchor (reconstruction needs all of them); relevance losses come
    // from those with training queries.
    let mut anchors: Vec<usize> = (0..embeddings.len()).collect();
    // k-means++ on the first batch's residuals, level by level.
    anchors.shuffle(&mut random);
    let first: Vec<usize> = anchors.iter().take(config.batch_size.max(config.model.codebook_size)).copied().collect();
    let mut residual = model.valid().encode(matrix::<B::InnerBackend>(embeddings, &first, &device_inner::<B>(device)));
    for level in 0..config.model.levels {
        let centroids = kmeans(residual.clone(), config.model.codebook_size, 10, &mut random);
        residual = residual.clone() - nearest_codewords(residual, centroids.clone()).codewords;
        model.set_codebook(level, Tensor::from_data(centroids.into_data(), device));
    }
    let betas = config.effective_betas();
    let mut optimizer = AdamWConfig::new()
        .with_grad_clipping(config.gradient_clip_norm.map(|norm| burn::optim::grad_clipping::GradientClippingConfig::Norm(norm as f32)))
        .init();
    let mut losses_per_epoch = Vec::with_capacity(config.epochs);
    let mut step_seconds = 0.0;
    let mut steps = 0usize;
    let mut reseeded_codes = 0usize;
    for epoch in 0..config.epochs {
        anchors.shuffle(&mut random);
        let mut epoch_terms = LossTerms::default();
        let mut batches = 0usize;
        for chunk in anchors.chunks(config.batch_size.max(1)) {
            let started = std::time::Instant::now();
            let batch = build_batch(chunk, &queries_of, queries, &mut random);
            let input = matrix::<B>(embeddings, &batch.documents, device);
            let (updated, terms) = train_step(model, &mut optimizer, config, &betas, input, &batch);
            model = updated;
            epoch_terms.reconstruction += terms.reconstruction;
            epoch_terms.rq += terms.rq;
            epoch_terms.align += terms.align;
            epoch_terms.relevance += terms.relevance;
            epoch_terms.total += terms.total;
            step_seconds += started.elapsed().as_secs_f64();
            steps += 1;
            batches += 1;
        }
        let scale = 1.0 / batches.max(1) as f64;
        let terms = LossTerms {
            reconstruction: epoch_terms.reconstruction * scale,
            rq: epoch_terms.rq * scale,
            align: epoch_terms.align * scale,
            relevance: epoch_terms.relevance * scale,
            total: epoch_terms.total * scale,
        };
        on_epoch(epoch, &terms);
        losses_per_epoch.push(terms);
        if config.reseed_dead_codes && epoch + 1 < config.epochs {
            reseeded_codes += reseed_dead_codes(&mut model, embeddings, config, &mut random, device);
        }
    }
    // Codes for every document.
    let inference = model.valid();
    let all: Vec<usize> = (0..embeddings.len()).collect();
    let documents = quantize_documents(&inference, embeddings, &all, &device_inner::<B>(device));
    let space = CodeSpace { levels: config.model.levels, codebook_size: config.model.codebook_size };
    let (docids, assignment) = resolve_collisions(&documents, space, SinkhornConfig::default())?;
    let (utilisation_per_level, perplexity_per_level) = usage(&documents, space);
    let unique_tokens_per_layer = unique_tokens_per_layer(&docids, queries, space.levels);
    let report = DocIdReport {
        variant: config.variant,
        losses_per_epoch,
        collisions_before: assignment.collisions_before,
        collisions_after: assignment.collisions_after,
        assignment,
        utilisation_per_level,
        perplexity_per_level,
        unique_tokens_per_layer,
        seconds_per_step: step_seconds / steps.max(1) as f64,
        reseeded_codes,
    };
    Ok((docids, report, inference))
}

/// Re-seeds dead codewords, level by level: codes that no document selects (over all documents)
/// are replaced by the level's residuals of randomly chosen documents. Returns how many.
fn reseed_dead_codes<B: AutodiffBackend>(model: &mut RqVae<B>, embeddings: &[Vec<f32>], config: &DocIdTrainingConfig, random: &mut ChaCha8Rng, device: &B::Device) -> usize {
    let inner_device = device_inner::<B>(device);
    let all: Vec<usize> = (0..embeddings.len()).collect();
    let output = model.valid().forward(matrix::<B::InnerBackend>(embeddings, &all, &inner_device));
    let levels = config.model.levels;
    let size = config.model.codebook_size;
    let width = config.model.latent_dim;
    let codes = output.codes.into_data().convert::<i64>().to_vec::<i64>().expect("codes");
    let mut reseeded = 0;
    for level in 0..levels {
        let mut used = vec![false; size];
        for row in 0..embeddings.len() {
            used[codes[row * levels + level] as usize] = true;
        }
        let dead: Vec<usize> = (0..size).filter(|code| !used[*code]).collect();
        if dead.is_empty() {
            continue;
        }
        let residuals = output.residuals[level].clone().into_data().to_vec::<f32>().expect("residuals");
        let mut codebook = model.codebooks()[level].clone().into_data().convert::<f32>().to_vec::<f32>().expect("codebook");
        for &code in &dead {
            let donor = random.random_range(0..embeddings.len());
            codebook[code * width..(code + 1) * width].copy_from_slice(&residuals[donor * width..(donor + 1) * width]);
        }
        model.set_codebook(level, Tensor::from_data(TensorData::new(codebook, [size, width]), device));
        reseeded += dead.len();
    }
    reseeded
}

fn device_inner<B: AutodiffBackend>(device: &burn::tensor::Device<B>) -> burn::tensor::Device<B::InnerBackend> {
    // Autodiff runs on its inner backend's device.
    B::Device::clone(device)
}

fn scalar<B: Backend>(tensor: &Tensor<B, 1>) -> f64 {
    f64::from(tensor.clone().into_data().convert::<f32>().to_vec::<f32>().expect("f32 scalar")[0])
}

/// Distinct codes used per level ÷ codebook size, and the perplexity exp(H) of code usage.
fn usage(documents: &[DocumentCodes], space: CodeSpace) -> (Vec<f64>, Vec<f64>) {
    (0..space.levels)
        .map(|level| {
            let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
            for document in documents {
                *counts.entry(document.codes[level]).or_default() += 1;
            }
            let total = documents.len() as f64;
            let entropy: f64 = counts.values().map(|count| *count as f64 / total).map(|p| -p * p.ln()).sum();
            (counts.len() as f64 / space.codebook_size as f64, entropy.exp())
        })
        .unzip()
}

/// Splits training queries into (train, validation), holding out `fraction` of them (at least
/// one when there are two or more) by a shuffle seeded with `seed`.
pub fn split_validation(queries: Vec<TrainingQuery>, fraction: f64, seed: u64) -> (Vec<TrainingQuery>, Vec<TrainingQuery>) {
    let held_out = ((queries.len() as f64 * fraction.clamp(0.0, 0.9)).round() as usize).max(usize::from(queries.len() >= 2 && fraction > 0.0));
    let mut order: Vec<usize> = (0..queries.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f_7a11d));
    let validation_set: BTreeSet<usize> = order.into_iter().take(held_out).collect();
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for (index, query) in queries.into_iter().enumerate() {
        if validation_set.contains(&index) {
            validation.push(query);
        } else {
            train.push(query);
        }
    }
    (train, validation)
}

/// Paper Table 3 statistic over queries with at least one relevant (E/S/C) document.
pub fn unique_tokens_per_layer(docids: &[DocId], queries: &[TrainingQuery], levels: usize) -> Vec<f64> {
    let mut sums = vec![0.0; levels];
    let mut counted = 0usize;
    for query in queries {
        let relevant: Vec<&DocId> = query.levels.iter().filter(|(level, _)| *level >= 1).flat_map(|(_, members)| members.iter().map(|document| &docids[*document])).collect();
        if relevant.is_empty() {
            continue;
        }
        counted += 1;
        for (level, sum) in sums.iter_mut().enumerate() {
            *sum += relevant.iter().map(|docid| docid.0[level]).collect::<BTreeSet<_>>().len() as f64;
        }
    }
    sums.into_iter().map(|sum| sum / counted.max(1) as f64).collect()
}

#[cfg(test)]
mod tests;
