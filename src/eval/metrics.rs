//! Offline retrieval metrics over graded judgements: recall@k and NDCG@k, and exact dense
//! retrieval by cosine. Shared by `bench retrieval` and, later, the retriever's evaluation.

use std::collections::{BTreeMap, HashMap};

/// Averages over the evaluated queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RetrievalMetrics {
    /// Queries with at least one relevant product (the others are skipped).
    pub queries: usize,
    /// Mean fraction of a query's relevant products (gain > 0) in its top 10.
    pub recall_at_10: f64,
    /// Same in the top 100.
    pub recall_at_100: f64,
    /// Mean NDCG over the top 100 with the given gains (ideal = the judged gains sorted).
    pub ndcg_at_100: f64,
}

/// Recall@k of one ranking: relevant (gain > 0) products in the first `k`, over all relevant.
pub fn recall_at(ranking: &[&str], gains: &HashMap<&str, f64>, k: usize) -> f64 {
    let relevant = gains.values().filter(|gain| **gain > 0.0).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = ranking.iter().take(k).filter(|product| gains.get(*product).is_some_and(|gain| *gain > 0.0)).count();
    found as f64 / relevant as f64
}

/// NDCG@k of one ranking with linear gains and log2 discounts; unjudged products gain 0.
pub fn ndcg_at(ranking: &[&str], gains: &HashMap<&str, f64>, k: usize) -> f64 {
    let discount = |rank: usize| 1.0 / ((rank + 2) as f64).log2();
    let dcg: f64 = ranking.iter().take(k).enumerate().map(|(rank, product)| gains.get(product).copied().unwrap_or(0.0) * discount(rank)).sum();
    let mut ideal: Vec<f64> = gains.values().copied().filter(|gain| *gain > 0.0).collect();
    ideal.sort_by(|left, right| right.total_cmp(left));
    let ideal_dcg: f64 = ideal.iter().take(k).enumerate().map(|(rank, gain)| gain * discount(rank)).sum();
    if ideal_dcg == 0.0 {
        0.0
    } else {
        dcg / ideal_dcg
    }
}

/// Ranks all products for each query by exact inner product (vectors are unit length, so
/// cosine) and averages recall@10, recall@100 and NDCG@100 over queries with a relevant product.
///
/// # Shapes
/// - `query_vectors`: `queries.len()` vectors of dimension d
/// - `product_vectors`: `product_ids.len()` vectors of dimension d
pub fn evaluate_dense(
    query_vectors: &[Vec<f32>],
    product_vectors: &[Vec<f32>],
    product_ids: &[&str],
    queries: &[&str],
    graded: &BTreeMap<&str, HashMap<&str, f64>>,
) -> RetrievalMetrics {
    debug_assert_eq!(query_vectors.len(), queries.len());
    debug_assert_eq!(product_vectors.len(), product_ids.len());
    let mut totals = RetrievalMetrics::default();
    for (query, query_vector) in queries.iter().zip(query_vectors) {
        let Some(gains) = graded.get(query) else { continue };
        if !gains.values().any(|gain| *gain > 0.0) {
            continue;
        }
        let mut scored: Vec<(f32, usize)> = product_vectors
            .iter()
            .enumerate()
            .map(|(index, vector)| (vector.iter().zip(query_vector).map(|(a, b)| a * b).sum::<f32>(), index))
            .collect();
        let top = 100.min(scored.len());
        if top > 0 && top < scored.len() {
            scored.select_nth_unstable_by(top - 1, |left, right| right.0.total_cmp(&left.0).then(left.1.cmp(&right.1)));
        }
        scored.truncate(top);
        scored.sort_by(|left, right| right.0.total_cmp(&left.0).then(left.1.cmp(&right.1)));
        let ranking: Vec<&str> = scored.iter().map(|(_, index)| product_ids[*index]).collect();
        totals.queries += 1;
        totals.recall_at_10 += recall_at(&ranking, gains, 10);
        totals.recall_at_100 += recall_at(&ranking, gains, 100);
        totals.ndcg_at_100 += ndcg_at(&ranking, gains, 100);
    }
    if totals.queries > 0 {
        let count = totals.queries as f64;
        totals.recall_at_10 /= count;
        totals.recall_at_100 /= count;
        totals.ndcg_at_100 /= count;
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_and_ndcg_match_hand_computed_values() {
        let gains: HashMap<&str, f64> = [("a", 3.0), ("b", 1.0), ("c", 0.0)].into_iter().collect();
        let ranking = ["x", "a", "c", "b"];
        assert_eq!(recall_at(&ranking, &gains, 1), 0.0);
        assert_eq!(recall_at(&ranking, &gains, 2), 0.5);
        assert_eq!(recall_at(&ranking, &gains, 4), 1.0);
        // DCG = 3/log2(3) + 1/log2(5); ideal = 3/log2(2) + 1/log2(3).
        let expected = (3.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (3.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at(&ranking, &gains, 100) - expected).abs() < 1e-12);
        assert!((ndcg_at(&["a", "b"], &gains, 100) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn dense_evaluation_ranks_by_inner_product() {
        let products = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.7, 0.7]];
        let ids = ["p0", "p1", "p2"];
        let mut graded: BTreeMap<&str, HashMap<&str, f64>> = BTreeMap::new();
        graded.insert("q", [("p1", 3.0), ("p0", 0.0)].into_iter().collect());
        let perfect = evaluate_dense(&[vec![0.0, 1.0]], &products, &ids, &["q"], &graded);
        assert_eq!(perfect.queries, 1);
        assert_eq!(perfect.recall_at_10, 1.0);
        assert!((perfect.ndcg_at_100 - 1.0).abs() < 1e-12);
        let worst = evaluate_dense(&[vec![1.0, -0.2]], &products, &ids, &["q"], &graded);
        assert!(worst.ndcg_at_100 < 0.6, "p1 ranked last: {}", worst.ndcg_at_100);
    }
}
