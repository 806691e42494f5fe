//! Unit tests of DocID training on small planted corpora.

use super::*;
use burn::backend::Autodiff;
use crate::encoder::InferenceBackend;

/// 96 documents in 6 tight clusters; each of 6 queries grades one cluster E, half of the
/// next cluster S and one document I.
fn clustered_corpus() -> (Vec<Vec<f32>>, Vec<TrainingQuery>) {
    let mut random = ChaCha8Rng::seed_from_u64(3);
    let centres: Vec<Vec<f32>> = (0..6).map(|_| (0..12).map(|_| random.random_range(-1.0..1.0)).collect()).collect();
    let embeddings: Vec<Vec<f32>> = (0..96).map(|index| centres[index % 6].iter().map(|value| value + random.random_range(-0.05..0.05)).collect()).collect();
    let queries = (0..6)
        .map(|cluster| {
            let members = |c: usize| -> Vec<usize> { (0..96).filter(|index| index % 6 == c).collect() };
            let next = members((cluster + 1) % 6);
            TrainingQuery { levels: vec![(3, members(cluster)), (2, next[..8].to_vec()), (0, vec![next[8]])] }
        })
        .collect();
    (embeddings, queries)
}

fn config(variant: Variant) -> DocIdTrainingConfig {
    let model = RqVaeConfig::new(12).with_hidden_dims(vec![32]).with_latent_dim(8).with_levels(3).with_codebook_size(8);
    DocIdTrainingConfig::new(model).with_variant(variant).with_epochs(30).with_batch_size(32).with_learning_rate(3e-3)
}

#[test]
fn a_sampled_query_brings_every_top_level_document_and_anchors_sample_only_relevant_queries() {
    // Query 0 grades 0, 1, 2 Exact and 3 Irrelevant; query 1 grades 0 Irrelevant, 4 Substitute.
    let queries = vec![
        TrainingQuery { levels: vec![(0, vec![3]), (3, vec![0, 1, 2])] },
        TrainingQuery { levels: vec![(0, vec![0]), (2, vec![4])] },
    ];
    let queries_of = relevant_queries_of(5, &queries);
    assert_eq!(queries_of[0], vec![0], "document 0 is irrelevant to query 1: never sampled for it");
    assert!(queries_of[3].is_empty());
    for seed in 0..20 {
        let mut random = ChaCha8Rng::seed_from_u64(seed);
        let batch = build_batch(&[0], &queries_of, &queries, &mut random);
        let mut in_batch: Vec<usize> = batch.documents.clone();
        in_batch.sort_unstable();
        assert!([0, 1, 2].iter().all(|document| in_batch.contains(document)), "all of D_q^E in the batch: {in_batch:?}");
        assert_eq!(batch.alignment.len(), 1);
        let (level, rows) = batch.alignment[0].levels.iter().max_by_key(|(level, _)| *level).unwrap();
        let mut top: Vec<usize> = rows.iter().map(|row| batch.documents[*row]).collect();
        top.sort_unstable();
        assert_eq!((*level, top), (3, vec![0, 1, 2]), "q is the mean of every Exact document, not only the sampled ones");
    }
}

#[test]
fn training_reduces_reconstruction_and_yields_unique_docids() {
    let (embeddings, queries) = clustered_corpus();
    let device = Default::default();
    let (docids, report, _) = train_docids::<Autodiff<InferenceBackend>>(&config(Variant::Merge), &embeddings, &queries, &device, |_, _| {}).unwrap();
    assert_eq!(docids.len(), 96);
    assert_eq!(docids.iter().collect::<BTreeSet<_>>().len(), 96, "DocIDs are unique");
    assert_eq!(report.collisions_after, 0);
    let first = report.losses_per_epoch.first().unwrap();
    let last = report.losses_per_epoch.last().unwrap();
    assert!(last.reconstruction < first.reconstruction * 0.8, "reconstruction {} -> {}", first.reconstruction, last.reconstruction);
    assert!(first.relevance > 0.0 && first.align > 0.0, "relevance losses are active: {first:?}");
    assert_eq!(report.utilisation_per_level.len(), 3);
    assert!(report.unique_tokens_per_layer.iter().all(|count| *count >= 1.0));
    // Same seed, same data order and initialisation, but training is not bit-reproducible
    // on burn's CPU backends (measured on ndarray): the first epoch's loss already differs in its 8th digit from
    // run to run, and 30 epochs amplify that at near-ties, so code *labels* and within-cluster
    // splits differ between runs (a code-by-code comparison failed about 1 run in 30). What
    // a retrain must reproduce is the structure: documents of different clusters never share
    // a first-level code (held in 200 of 200 measured runs).
    assert_first_level_codes_separate_clusters(&docids);
    let (again, _, trained) = train_docids::<Autodiff<InferenceBackend>>(&config(Variant::Merge), &embeddings, &queries, &device, |_, _| {}).unwrap();
    assert_eq!(again.iter().collect::<BTreeSet<_>>().len(), 96, "DocIDs are unique");
    assert_first_level_codes_separate_clusters(&again);
    // Quantizing with one trained model is exactly reproducible (incremental assignment
    // relies on it).
    let rows: Vec<usize> = (0..embeddings.len()).collect();
    let first = quantize_documents(&trained, &embeddings, &rows, &device);
    let second = quantize_documents(&trained, &embeddings, &rows, &device);
    assert_eq!(first, second);
}

/// `clustered_corpus` puts document `index` in cluster `index % 6`: no first-level code may
/// hold documents of two clusters (a cluster may spread over several codes).
fn assert_first_level_codes_separate_clusters(docids: &[DocId]) {
    let mut clusters_of_code: BTreeMap<u8, BTreeSet<usize>> = BTreeMap::new();
    for (index, docid) in docids.iter().enumerate() {
        clusters_of_code.entry(docid.0[0]).or_default().insert(index % 6);
    }
    let mixed: Vec<_> = clusters_of_code.iter().filter(|(_, clusters)| clusters.len() > 1).collect();
    assert!(mixed.is_empty(), "first-level codes shared across clusters: {mixed:?}");
}

/// 96 documents in 8 tight clusters of 12; query q grades clusters 2q and 2q + 1 Exact, so
/// relevance pairs up clusters the embedding geometry keeps apart.
fn paired_cluster_corpus() -> (Vec<Vec<f32>>, Vec<TrainingQuery>) {
    let mut random = ChaCha8Rng::seed_from_u64(5);
    let centres: Vec<Vec<f32>> = (0..8).map(|_| (0..12).map(|_| random.random_range(-1.0..1.0)).collect()).collect();
    let embeddings: Vec<Vec<f32>> = (0..96).map(|index| centres[index % 8].iter().map(|value| value + random.random_range(-0.05..0.05)).collect()).collect();
    let queries = (0..4).map(|query| TrainingQuery { levels: vec![(3, (0..96).filter(|index| index % 8 / 2 == query).collect())] }).collect();
    (embeddings, queries)
}

/// Mean cosine distance of the encodings z of two documents relevant to the same query, over
/// that of two documents relevant to different queries (lower: relevance shapes the space).
fn within_over_between_query_distance(model: &RqVae<InferenceBackend>, embeddings: &[Vec<f32>], queries: &[TrainingQuery]) -> f64 {
    let all: Vec<usize> = (0..embeddings.len()).collect();
    let encoded = model.encode(matrix::<InferenceBackend>(embeddings, &all, &Default::default()));
    let [rows, width] = encoded.dims();
    let values = encoded.into_data().to_vec::<f32>().unwrap();
    let unit: Vec<Vec<f64>> = (0..rows)
        .map(|row| {
            let vector: Vec<f64> = values[row * width..(row + 1) * width].iter().map(|value| f64::from(*value)).collect();
            let norm = vector.iter().map(|value| value * value).sum::<f64>().sqrt().max(1e-12);
            vector.iter().map(|value| value / norm).collect()
        })
        .collect();
    let distance = |left: usize, right: usize| 1.0 - unit[left].iter().zip(&unit[right]).map(|(a, b)| a * b).sum::<f64>();
    let query_of: BTreeMap<usize, usize> = queries.iter().enumerate().flat_map(|(query, graded)| graded.levels[0].1.iter().map(move |document| (*document, query))).collect();
    let (mut within, mut within_pairs, mut between, mut between_pairs) = (0.0, 0usize, 0.0, 0usize);
    for (&left, &left_query) in &query_of {
        for (&right, &right_query) in query_of.range(left + 1..) {
            if left_query == right_query {
                within += distance(left, right);
                within_pairs += 1;
            } else {
                between += distance(left, right);
                between_pairs += 1;
            }
        }
    }
    (within / within_pairs as f64) / (between / between_pairs as f64)
}

#[test]
fn merge_relevance_losses_pull_a_querys_documents_together_where_vanilla_does_not() {
    let (embeddings, queries) = paired_cluster_corpus();
    let device = Default::default();
    // λ scaled up from the paper's (0.01, 0.001) so 30 epochs on 96 documents show the effect.
    // Measured (ratio, lower = tighter): vanilla 0.535; MERGE λ = (1, 0.1) 0.505, (10, 1) 0.402,
    // (10, 0) 0.095, (0, 1) 0.480 — L_align does most of the work on this corpus.
    let train = |config: DocIdTrainingConfig| {
        let (_, report, model) = train_docids::<Autodiff<InferenceBackend>>(&config.with_lambda_align(10.0).with_lambda_relevance(1.0), &embeddings, &queries, &device, |_, _| {}).unwrap();
        (within_over_between_query_distance(&model, &embeddings, &queries), report.unique_tokens_per_layer)
    };
    let (vanilla, vanilla_tokens) = train(config(Variant::Vanilla));
    let (merge, merge_tokens) = train(config(Variant::Merge));
    assert!(
        merge < 0.85 * vanilla,
        "within/between-query distance of z: MERGE {merge:.3} vs vanilla {vanilla:.3}; unique tokens per layer MERGE {merge_tokens:?} vanilla {vanilla_tokens:?}"
    );
}

#[test]
fn gradient_clipping_is_a_saved_setting_and_still_trains() {
    let (embeddings, queries) = clustered_corpus();
    let clipped = config(Variant::Merge).with_gradient_clip_norm(Some(1.0));
    let saved: serde_json::Value = serde_json::from_str(&serde_json::to_string(&clipped).unwrap()).unwrap();
    assert_eq!(saved["gradient_clip_norm"], 1.0);
    assert!(config(Variant::Merge).gradient_clip_norm.is_none(), "the paper's default: no clipping");
    let (docids, report, _) = train_docids::<Autodiff<InferenceBackend>>(&clipped, &embeddings, &queries, &Default::default(), |_, _| {}).unwrap();
    assert_eq!(docids.iter().collect::<BTreeSet<_>>().len(), 96);
    let (first, last) = (report.losses_per_epoch.first().unwrap(), report.losses_per_epoch.last().unwrap());
    assert!(last.reconstruction < first.reconstruction * 0.8, "reconstruction {} -> {}", first.reconstruction, last.reconstruction);
}

#[test]
fn vanilla_variant_trains_without_relevance_losses() {
    let (embeddings, queries) = clustered_corpus();
    let (_, report, _) = train_docids::<Autodiff<InferenceBackend>>(&config(Variant::Vanilla).with_epochs(3), &embeddings, &queries, &Default::default(), |_, _| {}).unwrap();
    assert!(report.losses_per_epoch.iter().all(|terms| terms.align == 0.0 && terms.relevance == 0.0));
}

#[test]
fn validation_split_is_seeded_disjoint_and_complete() {
    let queries: Vec<TrainingQuery> = (0..50).map(|index| TrainingQuery { levels: vec![(3, vec![index])] }).collect();
    let (train, validation) = split_validation(queries.clone(), 0.1, 7);
    assert_eq!((train.len(), validation.len()), (45, 5));
    let (train_again, validation_again) = split_validation(queries.clone(), 0.1, 7);
    assert_eq!((train.clone(), validation.clone()), (train_again, validation_again));
    let mut all: Vec<usize> = train.iter().chain(&validation).map(|query| query.levels[0].1[0]).collect();
    all.sort_unstable();
    assert_eq!(all, (0..50).collect::<Vec<_>>());
    assert_ne!(split_validation(queries, 0.1, 8).1, validation, "another seed, another split");
}

#[test]
fn unique_tokens_count_distinct_codes_per_level_among_relevant_documents() {
    let docids = vec![DocId(vec![1, 2]), DocId(vec![1, 3]), DocId(vec![2, 3])];
    let queries = vec![TrainingQuery { levels: vec![(3, vec![0, 1]), (0, vec![2])] }, TrainingQuery { levels: vec![(1, vec![0, 1, 2])] }];
    // Query 1: level 0 codes {1}, level 1 {2, 3}; query 2: {1, 2}, {2, 3}.
    assert_eq!(unique_tokens_per_layer(&docids, &queries, 2), vec![1.5, 2.0]);
}

