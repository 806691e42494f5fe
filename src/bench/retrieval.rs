//! `merge-indexer bench retrieval`: dense retrieval quality (R@10, R@100, NDCG@100) of an
//! encoder on the graded ESCI folder, exact cosine.

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use merge_indexer::config::Config;

/// `bench retrieval` flags.
#[derive(Debug, Args, Clone)]
pub struct RetrievalBenchArgs {
    /// Encoder to evaluate [default: the configured one].
    #[arg(long, value_enum)]
    pub encoder: Option<merge_indexer::encoder::EncoderKind>,
    /// Texts per encoder call.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

/// Metrics of one split of judged queries.
#[derive(Debug, Clone, Serialize)]
pub struct SplitMetrics {
    /// `test`, `train` or `all`.
    pub split: &'static str,
    /// The averages.
    pub metrics: merge_indexer::eval::metrics::RetrievalMetrics,
}

/// Dense retrieval quality of an encoder on the graded ESCI folder: every product (title +
/// description) and every judged query are encoded once; each query ranks all products by
/// exact cosine; recall@10/100 and NDCG@100 are averaged over the queries of the test split,
/// the train split and both. Relevant = E, S or C; NDCG gains E=3, S=2, C=1, I=0. Prints a
/// table and one JSON line.
pub fn retrieval_benchmark(mut config: Config, arguments: &RetrievalBenchArgs) -> anyhow::Result<()> {
    use std::collections::{BTreeMap, HashMap};
    if let Some(kind) = arguments.encoder {
        config.encoder.kind = kind;
    }
    let directory = merge_indexer::eval::datasets::default_esci_graded_dir();
    anyhow::ensure!(
        directory.join("products.jsonl").is_file(),
        "graded ESCI data not found in {} (set {})",
        directory.display(),
        merge_indexer::eval::datasets::ESCI_GRADED_DIR_ENV
    );
    let data = merge_indexer::eval::datasets::EsciGraded::load(&directory)?;
    let encoder = merge_indexer::encoder::build_encoder(&config.encoder)?;
    let started = Instant::now();
    let product_texts: Vec<String> = data.products.iter().map(|product| merge_indexer::encoder::product_text(&product.content(), &config.encoder.text)).collect();
    let product_vectors = merge_indexer::encoder::encode_in_batches(encoder.as_ref(), &product_texts, arguments.batch_size)?;
    let encode_seconds = started.elapsed().as_secs_f64();
    let product_ids: Vec<&str> = data.products.iter().map(|product| product.product_id.as_str()).collect();
    let gain_of = |judgement: &merge_indexer::eval::datasets::GradedJudgement| match judgement.level() {
        Some(merge_indexer::events::RelevanceLevel::Exact) => 3.0,
        Some(merge_indexer::events::RelevanceLevel::Substitute) => 2.0,
        Some(merge_indexer::events::RelevanceLevel::Complement) => 1.0,
        _ => 0.0,
    };
    let mut results = Vec::new();
    for (split, judgements) in [("test", data.test.iter().collect::<Vec<_>>()), ("train", data.train.iter().collect()), ("all", data.train.iter().chain(&data.test).collect())] {
        let mut graded: BTreeMap<&str, HashMap<&str, f64>> = BTreeMap::new();
        for judgement in judgements {
            graded.entry(judgement.query.as_str()).or_default().insert(judgement.product_id.as_str(), gain_of(judgement));
        }
        let queries: Vec<&str> = graded.keys().copied().collect();
        let query_texts: Vec<String> = queries.iter().map(|query| query.to_string()).collect();
        let query_vectors = merge_indexer::encoder::encode_in_batches(encoder.as_ref(), &query_texts, arguments.batch_size)?;
        let metrics = merge_indexer::eval::metrics::evaluate_dense(&query_vectors, &product_vectors, &product_ids, &queries, &graded);
        println!(
            "{} on ESCI graded, {split:>5} split ({:>3} queries, {} products): R@10 {:.4}  R@100 {:.4}  NDCG@100 {:.4}",
            encoder.model_name(),
            metrics.queries,
            product_ids.len(),
            metrics.recall_at_10,
            metrics.recall_at_100,
            metrics.ndcg_at_100
        );
        results.push(SplitMetrics { split, metrics });
    }
    println!("products encoded in {encode_seconds:.1} s ({:.1} products/s)", product_ids.len() as f64 / encode_seconds.max(1e-9));
    println!(
        "{}",
        serde_json::json!({ "encoder": encoder.cache_id(), "backend": merge_indexer::BACKEND_NAME, "products": product_ids.len(), "splits": results, "encode_seconds": encode_seconds })
    );
    Ok(())
}
