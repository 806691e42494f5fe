//! The product ↔ DocID map (both directions) and the queue of products waiting for a DocID:
//! what the DocID stage reads and writes through [`StateStore`].

use super::*;
use std::collections::HashMap;

use rocksdb::{IteratorMode, WriteBatch};

/// How [`StateStore::assign_docids`] placed one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DocIdPlacement {
    /// The quantizer's own codes were free.
    QuantizerCodes,
    /// Same prefix, another (the cheapest free) last-level code.
    LastLevelResolved,
    /// The prefix was full; placed by the overflow rule under another prefix.
    Overflow,
    /// The product already had a DocID; it keeps it.
    AlreadyAssigned,
    /// The product is no longer stored; nothing assigned.
    ProductGone,
    /// No free DocID at all; the product stays queued.
    SpaceFull,
}

impl DocIdPlacement {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QuantizerCodes => "quantizer_codes",
            Self::LastLevelResolved => "last_level_resolved",
            Self::Overflow => "overflow",
            Self::AlreadyAssigned => "already_assigned",
            Self::ProductGone => "product_gone",
            Self::SpaceFull => "space_full",
        }
    }
}

impl StateStore {
    /// Up to `limit` products waiting for a DocID in key order, starting after `after` (exclusive).
    pub fn docid_queue_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StateError> {
        Ok(self.queue_page(DOCID_QUEUE_CF, after, limit, |_| true)?.into_iter().map(|(product_id, _)| product_id).collect())
    }

    /// Exact number of products waiting for a DocID (a key scan; for `inspect` and the gauge).
    pub fn docid_queue_len(&self) -> Result<u64, StateError> {
        self.count_keys(DOCID_QUEUE_CF)
    }

    /// Queues every stored product without a DocID: run when DocID assignment starts, it
    /// covers products stored before the queue existed and those a retrain's map left out.
    /// Returns how many were queued.
    pub fn enqueue_missing_docids(&self) -> Result<u64, StateError> {
        let products = self.column_family(PRODUCTS_CF);
        let forward = self.column_family(DOCIDS_CF);
        let queue = self.column_family(DOCID_QUEUE_CF);
        let _exclusive = self.docid_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        let mut queued = 0;
        for entry in self.scan(products, IteratorMode::Start) {
            let (key, _) = entry.map_err(|error| self.rocks_error(error))?;
            if self.database.get_pinned_cf(forward, &key).map_err(|error| self.rocks_error(error))?.is_none() {
                batch.put_cf(queue, &key, []);
                queued += 1;
            }
        }
        self.database.write(batch).map_err(|error| self.rocks_error(error))?;
        Ok(queued)
    }

    /// The DocID of a product, if assigned.
    pub fn docid(&self, product_id: &str) -> Result<Option<crate::docid::DocId>, StateError> {
        Ok(self.get(DOCIDS_CF, product_id.as_bytes())?.map(crate::docid::DocId))
    }

    /// The product a DocID stands for, if any.
    pub fn product_for_docid(&self, docid: &crate::docid::DocId) -> Result<Option<String>, StateError> {
        Ok(self.get(DOCID_REVERSE_CF, docid.as_bytes())?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Whether the DocID map is a bijection over stored products: every forward entry has its
    /// reverse entry and a stored product, and there are as many reverse as forward entries.
    pub fn docids_form_a_bijection(&self) -> Result<bool, StateError> {
        let forward = self.docids()?;
        for (product_id, docid) in &forward {
            if self.product_for_docid(docid)?.as_deref() != Some(product_id.as_str()) || !self.contains_product(product_id)? {
                return Ok(false);
            }
        }
        let reverse = self.count_keys(DOCID_REVERSE_CF)?;
        Ok(reverse == forward.len() as u64)
    }

    /// Every stored product id, in key order.
    pub fn product_ids(&self) -> Result<Vec<String>, StateError> {
        let mut ids = Vec::new();
        for entry in self.scan(self.column_family(PRODUCTS_CF), IteratorMode::Start) {
            let (key, _) = entry.map_err(|error| self.rocks_error(error))?;
            ids.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(ids)
    }

    /// Products holding a DocID (a key scan).
    pub fn docid_count(&self) -> Result<u64, StateError> {
        self.count_keys(DOCIDS_CF)
    }

    /// Whether `product_id` is stored (one point read of its content hash, nothing decoded).
    pub fn contains_product(&self, product_id: &str) -> Result<bool, StateError> {
        Ok(self.product_content_hash(product_id)?.is_some())
    }

    /// Every (product, DocID) pair, in product order.
    pub fn docids(&self) -> Result<Vec<(String, crate::docid::DocId)>, StateError> {
        let mut pairs = Vec::new();
        let Some(forward) = self.try_column_family(DOCIDS_CF) else {
            return Ok(pairs);
        };
        for entry in self.scan(forward, IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            pairs.push((String::from_utf8_lossy(&key).into_owned(), crate::docid::DocId(value.to_vec())));
        }
        Ok(pairs)
    }

    /// Replaces the whole product ↔ DocID map (after a retrain) in one atomic write: every old
    /// pair in both directions is removed and the new ones written. Refuses a map that is not a
    /// bijection.
    pub fn replace_docids(&self, pairs: &[(String, crate::docid::DocId)]) -> Result<(), StateError> {
        let mut products = std::collections::HashSet::with_capacity(pairs.len());
        let mut docids = std::collections::HashSet::with_capacity(pairs.len());
        for (product_id, docid) in pairs {
            if !products.insert(product_id.as_str()) || !docids.insert(docid.as_bytes()) {
                return Err(StateError::NotABijection(format!("{product_id} / {docid}")));
            }
        }
        let forward = self.column_family(DOCIDS_CF);
        let reverse = self.column_family(DOCID_REVERSE_CF);
        let _exclusive = self.docid_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        for entry in self.scan(forward, IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            batch.delete_cf(forward, key);
            batch.delete_cf(reverse, value);
        }
        for (product_id, docid) in pairs {
            batch.put_cf(forward, product_id.as_bytes(), docid.as_bytes());
            batch.put_cf(reverse, docid.as_bytes(), product_id.as_bytes());
        }
        self.database.write(batch).map_err(|error| self.rocks_error(error))
    }

    /// Gives one product a DocID between retrains (see [`StateStore::assign_docids`]). `None`
    /// when the product is not stored or the code space is full.
    pub fn assign_docid(
        &self,
        product_id: &str,
        document: &crate::docid::DocumentCodes,
        space: crate::docid::CodeSpace,
    ) -> Result<Option<crate::docid::DocId>, StateError> {
        let assigned = self.assign_docids(&[(product_id.to_owned(), document.clone())], space)?;
        Ok(assigned.into_iter().next().and_then(|(_, docid)| docid))
    }

    /// Gives products DocIDs between retrains, in one atomic write with their DocID-queue
    /// entries removed: each gets its quantizer codes if free, else the cheapest free
    /// last-level code under its prefix, else the overflow rule of
    /// [`crate::docid::resolve_collisions`]. A product that already has a DocID keeps it; a
    /// product no longer stored gets none. Both dequeue. A product for which the space is
    /// full stays queued. Returns, per input, how it was placed and its DocID.
    pub fn assign_docids(
        &self,
        documents: &[(String, crate::docid::DocumentCodes)],
        space: crate::docid::CodeSpace,
    ) -> Result<Vec<(DocIdPlacement, Option<crate::docid::DocId>)>, StateError> {
        let forward = self.column_family(DOCIDS_CF);
        let reverse = self.column_family(DOCID_REVERSE_CF);
        let queue = self.column_family(DOCID_QUEUE_CF);
        let _exclusive = self.docid_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        let mut taken_in_batch: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        // Placed by this call and not yet visible to `self.docid` (the batch is written last).
        let mut placed_in_batch: HashMap<&str, crate::docid::DocId> = HashMap::new();
        let mut outcomes = Vec::with_capacity(documents.len());
        for (product_id, document) in documents {
            debug_assert_eq!(document.codes.len(), space.levels);
            if let Some(existing) = self.docid(product_id)? {
                batch.delete_cf(queue, product_id.as_bytes());
                outcomes.push((DocIdPlacement::AlreadyAssigned, Some(existing)));
                continue;
            }
            if let Some(earlier) = placed_in_batch.get(product_id.as_str()) {
                outcomes.push((DocIdPlacement::AlreadyAssigned, Some(earlier.clone())));
                continue;
            }
            if !self.contains_product(product_id)? {
                batch.delete_cf(queue, product_id.as_bytes());
                outcomes.push((DocIdPlacement::ProductGone, None));
                continue;
            }
            let lookup_failed = std::cell::RefCell::new(None);
            let is_occupied = |docid: &[u8]| {
                if taken_in_batch.contains(docid) {
                    return true;
                }
                match self.database.get_pinned_cf(reverse, docid) {
                    Ok(found) => found.is_some(),
                    Err(error) => {
                        lookup_failed.borrow_mut().get_or_insert(error);
                        true
                    }
                }
            };
            let placed = crate::docid::assign::place_one(document, space, &is_occupied);
            if let Some(error) = lookup_failed.into_inner() {
                return Err(self.rocks_error(error));
            }
            let Some(codes) = placed else {
                outcomes.push((DocIdPlacement::SpaceFull, None));
                continue;
            };
            let placement = if codes == document.codes {
                DocIdPlacement::QuantizerCodes
            } else if codes[..codes.len() - 1] == document.codes[..codes.len() - 1] {
                DocIdPlacement::LastLevelResolved
            } else {
                DocIdPlacement::Overflow
            };
            batch.put_cf(forward, product_id.as_bytes(), &codes);
            batch.put_cf(reverse, &codes, product_id.as_bytes());
            batch.delete_cf(queue, product_id.as_bytes());
            taken_in_batch.insert(codes.clone());
            let docid = crate::docid::DocId(codes);
            placed_in_batch.insert(product_id, docid.clone());
            outcomes.push((placement, Some(docid)));
        }
        self.database.write(batch).map_err(|error| self.rocks_error(error))?;
        Ok(outcomes)
    }
}
