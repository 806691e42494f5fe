//! Beam search constrained to the DocID trie: at every step each beam may only extend its prefix
//! by a code that leads to an existing DocID, so every result is a DocID some product holds.

use std::sync::Arc;

use super::trie::{DocIdTrie, NodeId};
use crate::docid::DocId;

/// Next-code log-probabilities for a batch of prefixes: one row of `codebook_size` values per
/// prefix (all prefixes have the same length). What a retriever model computes; decoding masks
/// the codes the trie does not allow and adds the rest to each beam's score.
pub trait NextCodeScorer {
    /// Log-probabilities of every code after each of `prefixes`.
    fn next_code_log_probs(&mut self, prefixes: &[Vec<u8>]) -> Vec<Vec<f32>>;
}

/// One decoded DocID.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamHit {
    /// The product holding the DocID.
    pub product_id: Arc<str>,
    /// The DocID.
    pub docid: DocId,
    /// Sum of the chosen codes' log-probabilities.
    pub score: f32,
}

struct Beam {
    node: NodeId,
    prefix: Vec<u8>,
    score: f32,
}

/// Decodes the `top_k` best DocIDs of `trie` under `scorer`, keeping `beam_width` prefixes per
/// step (each carrying its trie node). Results are ordered by score (ties: smaller DocID first);
/// at most `min(beam_width, top_k, trie.len())`.
pub fn constrained_beam_search(trie: &DocIdTrie, scorer: &mut dyn NextCodeScorer, beam_width: usize, top_k: usize) -> Vec<BeamHit> {
    if trie.is_empty() || beam_width == 0 || top_k == 0 {
        return Vec::new();
    }
    let mut beams = vec![Beam { node: trie.root(), prefix: Vec::new(), score: 0.0 }];
    for _depth in 0..trie.levels() {
        let prefixes: Vec<Vec<u8>> = beams.iter().map(|beam| beam.prefix.clone()).collect();
        let log_probs = scorer.next_code_log_probs(&prefixes);
        debug_assert_eq!(log_probs.len(), beams.len());
        let mut candidates: Vec<Beam> = Vec::new();
        for (beam, row) in beams.iter().zip(&log_probs) {
            debug_assert_eq!(row.len(), trie.codebook_size());
            trie.for_each_child(beam.node, |code, child| {
                let mut prefix = Vec::with_capacity(trie.levels());
                prefix.extend_from_slice(&beam.prefix);
                prefix.push(code);
                candidates.push(Beam { node: child, prefix, score: beam.score + row[code as usize] });
            });
        }
        candidates.sort_by(|left, right| right.score.total_cmp(&left.score).then_with(|| left.prefix.cmp(&right.prefix)));
        candidates.truncate(beam_width);
        beams = candidates;
    }
    beams
        .into_iter()
        .take(top_k)
        .filter_map(|beam| {
            let product_id = Arc::clone(trie.product_at(beam.node)?);
            Some(BeamHit { product_id, docid: DocId(beam.prefix), score: beam.score })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::trie::TrieError;

    /// Log-probabilities from a fixed table per (prefix length, code): the best sequence under it
    /// is known by brute force.
    struct TableScorer {
        table: Vec<Vec<f32>>,
        calls: usize,
    }

    impl NextCodeScorer for TableScorer {
        fn next_code_log_probs(&mut self, prefixes: &[Vec<u8>]) -> Vec<Vec<f32>> {
            self.calls += 1;
            // Depends on the prefix too, so the best path is not greedy-obvious.
            prefixes.iter().map(|prefix| {
                let bias = prefix.iter().map(|code| f32::from(*code)).sum::<f32>() * 0.01;
                self.table[prefix.len()].iter().enumerate().map(|(code, value)| value - bias * code as f32).collect()
            }).collect()
        }
    }

    fn score(table: &[Vec<f32>], docid: &[u8]) -> f32 {
        (0..docid.len()).map(|depth| {
            let bias = docid[..depth].iter().map(|code| f32::from(*code)).sum::<f32>() * 0.01;
            table[depth][docid[depth] as usize] - bias * f32::from(docid[depth])
        }).sum()
    }

    fn random_trie(seed: u64, products: usize) -> (DocIdTrie, Vec<DocId>) {
        use rand::{Rng, SeedableRng};
        let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut trie = DocIdTrie::new(3, 6);
        let mut held = Vec::new();
        while held.len() < products {
            let docid = DocId((0..3).map(|_| random.random_range(0..6u8)).collect());
            if trie.insert(&docid, &format!("P{}", held.len())).is_ok() {
                held.push(docid);
            }
        }
        (trie, held)
    }

    fn table(seed: u64) -> Vec<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..3).map(|_| (0..6).map(|_| -random.random_range(0.0..4.0f32)).collect()).collect()
    }

    #[test]
    fn a_beam_as_wide_as_the_trie_returns_the_exact_ranking_of_existing_docids() {
        for seed in 0..20 {
            let (trie, held) = random_trie(seed, 40);
            let table = table(seed + 100);
            let mut scorer = TableScorer { table: table.clone(), calls: 0 };
            let hits = constrained_beam_search(&trie, &mut scorer, 216, 10);
            assert_eq!(scorer.calls, 3, "one scorer call per level");
            let mut expected: Vec<(f32, Vec<u8>)> = held.iter().map(|docid| (score(&table, &docid.0), docid.0.clone())).collect();
            expected.sort_by(|left, right| right.0.total_cmp(&left.0).then_with(|| left.1.cmp(&right.1)));
            let got: Vec<Vec<u8>> = hits.iter().map(|hit| hit.docid.0.clone()).collect();
            let want: Vec<Vec<u8>> = expected.iter().take(10).map(|(_, docid)| docid.clone()).collect();
            assert_eq!(got, want, "seed {seed}");
            for hit in &hits {
                assert_eq!(trie.product_of(&hit.docid), Some(&*hit.product_id), "every DocID exists and names its product");
                assert!((hit.score - score(&table, &hit.docid.0)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn narrow_beams_only_ever_return_existing_docids_and_the_top_hit_is_the_best_reachable() {
        let (trie, _) = random_trie(3, 25);
        let table = table(7);
        for beam in [1, 2, 5] {
            let hits = constrained_beam_search(&trie, &mut TableScorer { table: table.clone(), calls: 0 }, beam, 10);
            assert_eq!(hits.len(), beam.min(10));
            assert!(hits.iter().all(|hit| trie.product_of(&hit.docid).is_some()));
            assert!(hits.windows(2).all(|pair| pair[0].score >= pair[1].score));
        }
    }

    #[test]
    fn deleted_docids_never_appear_and_empty_prefixes_are_pruned() {
        let (mut trie, held) = random_trie(11, 60);
        let table = table(5);
        let removed: Vec<DocId> = held.iter().step_by(2).cloned().collect();
        for docid in &removed {
            assert!(trie.remove(docid).is_some());
            assert!(trie.remove(docid).is_none(), "a second remove finds nothing");
        }
        assert_eq!(trie.len(), held.len() - removed.len());
        let hits = constrained_beam_search(&trie, &mut TableScorer { table, calls: 0 }, 216, 216);
        assert_eq!(hits.len(), trie.len(), "a full-width beam reaches every remaining DocID");
        assert!(hits.iter().all(|hit| !removed.contains(&hit.docid)));
        // A prefix whose DocIDs are all gone is no longer offered.
        let mut only = DocIdTrie::new(3, 6);
        only.insert(&DocId(vec![1, 2, 3]), "A").unwrap();
        only.insert(&DocId(vec![4, 0, 0]), "B").unwrap();
        only.remove(&DocId(vec![1, 2, 3]));
        let mut roots = Vec::new();
        only.for_each_child(only.root(), |code, _| roots.push(code));
        assert_eq!(roots, vec![4]);
        // Slots are reused: re-inserting allocates no new nodes beyond what was freed.
        only.insert(&DocId(vec![1, 2, 3]), "A2").unwrap();
        assert_eq!(only.product_of(&DocId(vec![1, 2, 3])), Some("A2"));
    }

    #[test]
    fn misfit_and_taken_docids_are_errors() {
        let mut trie = DocIdTrie::new(3, 6);
        trie.insert(&DocId(vec![0, 1, 2]), "A").unwrap();
        assert!(matches!(trie.insert(&DocId(vec![0, 1, 2]), "B"), Err(TrieError::Taken { .. })));
        assert!(matches!(trie.insert(&DocId(vec![0, 1]), "B"), Err(TrieError::Shape { .. })));
        assert!(matches!(trie.insert(&DocId(vec![0, 1, 6]), "B"), Err(TrieError::Shape { .. })));
        assert_eq!(trie.len(), 1);
    }
}
