//! Read-only views over state for operators and tests: counters, full scans, the `inspect` report.

use super::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

use rocksdb::IteratorMode;
use serde::Serialize;

/// Counts kept in `meta`, updated in the same write batch as the data they count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    /// Products currently stored.
    pub products: i64,
    /// Distinct (locale, query, product) pairs with at least one signal.
    pub judgement_pairs: i64,
    /// Events per topic and outcome (`topic/outcome` → count), duplicates excluded.
    pub events: BTreeMap<String, i64>,
    /// Dead letters per reason.
    pub dead_letters: BTreeMap<String, i64>,
}

impl StateStore {
    /// Visits every product in key order.
    pub fn for_each_product(&self, mut visit: impl FnMut(&str, StoredProduct)) -> Result<(), StateError> {
        for entry in self.scan(self.column_family(PRODUCTS_CF), IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            visit(&String::from_utf8_lossy(&key), decode_product_value(&value)?);
        }
        Ok(())
    }

    /// Visits every judgement pair in key order (grouped by locale, then query).
    pub fn for_each_judgement(&self, mut visit: impl FnMut(JudgementKey, JudgementAggregate)) -> Result<(), StateError> {
        for entry in self.scan(self.column_family(JUDGEMENTS_CF), IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            visit(decode_judgement_key(&key)?, JudgementAggregate::decode(&value)?);
        }
        Ok(())
    }

    /// Judgement pairs whose product is not (or no longer) in `products`: they are kept, since
    /// the product may arrive later.
    pub fn count_judgements_without_product(&self) -> Result<i64, StateError> {
        let mut missing = 0;
        let mut last_checked: Option<(String, bool)> = None;
        let mut keys = Vec::new();
        self.for_each_judgement(|key, _| keys.push(key.product_id))?;
        for product_id in keys {
            let known = match &last_checked {
                Some((checked, known)) if *checked == product_id => *known,
                _ => self.get(PRODUCTS_CF, product_id.as_bytes())?.is_some(),
            };
            if !known {
                missing += 1;
            }
            last_checked = Some((product_id, known));
        }
        Ok(missing)
    }

    /// The counters kept in `meta`.
    pub fn counts(&self) -> Result<StateCounts, StateError> {
        let mut counts = StateCounts::default();
        for entry in self.scan(self.column_family(META_CF), IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let Ok(array) = <[u8; 8]>::try_from(value.as_ref()) else {
                continue;
            };
            let count = i64::from_le_bytes(array);
            if name == PRODUCT_COUNT_KEY {
                counts.products = count;
            } else if name == JUDGEMENT_PAIR_COUNT_KEY {
                counts.judgement_pairs = count;
            } else if let Some(reason) = name.strip_prefix(DEAD_LETTER_COUNT_PREFIX) {
                counts.dead_letters.insert(reason.to_owned(), count);
            } else if let Some(topic_outcome) = name.strip_prefix(EVENT_COUNT_PREFIX) {
                counts.events.insert(topic_outcome.to_owned(), count);
            }
        }
        Ok(counts)
    }
}

/// What `inspect` reports.
#[derive(Debug, serde::Serialize)]
pub struct InspectReport {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The Kafka cluster the state is bound to.
    pub kafka_cluster_id: Option<String>,
    /// Counters.
    pub counts: StateCounts,
    /// Judgement pairs whose product is not stored (kept for when it arrives).
    pub judgement_pairs_without_product: i64,
    /// Judgement pairs per highest level (`E`, `S`, `C`, `I`, `none`).
    pub judgement_pairs_by_max_level: std::collections::BTreeMap<String, i64>,
    /// Next offset per `topic/partition`.
    pub stored_offsets: std::collections::BTreeMap<String, i64>,
    /// Cached vectors per encoder cache id.
    pub embeddings_by_encoder: std::collections::BTreeMap<String, u64>,
    /// Products waiting for a vector.
    pub embedding_queue: u64,
    /// Products holding a DocID.
    pub docids: u64,
    /// Products waiting for a DocID.
    pub docid_queue: u64,
}

/// Builds the `inspect` report of an open state.
pub fn inspect_report(state: &StateStore) -> anyhow::Result<InspectReport> {
    let mut by_level = std::collections::BTreeMap::new();
    state.for_each_judgement(|_, aggregate| {
        let label = aggregate.max_level.map_or("none".to_owned(), |level| level.label().to_owned());
        *by_level.entry(label).or_insert(0) += 1;
    })?;
    let (embeddings_by_encoder, embedding_queue) = state.embedding_summary()?;
    Ok(InspectReport {
        embeddings_by_encoder,
        embedding_queue,
        docids: state.docid_count()?,
        docid_queue: state.docid_queue_len()?,
        state_dir: state.path().to_owned(),
        kafka_cluster_id: state.bound_cluster_id()?,
        counts: state.counts()?,
        judgement_pairs_without_product: state.count_judgements_without_product()?,
        judgement_pairs_by_max_level: by_level,
        stored_offsets: state
            .stored_offsets()?
            .into_iter()
            .map(|((topic, partition), next)| (format!("{topic}/{partition}"), next))
            .collect(),
    })
}
