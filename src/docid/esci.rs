//! DocID training data from the graded ESCI folder (`products.jsonl`, `judgments_train.csv`,
//! `judgments_test.csv`; see `../shared/data/esci-graded/README.md`): every product encoded with
//! the given encoder, and one graded query per query text. Test judgements are kept apart, read
//! only after training for the Table-3 statistic.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use super::train::{TrainingQuery, TrainingSet};
use crate::encoder::{encode_in_batches, product_text, ProductTextConfig, TextEncoder};
use crate::eval::datasets::{esci_product_id, EsciGraded, GradedJudgement};

/// The graded ESCI folder as DocID training data.
#[derive(Debug, Clone)]
pub struct EsciTrainingData {
    /// Products (`{locale}:{asin}` ids), their vectors, and the training queries.
    pub set: TrainingSet,
    /// Held-out test queries over the same documents.
    pub test_queries: Vec<TrainingQuery>,
}

impl EsciTrainingData {
    /// Reads the folder and encodes every product's text (`text` format) with `encoder`,
    /// `batch_size` texts per encoder call.
    pub fn load(directory: &Path, encoder: &dyn TextEncoder, text: &ProductTextConfig, batch_size: usize) -> anyhow::Result<Self> {
        let data = EsciGraded::load(directory).with_context(|| format!("reading the graded ESCI folder {}", directory.display()))?;
        println!("encoding {} products with {}", data.products.len(), encoder.cache_id());
        let texts: Vec<String> = data.products.iter().map(|product| product_text(&product.content(), text)).collect();
        let embeddings = encode_in_batches(encoder, &texts, batch_size.max(1))?;
        let index_of: HashMap<&str, usize> = data.products.iter().enumerate().map(|(index, product)| (product.product_id.as_str(), index)).collect();
        // One TrainingQuery per query text: its judged products grouped by level.
        let graded_queries = |judgements: &[GradedJudgement]| -> Vec<TrainingQuery> {
            TrainingQuery::group_by_query(judgements.iter().filter_map(|judgement| {
                Some((judgement.query.as_str(), judgement.level()?.index(), *index_of.get(judgement.product_id.as_str())?))
            }))
        };
        let set = TrainingSet {
            product_ids: data.products.iter().map(|product| esci_product_id(&product.locale, &product.product_id)).collect(),
            embeddings,
            queries: graded_queries(&data.train),
            products_without_vector: 0,
        };
        Ok(Self { set, test_queries: graded_queries(&data.test) })
    }
}
