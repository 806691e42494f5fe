//! Applying a micro-batch: [`PreparedBatch`] groups a batch's records by partition and key off
//! the writer thread; [`StateStore::apply_prepared`] drops duplicates and writes every change
//! with the batch's next offsets in one `WriteBatch`.

use super::*;
use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use rocksdb::{WriteBatch, WriteOptions};

use crate::events::{DeadLetterReason, ProductEvent, QueryEvent, RelevanceMapping};

/// What one message amounts to once decoded.
#[derive(Debug, Clone)]
pub enum DecodedRecord {
    /// A valid `products` event.
    Product(ProductEvent),
    /// A valid `query-events` event.
    Query(QueryEvent),
    /// An invalid message, already delivered to the dead-letter topic.
    DeadLetter(DeadLetterReason),
}

/// One consumed message, ready to apply.
#[derive(Debug, Clone)]
pub struct SourcedRecord {
    /// Where the message came from.
    pub position: SourcePosition,
    /// What it says.
    pub record: DecodedRecord,
}

/// The effect a record had on state, and the `outcome` label of `merge_indexer_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApplyOutcome {
    /// State changed.
    Applied,
    /// Valid but changed nothing (same content re-upserted, delete of an absent product).
    Unchanged,
    /// Its offset was already applied (a redelivery after a crash or rebalance); skipped.
    Duplicate,
    /// Invalid; it went to the dead-letter topic and only its offset and counter were stored.
    DeadLettered,
}

impl ApplyOutcome {
    /// Every outcome.
    pub const ALL: [ApplyOutcome; 4] = [Self::Applied, Self::Unchanged, Self::Duplicate, Self::DeadLettered];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// The result of [`StateStore::apply_batch`].
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// Outcome per record, in input order.
    pub outcomes: Vec<ApplyOutcome>,
    /// The outcomes counted by topic, and the dead letters by topic and reason.
    pub counts: OutcomeCounts,
    /// Size of the RocksDB write batch, in bytes (0 when nothing was written).
    pub write_bytes: usize,
    /// Next offset per (topic, partition) after the batch, for the partitions it touched.
    pub next_offsets: BTreeMap<(String, i32), i64>,
}

/// A batch's records counted by topic and outcome, and its dead letters (duplicates excluded)
/// by topic and reason; a handful of entries per batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// (topic, outcome, records).
    pub by_outcome: Vec<(std::sync::Arc<str>, ApplyOutcome, u64)>,
    /// (topic, reason, dead-lettered records).
    pub dead_letters: Vec<(std::sync::Arc<str>, DeadLetterReason, u64)>,
}

impl OutcomeCounts {
    pub(super) fn of(records: &[SourcedRecord], outcomes: &[ApplyOutcome]) -> Self {
        debug_assert_eq!(records.len(), outcomes.len(), "one outcome per record");
        let mut counts = Self::default();
        for (record, &outcome) in records.iter().zip(outcomes) {
            let topic = &record.position.topic;
            increment(&mut counts.by_outcome, topic, outcome);
            if let (ApplyOutcome::DeadLettered, DecodedRecord::DeadLetter(reason)) = (outcome, &record.record) {
                increment(&mut counts.dead_letters, topic, *reason);
            }
        }
        counts
    }
}

/// Adds one to the `(topic, label)` entry: a linear scan of a handful of entries, whose topics
/// are usually the very `Arc`s the records share.
pub(super) fn increment<Label: Copy + PartialEq>(entries: &mut Vec<(std::sync::Arc<str>, Label, u64)>, topic: &std::sync::Arc<str>, label: Label) {
    let same_topic = |entry_topic: &std::sync::Arc<str>| std::sync::Arc::ptr_eq(entry_topic, topic) || entry_topic == topic;
    match entries.iter_mut().find(|(entry_topic, entry_label, _)| *entry_label == label && same_topic(entry_topic)) {
        Some((_, _, count)) => *count += 1,
        None => entries.push((std::sync::Arc::clone(topic), label, 1)),
    }
}

impl StateStore {
    /// Applies a micro-batch atomically: every record's effect, the counters and the next
    /// offset of each partition go into one `WriteBatch`. Records at offsets below the stored
    /// next offset of their partition are skipped as duplicates, so replaying a batch is a no-op.
    /// Prepares the batch on the calling thread; [`StateStore::apply_prepared`] takes a batch
    /// prepared elsewhere (the indexer prepares on its consumer task, off the writer thread).
    pub fn apply_batch(&self, records: &[SourcedRecord], mapping: &RelevanceMapping) -> Result<BatchReport, StateError> {
        self.apply_prepared(&PreparedBatch::prepare(records.to_vec()), mapping)
    }

    /// Applies a [`PreparedBatch`] atomically (see [`StateStore::apply_batch`]). Only the
    /// state-dependent work happens here: reading the stored offsets, product hashes and
    /// judgement aggregates (one sorted `MultiGet` each), folding the batch onto them and writing
    /// one `WriteBatch` whose keys arrive in ascending order per column family.
    pub fn apply_prepared(&self, batch: &PreparedBatch, mapping: &RelevanceMapping) -> Result<BatchReport, StateError> {
        let records = &batch.records;
        let duplicates = self.duplicate_mask(batch)?;
        let is_duplicate = |index: u32| duplicates.as_ref().is_some_and(|mask| mask[index as usize]);
        let mut outcomes: Vec<ApplyOutcome> = records
            .iter()
            .enumerate()
            .map(|(index, sourced)| match (&sourced.record, is_duplicate(index as u32)) {
                (_, true) => ApplyOutcome::Duplicate,
                (DecodedRecord::DeadLetter(_), false) => ApplyOutcome::DeadLettered,
                _ => ApplyOutcome::Applied,
            })
            .collect();
        let mut write = BatchWrite::default();
        self.fold_products(batch, &is_duplicate, &mut outcomes, &mut write)?;
        self.fold_judgements(batch, &is_duplicate, mapping, &mut write)?;

        let mut next_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        match &duplicates {
            None => {
                for span in &batch.partitions {
                    next_offsets.insert((span.topic.to_string(), span.partition), span.next_offset);
                }
            }
            Some(mask) => {
                for (sourced, _) in records.iter().zip(mask).filter(|(_, duplicate)| !**duplicate) {
                    let position = &sourced.position;
                    let next = next_offsets.entry((position.topic.to_string(), position.partition)).or_insert(0);
                    *next = (*next).max(position.offset + 1);
                }
            }
        }
        let counts = OutcomeCounts::of(records, &outcomes);
        if next_offsets.is_empty() {
            return Ok(BatchReport { outcomes, counts, write_bytes: 0, next_offsets });
        }
        // The batch's tallies become `meta` counter updates; duplicates were counted before.
        let mut counter_deltas: BTreeMap<String, i64> = BTreeMap::new();
        for (topic, outcome, count) in counts.by_outcome.iter().filter(|(_, outcome, _)| *outcome != ApplyOutcome::Duplicate) {
            *counter_deltas.entry(format!("{EVENT_COUNT_PREFIX}{topic}/{}", outcome.as_str())).or_insert(0) += *count as i64;
        }
        for (_, reason, count) in &counts.dead_letters {
            *counter_deltas.entry(format!("{DEAD_LETTER_COUNT_PREFIX}{reason}")).or_insert(0) += *count as i64;
        }
        for (name, delta) in [(PRODUCT_COUNT_KEY, write.product_delta), (JUDGEMENT_PAIR_COUNT_KEY, write.new_judgement_pairs)] {
            if delta != 0 {
                *counter_deltas.entry(name.to_owned()).or_insert(0) += delta;
            }
        }
        let write_bytes = self.commit_batch_write(write, &counter_deltas, &next_offsets)?;
        Ok(BatchReport { outcomes, counts, write_bytes, next_offsets })
    }

    /// Which records of `batch` were applied before (offset below their partition's stored next
    /// offset): `None` when none were, the common case, so the prepared groups apply as they are.
    pub(super) fn duplicate_mask(&self, batch: &PreparedBatch) -> Result<Option<Vec<bool>>, StateError> {
        let mut stored_next: FxHashMap<(&str, i32), i64> = FxHashMap::default();
        let mut any_duplicate = false;
        for span in &batch.partitions {
            if let Some(next) = self.next_offset(&span.topic, span.partition)? {
                any_duplicate |= span.first_offset < next;
                stored_next.insert((&*span.topic, span.partition), next);
            }
        }
        if !any_duplicate {
            return Ok(None);
        }
        let mask = batch
            .records
            .iter()
            .map(|sourced| {
                let position = &sourced.position;
                stored_next.get(&(&*position.topic, position.partition)).is_some_and(|next| position.offset < *next)
            })
            .collect();
        Ok(Some(mask))
    }

    /// Walks each product's operations in batch order from its stored content hash (read with
    /// one sorted `MultiGet`), setting each record's outcome and adding the product, queue and
    /// embedding writes to `write`.
    pub(super) fn fold_products<'batch>(
        &self,
        batch: &'batch PreparedBatch,
        is_duplicate: &dyn Fn(u32) -> bool,
        outcomes: &mut [ApplyOutcome],
        write: &mut BatchWrite<'batch>,
    ) -> Result<(), StateError> {
        let groups: Vec<&[u32]> = batch.product_order.chunk_by(|left, right| batch.product_id(*left) == batch.product_id(*right)).collect();
        if groups.is_empty() {
            return Ok(());
        }
        let column_family = self.column_family(PRODUCTS_CF);
        let product_ids: Vec<&str> = groups.iter().map(|group| batch.product_id(group[0])).collect();
        let stored = self.database.batched_multi_get_cf(column_family, product_ids.iter().copied(), true);
        let target = self.embedding_target();
        for ((group, product_id), stored) in groups.into_iter().zip(product_ids).zip(stored) {
            let stored = stored.map_err(|error| self.rocks_error(error))?;
            let mut current = stored.map(|value| stored_content_hash(product_id, &value)).transpose()?;
            let mut change = ProductChange::default();
            for &index in group.iter().filter(|index| !is_duplicate(**index)) {
                let DecodedRecord::Product(event) = &batch.records[index as usize].record else {
                    unreachable!("product_order holds product records only");
                };
                let outcome = match (event, &batch.product_values[index as usize]) {
                    (ProductEvent::Upsert { embedding, .. }, Some((hash, value))) => {
                        if current == Some(*hash) {
                            ApplyOutcome::Unchanged
                        } else {
                            if current.is_none() {
                                write.product_delta += 1;
                                change.docid_queued = Some(true);
                            }
                            current = Some(*hash);
                            change.value = Some(Some(value.as_slice()));
                            match (embedding, target) {
                                (Some(precomputed), Some(target))
                                    if precomputed.model == target.model_name && precomputed.vector.len() == target.dimension =>
                                {
                                    metrics::counter!(crate::metrics::PRECOMPUTED_EMBEDDINGS_TOTAL, "outcome" => "used").increment(1);
                                    write.embeddings.push((embedding_key(&target.cache_id, hash), encode_vector(&precomputed.vector)));
                                    change.embedding_queued = Some(None);
                                }
                                _ => change.embedding_queued = Some(Some(*hash)),
                            }
                            ApplyOutcome::Applied
                        }
                    }
                    (ProductEvent::Delete { .. }, _) => {
                        if current.is_none() {
                            ApplyOutcome::Unchanged
                        } else {
                            write.product_delta -= 1;
                            current = None;
                            change.value = Some(None);
                            // Its DocID is freed even if a later record of this batch brings the
                            // product back: applied one by one, the delete frees it and the
                            // re-upsert queues the product for a new one.
                            change.frees_docid = true;
                            change.embedding_queued = Some(None);
                            change.docid_queued = Some(false);
                            ApplyOutcome::Applied
                        }
                    }
                    (ProductEvent::Upsert { .. }, None) => unreachable!("every upsert is encoded by PreparedBatch::prepare"),
                };
                outcomes[index as usize] = outcome;
            }
            if change.value.is_some() {
                write.products.push((product_id, change));
            }
        }
        Ok(())
    }

    /// Folds every query record onto its pair's stored aggregate (read with one sorted
    /// `MultiGet`) in batch order; the pairs are already in key order.
    pub(super) fn fold_judgements<'batch>(
        &self,
        batch: &'batch PreparedBatch,
        is_duplicate: &dyn Fn(u32) -> bool,
        mapping: &RelevanceMapping,
        write: &mut BatchWrite<'batch>,
    ) -> Result<(), StateError> {
        let groups: Vec<&[u32]> = batch
            .judgement_order
            .chunk_by(|left, right| batch.pair_key(*left) == batch.pair_key(*right))
            .filter(|group| group.iter().any(|index| !is_duplicate(*index)))
            .collect();
        if groups.is_empty() {
            return Ok(());
        }
        let column_family = self.column_family(JUDGEMENTS_CF);
        let keys: Vec<&[u8]> = groups.iter().map(|group| batch.pair_key(group[0])).collect();
        let stored = self.database.batched_multi_get_cf(column_family, keys.iter().copied(), true);
        write.judgements.reserve(groups.len());
        for ((group, key), stored) in groups.into_iter().zip(keys).zip(stored) {
            let stored = stored.map_err(|error| self.rocks_error(error))?;
            let mut aggregate = match stored {
                Some(bytes) => JudgementAggregate::decode(&bytes)?,
                None => {
                    write.new_judgement_pairs += 1;
                    JudgementAggregate::default()
                }
            };
            for index in group.iter().filter(|index| !is_duplicate(**index)) {
                let DecodedRecord::Query(event) = &batch.records[*index as usize].record else {
                    unreachable!("judgement_order holds query records only");
                };
                aggregate.record(event.signal, mapping);
            }
            write.judgements.push((key, aggregate.encode()));
        }
        Ok(())
    }

    /// Writes one folded batch: products, queues, embeddings, judgements, counters and offsets in
    /// one `WriteBatch`; frees the DocIDs of deleted products in the same write.
    pub(super) fn commit_batch_write(
        &self,
        write: BatchWrite<'_>,
        counter_deltas: &BTreeMap<String, i64>,
        next_offsets: &BTreeMap<(String, i32), i64>,
    ) -> Result<usize, StateError> {
        let mut batch = WriteBatch::default();
        let (products, queue, docid_queue) =
            (self.column_family(PRODUCTS_CF), self.column_family(EMBEDDING_QUEUE_CF), self.column_family(DOCID_QUEUE_CF));
        // Products are in id order, so each of these column families receives ascending keys.
        for (product_id, change) in &write.products {
            match change.value {
                Some(Some(value)) => batch.put_cf(products, product_id.as_bytes(), value),
                Some(None) => batch.delete_cf(products, product_id.as_bytes()),
                None => {}
            }
            match change.embedding_queued {
                Some(Some(hash)) => batch.put_cf(queue, product_id.as_bytes(), hash),
                Some(None) => batch.delete_cf(queue, product_id.as_bytes()),
                None => {}
            }
            match (change.docid_queued, change.embedding_queued) {
                // A new product is queued for a DocID once its vector exists: here when the
                // event carried it, else when an embedding worker stores it
                // (`StateStore::store_embeddings`). One skiplist insert less per new product on
                // the ingest path, the writer's costliest part (docs/performance-notes.md).
                (Some(true), Some(None)) => batch.put_cf(docid_queue, product_id.as_bytes(), []),
                // Deleted and back within the batch: a queue entry from before the delete goes,
                // as the delete would have removed it.
                (Some(true), _) if change.frees_docid => batch.delete_cf(docid_queue, product_id.as_bytes()),
                (Some(true), _) | (None, _) => {}
                (Some(false), _) => batch.delete_cf(docid_queue, product_id.as_bytes()),
            }
        }
        let embeddings = self.column_family(EMBEDDINGS_CF);
        for (key, vector) in &write.embeddings {
            batch.put_cf(embeddings, key, vector);
        }
        let judgements = self.column_family(JUDGEMENTS_CF);
        for (key, aggregate) in &write.judgements {
            batch.put_cf(judgements, key, aggregate);
        }
        let meta = self.column_family(META_CF);
        for (name, delta) in counter_deltas {
            let current = self.meta_counter(name)?.unwrap_or(0);
            batch.put_cf(meta, name.as_bytes(), (current + delta).to_le_bytes());
        }
        let offsets = self.column_family(OFFSETS_CF);
        for ((topic, partition), next) in next_offsets {
            batch.put_cf(offsets, offset_key(topic, *partition), next.to_be_bytes());
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(self.write_options_sync);
        // Lock order: DocIDs, then the embedding queue (as everywhere else).
        let _docids_exclusive = self.docid_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A deleted product's DocID is freed in the same write, also when the batch re-upserts
        // it afterwards (it is then new, and queued for a DocID like any new product). Read under
        // the lock, so an assignment cannot land between this read and the write.
        let (forward, reverse) = (self.column_family(DOCIDS_CF), self.column_family(DOCID_REVERSE_CF));
        for (product_id, _) in write.products.iter().filter(|(_, change)| change.frees_docid) {
            if let Some(docid) = self.get(DOCIDS_CF, product_id.as_bytes())? {
                batch.delete_cf(forward, product_id.as_bytes());
                batch.delete_cf(reverse, docid);
            }
        }
        let write_bytes = batch.size_in_bytes();
        let _queue_exclusive = self.queue_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.database.write_opt(batch, &write_options).map_err(|error| self.rocks_error(error))?;
        Ok(write_bytes)
    }
}

/// One partition's offsets within a prepared batch.
#[derive(Debug, Clone)]
pub(super) struct PartitionSpan {
    topic: std::sync::Arc<str>,
    partition: i32,
    /// Lowest offset of the batch in this partition.
    first_offset: i64,
    /// Highest offset plus one: the partition's next offset once the batch is applied.
    next_offset: i64,
}

/// A micro-batch with everything that does not depend on stored state computed ahead: each
/// upsert's stored value and content hash, each query event's judgement key, the products and
/// the judgement pairs in key order (records of one key in batch order), and each partition's
/// offset span. The indexer prepares a batch on its consumer task while the previous batch is
/// written, so the state writer thread only reads, folds and writes.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    records: Vec<SourcedRecord>,
    /// Per record: the encoded value of a product upsert, `None` for every other record.
    product_values: Vec<Option<EncodedProduct>>,
    /// Indices of the product records, by product id, then batch order.
    product_order: Vec<u32>,
    /// Indices of the query records, by judgement key, then batch order.
    judgement_order: Vec<u32>,
    partitions: Vec<PartitionSpan>,
}

impl PreparedBatch {
    /// Encodes, keys and orders `records` (in consumption order, offsets ascending per
    /// partition) for [`StateStore::apply_prepared`].
    pub fn prepare(records: Vec<SourcedRecord>) -> Self {
        debug_assert!(records.len() <= u32::MAX as usize, "a micro-batch is far below 2^32 records");
        let mut product_values = Vec::with_capacity(records.len());
        let mut product_order = Vec::new();
        let mut judgement_order = Vec::new();
        let mut partitions: Vec<PartitionSpan> = Vec::new();
        for (index, sourced) in records.iter().enumerate() {
            let position = &sourced.position;
            match partitions.iter_mut().find(|span| span.partition == position.partition && span.topic == position.topic) {
                Some(span) => {
                    span.first_offset = span.first_offset.min(position.offset);
                    span.next_offset = span.next_offset.max(position.offset + 1);
                }
                None => partitions.push(PartitionSpan {
                    topic: position.topic.clone(),
                    partition: position.partition,
                    first_offset: position.offset,
                    next_offset: position.offset + 1,
                }),
            }
            let value = match &sourced.record {
                DecodedRecord::Product(event) => {
                    product_order.push(index as u32);
                    match event {
                        ProductEvent::Upsert { content, .. } => Some(encode_product_value(content, position)),
                        ProductEvent::Delete { .. } => None,
                    }
                }
                DecodedRecord::Query(_) => {
                    judgement_order.push(index as u32);
                    None
                }
                DecodedRecord::DeadLetter(_) => None,
            };
            product_values.push(value);
        }
        // Stable sorts: records of one key keep their batch order.
        product_order.sort_by(|left, right| product_id_of(&records, *left).cmp(product_id_of(&records, *right)));
        // Sorted with each key beside its index: comparing through `records` costs a cache miss
        // per comparison.
        let mut keyed: Vec<(&[u8], u32)> = judgement_order.iter().map(|index| (pair_key_of(&records, *index), *index)).collect();
        keyed.sort_by(|left, right| left.0.cmp(right.0));
        judgement_order.clear();
        judgement_order.extend(keyed.into_iter().map(|(_, index)| index));
        Self { records, product_values, product_order, judgement_order, partitions }
    }

    /// The records, in consumption order.
    pub fn records(&self) -> &[SourcedRecord] {
        &self.records
    }

    /// Gives the records back.
    pub fn into_records(self) -> Vec<SourcedRecord> {
        self.records
    }

    pub(super) fn product_id(&self, index: u32) -> &str {
        product_id_of(&self.records, index)
    }

    pub(super) fn pair_key(&self, index: u32) -> &[u8] {
        pair_key_of(&self.records, index)
    }
}

pub(super) fn pair_key_of(records: &[SourcedRecord], index: u32) -> &[u8] {
    match &records[index as usize].record {
        DecodedRecord::Query(event) => event.pair_key(),
        _ => unreachable!("judgement_order holds query records only"),
    }
}

pub(super) fn product_id_of(records: &[SourcedRecord], index: u32) -> &str {
    match &records[index as usize].record {
        DecodedRecord::Product(event) => event.product_id(),
        _ => unreachable!("product_order holds product records only"),
    }
}

/// What one product's records in a batch change, in the writer's fold.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ProductChange<'batch> {
    /// `Some(Some(value))`: write the value; `Some(None)`: delete the product.
    value: Option<Option<&'batch [u8]>>,
    /// Embedding queue: `Some(Some(hash))` queue, `Some(None)` dequeue.
    embedding_queued: Option<Option<ContentHash>>,
    /// DocID queue: `Some(true)` new to state (queued now if its vector came with the event, else
    /// when the vector is stored), `Some(false)` dequeue (deleted).
    docid_queued: Option<bool>,
    /// The batch deletes the stored product at some point (whether or not it comes back later in
    /// the batch): its DocID, if any, is freed in the batch's write.
    frees_docid: bool,
}

/// The writes a folded batch adds up to, in key order per column family.
#[derive(Debug, Default)]
pub(super) struct BatchWrite<'batch> {
    products: Vec<(&'batch str, ProductChange<'batch>)>,
    judgements: Vec<(&'batch [u8], [u8; JudgementAggregate::ENCODED_BYTES])>,
    /// Precomputed vectors to cache: (embedding key, encoded vector).
    embeddings: Vec<(Vec<u8>, Vec<u8>)>,
    product_delta: i64,
    new_judgement_pairs: i64,
}
