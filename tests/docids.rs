//! DocID persistence: a resolved map stored in both directions as a bijection, replaced
//! atomically after a retrain, and single products assigned between retrains against what is
//! stored — never taking a DocID twice, even when their prefix is full.

use std::collections::BTreeSet;

use merge_indexer::docid::{resolve_collisions, CodeSpace, DocId, DocumentCodes, SinkhornConfig};
use merge_indexer::events::{ProductContent, ProductEvent, RelevanceMapping};
use merge_indexer::state::{DecodedRecord, SourcePosition, SourcedRecord, StateOptions, StateStore};
use rand::{Rng, SeedableRng};

fn document(codes: &[u8], costs: Vec<f32>) -> DocumentCodes {
    DocumentCodes { codes: codes.to_vec(), last_level_costs: costs }
}

/// Stores products `ids` (DocIDs are only given to stored products).
fn store_products(state: &StateStore, ids: impl IntoIterator<Item = String>) {
    let next = state.next_offset("products", 0).unwrap().unwrap_or(0);
    let records: Vec<SourcedRecord> = ids
        .into_iter()
        .enumerate()
        .map(|(index, product_id)| SourcedRecord {
            position: SourcePosition { topic: "products".into(), partition: 0, offset: next + index as i64 },
            record: DecodedRecord::Product(ProductEvent::Upsert { content: ProductContent::with_title(&format!("title of {product_id}")), product_id, embedding: None }),
        })
        .collect();
    state.apply_batch(&records, &RelevanceMapping::default()).unwrap();
}

fn assert_bijection(state: &StateStore) -> usize {
    let pairs = state.docids().unwrap();
    let unique: BTreeSet<&DocId> = pairs.iter().map(|(_, docid)| docid).collect();
    assert_eq!(unique.len(), pairs.len(), "two products share a DocID");
    for (product_id, docid) in &pairs {
        assert_eq!(state.product_for_docid(docid).unwrap().as_deref(), Some(product_id.as_str()), "reverse index of {product_id}");
    }
    pairs.len()
}

#[test]
fn resolved_map_is_stored_both_ways_and_incremental_products_never_collide() {
    let directory = tempfile::tempdir().unwrap();
    let state = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    let space = CodeSpace { levels: 3, codebook_size: 4 };
    let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut random_costs = || -> Vec<f32> { (0..4).map(|_| random.random_range(0.0..1.0)).collect() };
    // 40 products squeezed onto two quantizer codes: heavy collisions and full prefixes.
    let documents: Vec<DocumentCodes> = (0..40).map(|index| document(&[1, index % 2, 0], random_costs())).collect();
    let (docids, report) = resolve_collisions(&documents, space, SinkhornConfig::default()).unwrap();
    assert_eq!(report.collisions_before, 40);
    assert!(report.moved_up > 0, "prefixes of 4 codes cannot hold 20 products each");
    let pairs: Vec<(String, DocId)> = docids.into_iter().enumerate().map(|(index, docid)| (format!("P{index}"), docid)).collect();
    state.replace_docids(&pairs).unwrap();
    assert_eq!(assert_bijection(&state), 40);
    assert_eq!(state.docid("P7").unwrap(), Some(pairs[7].1.clone()));

    // New products between retrains, all wanting an occupied DocID.
    store_products(&state, (40..60).map(|index| format!("P{index}")).chain(["FREE".to_owned()]));
    assert_eq!(state.assign_docid("NOT-STORED", &document(&[2, 2, 2], random_costs()), space).unwrap(), None, "only stored products get DocIDs");
    for index in 40..60 {
        let product_id = format!("P{index}");
        let wanted = document(&[1, 0, 0], random_costs());
        let docid = state.assign_docid(&product_id, &wanted, space).unwrap().expect("space has room");
        assert_eq!(state.product_for_docid(&docid).unwrap().as_deref(), Some(product_id.as_str()));
        // Asking again returns the same DocID.
        assert_eq!(state.assign_docid(&product_id, &wanted, space).unwrap(), Some(docid));
    }
    assert_eq!(assert_bijection(&state), 60);

    // A free quantizer code is taken as is.
    let free = document(&[3, 3, 3], random_costs());
    assert_eq!(state.assign_docid("FREE", &free, space).unwrap(), Some(DocId(vec![3, 3, 3])));

    // A retrain replaces the whole map atomically; the old reverse entries are gone.
    let retrained: Vec<(String, DocId)> = (0..4).map(|index| (format!("P{index}"), DocId(vec![0, 0, index as u8]))).collect();
    state.replace_docids(&retrained).unwrap();
    assert_eq!(assert_bijection(&state), 4);
    assert_eq!(state.docid("P50").unwrap(), None);
    assert_eq!(state.product_for_docid(&DocId(vec![3, 3, 3])).unwrap(), None);

    // A map that is not a bijection is refused and changes nothing.
    let broken = vec![("A".to_owned(), DocId(vec![2, 2, 2])), ("B".to_owned(), DocId(vec![2, 2, 2]))];
    assert!(state.replace_docids(&broken).is_err());
    assert_eq!(assert_bijection(&state), 4);
}

#[test]
fn incremental_assignment_fills_the_whole_space_then_reports_full() {
    let directory = tempfile::tempdir().unwrap();
    let state = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    let space = CodeSpace { levels: 2, codebook_size: 3 };
    store_products(&state, (0..10).map(|index| format!("P{index}")));
    for index in 0..9 {
        let wanted = document(&[0, 0], vec![0.0, 1.0, 2.0]);
        assert!(state.assign_docid(&format!("P{index}"), &wanted, space).unwrap().is_some(), "product {index} fits");
    }
    assert_eq!(assert_bijection(&state), 9);
    assert_eq!(state.assign_docid("P9", &document(&[0, 0], vec![0.0; 3]), space).unwrap(), None, "3 × 3 DocIDs are taken");
}
