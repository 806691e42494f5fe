use super::*;
use crate::events::{DeadLetterReason, ProductEvent, QueryEvent, QuerySignal, RelevanceLevel, RelevanceMapping};
use sha2::{Digest, Sha256};
#[allow(unused_imports)]
use super::apply::*;
#[allow(unused_imports)]
use super::codec::*;
#[allow(unused_imports)]
use super::docids::*;
#[allow(unused_imports)]
use super::embeddings::*;
#[allow(unused_imports)]
use super::inspect::*;
use crate::events::{InteractionAction, ProductContent};

fn position(topic: &str, offset: i64) -> SourcePosition {
    SourcePosition { topic: topic.into(), partition: 0, offset }
}

fn upsert(product_id: &str, title: &str, offset: i64) -> SourcedRecord {
    let content = ProductContent::with_title(title);
    SourcedRecord {
        position: position("products", offset),
        record: DecodedRecord::Product(ProductEvent::Upsert { product_id: product_id.into(), content, embedding: None }),
    }
}

/// Creates a RocksDB directory holding only `column_families` (plus `default`), as a writer
/// caught between creating the directory and its column families leaves it, or an older
/// format without the later ones.
fn directory_with_column_families(path: &Path, column_families: &[&str]) {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    DB::open_cf(&options, path, column_families).unwrap();
}

#[test]
fn read_only_open_refuses_a_directory_without_a_base_column_family_instead_of_panicking_later() {
    let directory = tempfile::tempdir().unwrap();
    directory_with_column_families(directory.path(), &[PRODUCTS_CF, JUDGEMENTS_CF]);
    match StateStore::open_read_only(directory.path()) {
        Err(StateError::MissingColumnFamily { column_family, .. }) => assert_eq!(column_family, OFFSETS_CF),
        other => panic!("expected MissingColumnFamily, got {other:?}"),
    }
}

#[test]
fn read_only_open_of_an_older_format_reads_its_missing_later_column_families_as_empty() {
    let directory = tempfile::tempdir().unwrap();
    directory_with_column_families(directory.path(), &BASE_COLUMN_FAMILIES);
    let state = StateStore::open_read_only(directory.path()).unwrap();
    assert!(state.stored_offsets().unwrap().is_empty());
    assert_eq!(state.counts().unwrap().products, 0);
    assert!(state.docids().unwrap().is_empty());
    assert_eq!(state.docid("P1").unwrap(), None);
    assert_eq!(state.docid_count().unwrap(), 0);
    assert_eq!(state.docid_queue_len().unwrap(), 0);
}

#[test]
fn judgement_key_round_trips_and_groups_by_query() {
    let key = judgement_key("us", "red shoes", "P1");
    let decoded = decode_judgement_key(&key).unwrap();
    assert_eq!(decoded, JudgementKey { locale: "us".into(), query: "red shoes".into(), product_id: "P1".into() });
    assert!(judgement_key("us", "red shoes", "P2").starts_with(&key[..key.len() - 2]));
}

#[test]
fn aggregate_encoding_round_trips() {
    let mut aggregate = JudgementAggregate::default();
    let mapping = RelevanceMapping::default();
    aggregate.record(QuerySignal::Interaction(InteractionAction::Impression), &mapping);
    assert_eq!(aggregate.max_level, None);
    aggregate.record(QuerySignal::Judgement(RelevanceLevel::Substitute), &mapping);
    aggregate.record(QuerySignal::Interaction(InteractionAction::Click), &mapping);
    assert_eq!(aggregate.max_level, Some(RelevanceLevel::Substitute));
    assert_eq!(JudgementAggregate::decode(&aggregate.encode()).unwrap(), aggregate);
}

#[test]
fn state_is_bound_to_one_cluster() {
    let directory = tempfile::tempdir().unwrap();
    let store = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    assert_eq!(store.bind_cluster("cluster-a", true).unwrap(), ClusterBinding::NewlyBound);
    assert_eq!(store.bind_cluster("cluster-a", true).unwrap(), ClusterBinding::Same);
    assert_eq!(
        store.bind_cluster("cluster-b", false).unwrap(),
        ClusterBinding::Mismatch { stored_cluster_id: "cluster-a".into(), stored_was_embedded: true }
    );
    assert_eq!(store.counts().unwrap(), StateCounts::default(), "binding keys are not counters");
}

#[test]
fn product_values_round_trip_with_their_hash_prefix() {
    let mut content = ProductContent::with_title("Cast iron pan");
    content.description = Some("<b>heavy</b> \"quoted\"".into());
    content.attributes.insert("size".into(), "12in".into());
    let position = position("products", 41);
    let (hash, value) = encode_product_value(&content, &position);
    assert_eq!(hex::encode(hash), content_hash(&content));
    let decoded = decode_product_value(&value).unwrap();
    assert_eq!(decoded, StoredProduct { content, content_hash: hex::encode(hash), updated_by: position });
    assert!(decode_product_value(&value[..10]).is_err());
}

/// Content hashes are stored with every product and key the embedding cache: the canonical
/// JSON must never change bytes. It must equal serde_json's compact output (the serializer
/// the hashes were first computed with) for every character class JSON escapes, and a fixed
/// product must keep its hash.
#[test]
fn canonical_content_is_serde_jsons_compact_output() {
    let every_control_character: String = (0u8..0x20).map(char::from).collect();
    let mut content = ProductContent::with_title(format!("quote \" backslash \\ slash / {every_control_character} del \u{7f}"));
    content.locale = Some("jp".into());
    content.description = Some("<p>é ü 日本語 🍳 \u{2028} \u{2029} \u{feff}</p>".into());
    content.bullet_points = vec!["".into(), "tab\there".into(), "x".repeat(300)];
    content.brand = Some("Ünïcode".into());
    content.color = Some("red".into());
    content.category = Some("Home > Kitchen".into());
    content.attributes = BTreeMap::from([("size".into(), "12\"".into()), ("a\u{1}".into(), "\\".into())]);
    let (canonical, hash) = canonical_content(&content);
    assert_eq!(String::from_utf8(canonical.clone()).unwrap(), serde_json::to_string(&content).unwrap());
    assert_eq!(hash, <[u8; CONTENT_HASH_BYTES]>::from(Sha256::digest(serde_json::to_vec(&content).unwrap())));
    let position = position("products", 7);
    let (_, value) = encode_product_value(&content, &position);
    assert_eq!(decode_product_value(&value).unwrap().updated_by, position);

    let mut pinned = ProductContent::with_title("Cast iron pan, 12\"");
    pinned.attributes.insert("material".into(), "iron".into());
    assert_eq!(content_hash(&pinned), "6afa92c857b4907df41003357b1dc1b292fe7a6548c59822d190700420cc6ef3");
}

#[test]
fn cumulative_write_stall_is_read_from_the_db_stats() {
    let stats = "** DB Stats **\nUptime(secs): 12.0 total, 2.0 interval\nCumulative stall: 00:01:02.500 H:M:S, 3.1 percent\nInterval stall: 00:00:0.000 H:M:S, 0.0 percent\n";
    assert_eq!(parse_cumulative_stall_seconds(stats), Some(62.5));
    assert_eq!(parse_cumulative_stall_seconds("Interval stall: 00:00:1.000 H:M:S, 0.0 percent"), None);
    let directory = tempfile::tempdir().unwrap();
    let store = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    assert_eq!(store.cumulative_write_stall_seconds().unwrap(), 0.0, "a fresh database has not stalled");
}

#[test]
fn hash_memtable_column_families_scan_in_key_order_across_memtable_and_files() {
    let mapping = RelevanceMapping::default();
    let click = || QuerySignal::Interaction(InteractionAction::Click);
    let expected_judgements: Vec<(String, String)> =
        [("art", "M5"), ("boots", "A1"), ("shoes", "A1"), ("shoes", "Z9")].iter().map(|(query, product)| (query.to_string(), product.to_string())).collect();
    let check = |store: &StateStore| {
        assert_eq!(store.product_ids().unwrap(), ["A1", "B2", "M5", "Z9"]);
        let mut judged = Vec::new();
        store.for_each_judgement(|key, _| judged.push((key.query, key.product_id))).unwrap();
        assert_eq!(judged, expected_judgements);
        // Point reads see both halves.
        assert!(store.product("Z9").unwrap().is_some() && store.product("B2").unwrap().is_some());
        assert!(store.judgement("us", "shoes", "Z9").unwrap().is_some() && store.judgement("us", "art", "M5").unwrap().is_some());
    };
    for (kind, other_kind) in [(MemtableKind::Hash, MemtableKind::Skiplist), (MemtableKind::Skiplist, MemtableKind::Hash)] {
        let directory = tempfile::tempdir().unwrap();
        let options = StateOptions { memtable: kind, ..StateOptions::default() };
        let store = StateStore::open(directory.path(), &options).unwrap();
        // Half the keys reach an SST file, the other half stay in the memtable.
        store.apply_batch(&[upsert("Z9", "z", 0), upsert("A1", "a", 1), signal("shoes", "Z9", click(), 0, 0), signal("boots", "A1", click(), 0, 1)], &mapping).unwrap();
        store.flush_memtables().unwrap();
        store.apply_batch(&[upsert("M5", "m", 2), upsert("B2", "b", 3), signal("shoes", "A1", click(), 0, 2), signal("art", "M5", click(), 0, 3)], &mapping).unwrap();
        check(&store);
        // The memtable kind is a per-open choice: the directory opens with the other one.
        drop(store);
        let reopened = StateStore::open(directory.path(), &StateOptions { memtable: other_kind, ..StateOptions::default() }).unwrap();
        check(&reopened);
    }
}

#[test]
fn a_new_product_joins_the_docid_queue_when_its_vector_is_stored() {
    let directory = tempfile::tempdir().unwrap();
    let store = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    let mapping = RelevanceMapping::default();
    store.apply_batch(&[upsert("P1", "one", 0), upsert("P2", "two", 1), upsert("P3", "three", 2)], &mapping).unwrap();
    assert!(store.docid_queue_page(None, 10).unwrap().is_empty(), "no vector yet, nothing for the DocID worker");
    // P2 already holds a DocID (a retrain's map); P3 is deleted while its vector is computed.
    store.replace_docids(&[("P2".to_owned(), crate::docid::DocId(vec![1, 2, 3, 4]))]).unwrap();
    let queued = store.embedding_queue_page(None, 10, |_| true).unwrap();
    assert_eq!(queued.len(), 3);
    store.apply_batch(&[delete("P3", 3)], &mapping).unwrap();
    let computed: Vec<(QueuedProduct, Vec<f32>)> = queued.into_iter().map(|queued| (queued, vec![0.5; 4])).collect();
    assert_eq!(store.store_embeddings("test-encoder", &computed, &[]).unwrap(), 2, "P3's entry went with the product");
    assert_eq!(store.docid_queue_page(None, 10).unwrap(), ["P1"], "only the stored product without a DocID is queued");
    assert!(store.embedding_queue_page(None, 10, |_| true).unwrap().is_empty());
    // A delete dequeues it again, in the batch that deletes it.
    store.apply_batch(&[delete("P1", 4)], &mapping).unwrap();
    assert!(store.docid_queue_page(None, 10).unwrap().is_empty());
}

fn delete(product_id: &str, offset: i64) -> SourcedRecord {
    SourcedRecord {
        position: position("products", offset),
        record: DecodedRecord::Product(ProductEvent::Delete { product_id: product_id.into() }),
    }
}

fn signal(query: &str, product_id: &str, signal: QuerySignal, partition: i32, offset: i64) -> SourcedRecord {
    SourcedRecord {
        position: SourcePosition { topic: "query-events".into(), partition, offset },
        record: DecodedRecord::Query(QueryEvent::new(query, Some("us"), product_id, signal)),
    }
}

/// Everything a batch can change, read back for comparison.
fn snapshot(store: &StateStore) -> (Vec<(String, StoredProduct)>, Vec<(JudgementKey, JudgementAggregate)>, StateCounts, Vec<QueuedProduct>, Vec<String>) {
    let mut products = Vec::new();
    store.for_each_product(|product_id, product| products.push((product_id.to_owned(), product))).unwrap();
    let mut judgements = Vec::new();
    store.for_each_judgement(|key, aggregate| judgements.push((key, aggregate))).unwrap();
    let embedding_queue = store.embedding_queue_page(None, 1_000, |_| true).unwrap();
    let docid_queue = store.docid_queue_page(None, 1_000).unwrap();
    (products, judgements, store.counts().unwrap(), embedding_queue, docid_queue)
}

/// The prepared fold (records grouped by key, folded from one MultiGet) must do exactly what
/// applying the records one by one does, for every mix of upserts, deletes and signals on
/// the same keys within one batch.
#[test]
fn one_batch_equals_applying_its_records_one_by_one() {
    let mapping = RelevanceMapping::default();
    let preexisting = vec![upsert("P2", "two", 0), upsert("P4", "four", 1), signal("red shoes", "P2", QuerySignal::Judgement(RelevanceLevel::Complement), 0, 0)];
    let click = QuerySignal::Interaction(InteractionAction::Click);
    let batch = vec![
        upsert("P3", "three", 2),
        signal("red shoes", "P2", click, 0, 1),
        upsert("P1", "one", 3),
        delete("P1", 4),
        signal("red shoes", "P1", QuerySignal::Judgement(RelevanceLevel::Exact), 1, 0),
        upsert("P1", "one again", 5),
        upsert("P2", "two", 6),
        delete("P4", 7),
        signal("red shoes", "P2", QuerySignal::Judgement(RelevanceLevel::Substitute), 0, 2),
        delete("P9", 8),
        upsert("P3", "three, edited", 9),
        SourcedRecord { position: position("products", 10), record: DecodedRecord::DeadLetter(DeadLetterReason::InvalidJson) },
        signal("blue shoes", "P3", QuerySignal::Interaction(InteractionAction::Impression), 1, 1),
        signal("red shoes", "P1", click, 1, 2),
    ];
    let (one_by_one, batched) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one_by_one, batched) =
        (StateStore::open(one_by_one.path(), &StateOptions::default()).unwrap(), StateStore::open(batched.path(), &StateOptions::default()).unwrap());
    let mut outcomes = Vec::new();
    for store in [&one_by_one, &batched] {
        store.apply_batch(&preexisting, &mapping).unwrap();
    }
    for record in &batch {
        outcomes.extend(one_by_one.apply_batch(std::slice::from_ref(record), &mapping).unwrap().outcomes);
    }
    let report = batched.apply_batch(&batch, &mapping).unwrap();
    assert_eq!(report.outcomes, outcomes);
    use ApplyOutcome::{Applied, DeadLettered, Unchanged};
    assert_eq!(outcomes, [Applied, Applied, Applied, Applied, Applied, Applied, Unchanged, Applied, Applied, Unchanged, Applied, DeadLettered, Applied, Applied]);
    let counted = |topic: &str, outcome| report.counts.by_outcome.iter().find(|entry| &*entry.0 == topic && entry.1 == outcome).map(|entry| entry.2);
    assert_eq!((counted("products", Applied), counted("products", Unchanged), counted("products", DeadLettered)), (Some(6), Some(2), Some(1)));
    assert_eq!(counted("query-events", Applied), Some(5));
    assert_eq!(report.counts.by_outcome.len(), 4, "{:?}", report.counts);
    assert_eq!(report.counts.dead_letters, [("products".into(), DeadLetterReason::InvalidJson, 1)]);
    assert_eq!(snapshot(&batched), snapshot(&one_by_one));
    let (products, judgements, counts, embedding_queue, docid_queue) = snapshot(&batched);
    assert!(docid_queue.is_empty(), "new products queue for a DocID only once their vector is stored: {docid_queue:?}");
    let queued_hashes: Vec<(&str, String)> = embedding_queue.iter().map(|queued| (queued.product_id.as_str(), hex::encode(queued.content_hash))).collect();
    assert_eq!(queued_hashes, [("P1", products[0].1.content_hash.clone()), ("P2", products[1].1.content_hash.clone()), ("P3", products[2].1.content_hash.clone())]);
    assert_eq!(products.iter().map(|(id, product)| (id.as_str(), product.content.title.as_str())).collect::<Vec<_>>(), [("P1", "one again"), ("P2", "two"), ("P3", "three, edited")]);
    assert_eq!((counts.products, counts.judgement_pairs, judgements.len()), (3, 3, 3));
    assert_eq!(report.next_offsets.get(&("products".to_owned(), 0)), Some(&11));
    assert_eq!(report.next_offsets.get(&("query-events".to_owned(), 1)), Some(&3));
}

/// A product deleted and upserted again within one batch loses its DocID and leaves the DocID
/// queue, exactly as when the records are applied one by one (where the delete frees the
/// DocID before the upsert comes back as a new product): the outcome must not depend on
/// where batch boundaries fall.
#[test]
fn delete_and_reupsert_in_one_batch_frees_the_docid_as_one_by_one_does() {
    let mapping = RelevanceMapping::default();
    let preexisting = vec![upsert("P1", "one", 0), upsert("P2", "two", 1), upsert("P3", "three", 2)];
    let batch = vec![delete("P1", 3), upsert("P1", "one", 4), upsert("P2", "two, edited", 5), delete("P3", 6), upsert("P3", "three", 7)];
    let (one_by_one, batched) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one_by_one, batched) =
        (StateStore::open(one_by_one.path(), &StateOptions::default()).unwrap(), StateStore::open(batched.path(), &StateOptions::default()).unwrap());
    let docids = [("P1".to_owned(), crate::docid::DocId(vec![1, 2, 3, 4])), ("P2".to_owned(), crate::docid::DocId(vec![1, 2, 3, 5]))];
    for store in [&one_by_one, &batched] {
        store.apply_batch(&preexisting, &mapping).unwrap();
        store.replace_docids(&docids).unwrap();
        assert_eq!(store.enqueue_missing_docids().unwrap(), 1, "P3 has no DocID yet");
    }
    for record in &batch {
        one_by_one.apply_batch(std::slice::from_ref(record), &mapping).unwrap();
    }
    batched.apply_batch(&batch, &mapping).unwrap();
    for store in [&one_by_one, &batched] {
        assert_eq!(store.docids().unwrap(), [docids[1].clone()], "P1 lost its DocID, P2 (only edited) kept its own");
        assert_eq!(store.product_for_docid(&docids[0].1).unwrap(), None);
        assert!(store.docid_queue_page(None, 10).unwrap().is_empty(), "P1 and P3 queue again once their vectors are stored");
        assert!(store.docids_form_a_bijection().unwrap());
    }
    assert_eq!(snapshot(&batched), snapshot(&one_by_one));
}

/// A batch that overlaps what state already holds (a redelivery after a crash that landed
/// part of it) applies only the records past each partition's stored offset.
#[test]
fn a_partly_applied_batch_applies_only_its_new_records() {
    let mapping = RelevanceMapping::default();
    let directory = tempfile::tempdir().unwrap();
    let store = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    let click = QuerySignal::Interaction(InteractionAction::Click);
    let batch = vec![upsert("P1", "one", 0), signal("q", "P1", click, 0, 0), upsert("P2", "two", 1), signal("q", "P1", click, 0, 1), upsert("P1", "one, edited", 2)];
    store.apply_batch(&[batch[0].clone(), batch[1].clone()], &mapping).unwrap();
    let report = store.apply_batch(&batch, &mapping).unwrap();
    use ApplyOutcome::{Applied, Duplicate};
    assert_eq!(report.outcomes, [Duplicate, Duplicate, Applied, Applied, Applied]);
    let aggregate = store.judgement("us", "q", "P1").unwrap().unwrap();
    assert_eq!(aggregate.action_counts[InteractionAction::Click.index()], 2, "each click once");
    assert_eq!(store.product("P1").unwrap().unwrap().content.title, "one, edited");
    assert_eq!(store.counts().unwrap().products, 2);
    assert_eq!((store.next_offset("products", 0).unwrap(), store.next_offset("query-events", 0).unwrap()), (Some(3), Some(2)));
}

#[test]
fn replaying_a_batch_is_a_no_op() {
    let directory = tempfile::tempdir().unwrap();
    let store = StateStore::open(directory.path(), &StateOptions::default()).unwrap();
    let batch = vec![upsert("P1", "one", 0), upsert("P2", "two", 1), upsert("P1", "one again", 2)];
    let first = store.apply_batch(&batch, &RelevanceMapping::default()).unwrap();
    assert_eq!(first.outcomes, vec![ApplyOutcome::Applied; 3]);
    let replay = store.apply_batch(&batch, &RelevanceMapping::default()).unwrap();
    assert_eq!(replay.outcomes, vec![ApplyOutcome::Duplicate; 3]);
    assert_eq!(replay.write_bytes, 0);
    assert_eq!(store.counts().unwrap().products, 2);
    assert_eq!(store.next_offset("products", 0).unwrap(), Some(3));
    assert_eq!(store.product("P1").unwrap().unwrap().content.title, "one again");
}
