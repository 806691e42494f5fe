//! RocksDB state: products, aggregated judgements, consumer offsets and counters, written
//! together in one `WriteBatch` per micro-batch so a crash neither loses nor double-applies an
//! event. Only this module touches RocksDB. The on-disk layout is documented in
//! `state/README.md`; keep the two in step.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rustc_hash::FxHashMap;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::{DeadLetterReason, ProductContent, ProductEvent, QueryEvent, QuerySignal, RelevanceLevel, RelevanceMapping};

/// Column family of products: `product_id` → JSON [`StoredProduct`].
pub const PRODUCTS_CF: &str = "products";
/// Column family of judgement aggregates: [`judgement_key`] → [`JudgementAggregate::encode`].
pub const JUDGEMENTS_CF: &str = "judgements";
/// Column family of consumer offsets: [`offset_key`] → next offset to consume, `i64` big-endian.
pub const OFFSETS_CF: &str = "offsets";
/// Column family of counters and format markers: UTF-8 name → `i64` little-endian.
pub const META_CF: &str = "meta";
/// DocIDs: `product_id` → its code bytes (one per level).
pub const DOCIDS_CF: &str = "docids";
/// DocIDs: code bytes → `product_id` (the reverse of [`DOCIDS_CF`]; together a bijection).
pub const DOCID_REVERSE_CF: &str = "docid_reverse";
/// Products waiting for a DocID between retrains: `product_id` → empty value. Written in the
/// same batch as the product's first upsert; removed when its DocID is written.
pub const DOCID_QUEUE_CF: &str = "docid_queue";

/// Embedding cache: [`embedding_key`] (encoder cache id, product content hash) → the vector as
/// little-endian `f32`s.
pub const EMBEDDINGS_CF: &str = "embeddings";
/// Products waiting for a vector: `product_id` → the 32-byte content hash to encode.
pub const EMBEDDING_QUEUE_CF: &str = "embedding_queue";

/// Every column family, in creation order.
pub const COLUMN_FAMILIES: [&str; 9] =
    [PRODUCTS_CF, JUDGEMENTS_CF, OFFSETS_CF, META_CF, DOCIDS_CF, DOCID_REVERSE_CF, EMBEDDINGS_CF, EMBEDDING_QUEUE_CF, DOCID_QUEUE_CF];

/// Column families every state directory has had since its first format; the readers of these
/// assume them, so [`StateStore::open_read_only`] refuses a directory without one.
const BASE_COLUMN_FAMILIES: [&str; 4] = [PRODUCTS_CF, JUDGEMENTS_CF, OFFSETS_CF, META_CF];

/// Column families read by point lookups on the ingest and DocID paths; their memtables carry a
/// whole-key bloom filter.
const POINT_LOOKUP_COLUMN_FAMILIES: [&str; 3] = [PRODUCTS_CF, JUDGEMENTS_CF, DOCIDS_CF];
/// Share of a memtable's size given to its bloom filter (RocksDB's
/// `memtable_prefix_bloom_size_ratio`).
const MEMTABLE_BLOOM_RATIO: f64 = 0.02;
/// Column families whose memtable is, with [`MemtableKind::Hash`] (not the default), a hash table of
/// linked lists (RocksDB `HashLinkList`, with the whole key as its "prefix") instead of a
/// skiplist, with the memtable bytes per hash bucket. They take one insert per ingested event
/// and are otherwise read by key; a skiplist insert into a 64 MiB memtable is a walk of cache
/// misses, which made the state writer the pipeline's costliest thread. The price: the memtable
/// is sorted when it is flushed, which costs more than the inserts save (README "Benchmark →
/// Ingest → Hash or skiplist memtables"), and a full scan sorts it too (retrain, startup and
/// `inspect` scans only), so every scan goes through [`StateStore::scan`], which asks for total
/// order. Buckets: a judgement entry takes ~100 bytes of memtable, a product several hundred;
/// one bucket per 64 or 256 bytes keeps chains short at the cost of 8 bytes per bucket (1/8 and
/// 1/32 of the memtable).
const HASH_MEMTABLE_BYTES_PER_BUCKET: [(&str, usize); 2] = [(JUDGEMENTS_CF, 64), (PRODUCTS_CF, 256)];
/// RocksDB's default `write_buffer_size` (64 MiB), which this store keeps.
const WRITE_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// Version of the on-disk layout, stored under [`FORMAT_VERSION_KEY`] in `meta`.
pub const FORMAT_VERSION: i64 = 1;
const FORMAT_VERSION_KEY: &str = "format_version";
const CLUSTER_ID_KEY: &str = "kafka/cluster_id";
const CLUSTER_EMBEDDED_KEY: &str = "kafka/cluster_embedded";
const PRODUCT_COUNT_KEY: &str = "count/products";
const JUDGEMENT_PAIR_COUNT_KEY: &str = "count/judgement_pairs";
const DEAD_LETTER_COUNT_PREFIX: &str = "count/dead_letters/";
const EVENT_COUNT_PREFIX: &str = "count/events/";

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

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB reported an error (I/O, corruption, lock held by another process, …).
    #[error("rocksdb at {path}: {source}")]
    Rocks {
        /// The state directory.
        path: PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The state directory could not be created.
    #[error("creating state directory {path}: {source}")]
    CreateDirectory {
        /// The state directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored value could not be decoded.
    #[error("corrupt value in column family `{column_family}`: {detail}")]
    Corrupt {
        /// Where the value was.
        column_family: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A read-only open found a directory without one of the column families every state has:
    /// not a state directory, or one whose writer is creating it at this moment.
    #[error("state in {path} has no `{column_family}` column family: not a merge-indexer state directory, or its writer is still creating it")]
    MissingColumnFamily {
        /// The state directory.
        path: PathBuf,
        /// The column family not found.
        column_family: &'static str,
    },
    /// A DocID map that would not be one-to-one.
    #[error("DocID map is not a bijection: {0} appears twice")]
    NotABijection(String),
    /// The directory was written by an incompatible version.
    #[error("state format version {found} in {path} is not {FORMAT_VERSION}; migrate or use a new state dir")]
    FormatVersion {
        /// The state directory.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
}

/// Where an event came from: its Kafka coordinates.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Topic name, shared: every record of a batch carries its topic, and a reference count
    /// costs less than a string per record.
    pub topic: std::sync::Arc<str>,
    /// Partition number.
    pub partition: i32,
    /// Offset of the message.
    pub offset: i64,
}

/// A product as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProduct {
    /// The product's content from its latest upsert.
    pub content: ProductContent,
    /// Hex SHA-256 of the canonical JSON of `content`; later stages re-encode only on change.
    pub content_hash: String,
    /// The message that last changed the product.
    pub updated_by: SourcePosition,
}

/// The JSON part of a stored product value (after the 32-byte content hash).
#[derive(Serialize, Deserialize)]
struct StoredProductBody {
    content: ProductContent,
    updated_by: SourcePosition,
}

/// Bytes of the raw SHA-256 content hash that prefixes every `products` value.
pub const CONTENT_HASH_BYTES: usize = 32;

/// A product's raw content hash.
pub type ContentHash = [u8; CONTENT_HASH_BYTES];

/// The encoder whose vectors state caches: set once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingTarget {
    /// [`crate::encoder::TextEncoder::cache_id`]: the embedding cache's key prefix.
    pub cache_id: String,
    /// The `embedding_model` whose precomputed vectors are stored under `cache_id`.
    pub model_name: String,
    /// Vector length.
    pub dimension: usize,
}

/// Encodes an embedding cache key: `u16 BE len(cache_id) ‖ cache_id ‖ content hash`.
pub fn embedding_key(cache_id: &str, content_hash: &ContentHash) -> Vec<u8> {
    debug_assert!(cache_id.len() <= u16::MAX as usize);
    let mut key = Vec::with_capacity(2 + cache_id.len() + CONTENT_HASH_BYTES);
    key.extend_from_slice(&(cache_id.len() as u16).to_be_bytes());
    key.extend_from_slice(cache_id.as_bytes());
    key.extend_from_slice(content_hash);
    key
}

fn embedding_key_prefix(cache_id: &str) -> Vec<u8> {
    let mut prefix = embedding_key(cache_id, &[0; CONTENT_HASH_BYTES]);
    prefix.truncate(prefix.len() - CONTENT_HASH_BYTES);
    prefix
}

/// A vector as stored: little-endian `f32`s.
pub fn encode_vector(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|value| value.to_le_bytes()).collect()
}

fn decode_vector(bytes: &[u8]) -> Result<Vec<f32>, StateError> {
    if bytes.len() % 4 != 0 {
        return Err(StateError::Corrupt { column_family: EMBEDDINGS_CF, detail: format!("vector of {} bytes", bytes.len()) });
    }
    Ok(bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4 bytes"))).collect())
}

fn decode_content_hash(bytes: &[u8], column_family: &'static str) -> Result<ContentHash, StateError> {
    bytes.try_into().map_err(|_| StateError::Corrupt { column_family, detail: format!("content hash of {} bytes", bytes.len()) })
}

/// One product taken from the embedding queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedProduct {
    /// The product.
    pub product_id: String,
    /// The content hash its vector is wanted for.
    pub content_hash: ContentHash,
}

/// A product value ready to write: its raw content hash and the encoded value.
type EncodedProduct = ([u8; CONTENT_HASH_BYTES], Vec<u8>);

/// Encodes a product value: `sha256(canonical content JSON) ‖ JSON {content, updated_by}`.
/// The content is serialised once; the hash prefix lets an upsert be compared with the stored
/// product without parsing it.
fn encode_product_value(content: &ProductContent, updated_by: &SourcePosition) -> EncodedProduct {
    let (content_json, hash) = canonical_content(content);
    let position_json = sonic_rs::to_vec(updated_by).expect("SourcePosition serialises");
    let mut value = Vec::with_capacity(CONTENT_HASH_BYTES + content_json.len() + position_json.len() + 28);
    value.extend_from_slice(&hash);
    value.extend_from_slice(br#"{"content":"#);
    value.extend_from_slice(&content_json);
    value.extend_from_slice(br#","updated_by":"#);
    value.extend_from_slice(&position_json);
    value.push(b'}');
    (hash, value)
}

/// The content hash that prefixes a stored product value, read without decoding the product.
fn stored_content_hash(product_id: &str, value: &[u8]) -> Result<ContentHash, StateError> {
    value.get(..CONTENT_HASH_BYTES).and_then(|prefix| prefix.try_into().ok()).ok_or_else(|| StateError::Corrupt {
        column_family: PRODUCTS_CF,
        detail: format!("value of {product_id} is shorter than its hash"),
    })
}

fn decode_product_value(value: &[u8]) -> Result<StoredProduct, StateError> {
    let corrupt = |detail: String| StateError::Corrupt { column_family: PRODUCTS_CF, detail };
    if value.len() < CONTENT_HASH_BYTES {
        return Err(corrupt(format!("value is {} bytes, shorter than its hash", value.len())));
    }
    let body: StoredProductBody = serde_json::from_slice(&value[CONTENT_HASH_BYTES..]).map_err(|error| corrupt(error.to_string()))?;
    Ok(StoredProduct {
        content: body.content,
        content_hash: hex::encode(&value[..CONTENT_HASH_BYTES]),
        updated_by: body.updated_by,
    })
}

/// Everything known about one (locale, query, product) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JudgementAggregate {
    /// Highest relevance level any graded signal gave the pair (`None`: only ungraded actions).
    pub max_level: Option<RelevanceLevel>,
    /// Graded signals per level (explicit labels and mapped actions), indexed by [`RelevanceLevel::index`].
    pub level_counts: [u32; 4],
    /// Explicit judgements received.
    pub explicit_judgements: u32,
    /// Implicit actions received, indexed by [`crate::events::InteractionAction::index`].
    pub action_counts: [u32; 4],
}

impl JudgementAggregate {
    /// Encoded size: one level byte (255 = none) and nine `u32` little-endian counters.
    pub const ENCODED_BYTES: usize = 1 + 9 * 4;

    /// Folds one signal into the aggregate.
    pub fn record(&mut self, signal: QuerySignal, mapping: &RelevanceMapping) {
        let level = match signal {
            QuerySignal::Judgement(level) => {
                self.explicit_judgements = self.explicit_judgements.saturating_add(1);
                Some(level)
            }
            QuerySignal::Interaction(action) => {
                let slot = &mut self.action_counts[action.index()];
                *slot = slot.saturating_add(1);
                mapping.level_of(action)
            }
        };
        if let Some(level) = level {
            let slot = &mut self.level_counts[level.index()];
            *slot = slot.saturating_add(1);
            self.max_level = self.max_level.max(Some(level));
        }
    }

    /// Binary encoding (see `state/README.md`).
    pub fn encode(&self) -> [u8; Self::ENCODED_BYTES] {
        let mut bytes = [0u8; Self::ENCODED_BYTES];
        bytes[0] = self.max_level.map_or(u8::MAX, |level| level as u8);
        let counters = self.level_counts.iter().chain([&self.explicit_judgements]).chain(self.action_counts.iter());
        for (index, counter) in counters.enumerate() {
            bytes[1 + index * 4..5 + index * 4].copy_from_slice(&counter.to_le_bytes());
        }
        bytes
    }

    /// Decodes [`JudgementAggregate::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() != Self::ENCODED_BYTES {
            return Err(StateError::Corrupt {
                column_family: JUDGEMENTS_CF,
                detail: format!("value is {} bytes, expected {}", bytes.len(), Self::ENCODED_BYTES),
            });
        }
        let counter = |index: usize| u32::from_le_bytes(bytes[1 + index * 4..5 + index * 4].try_into().expect("4 bytes"));
        let max_level = match bytes[0] {
            u8::MAX => None,
            level => Some(*RelevanceLevel::ALL.get(level as usize).ok_or_else(|| StateError::Corrupt {
                column_family: JUDGEMENTS_CF,
                detail: format!("relevance level byte {level}"),
            })?),
        };
        Ok(Self {
            max_level,
            level_counts: [counter(0), counter(1), counter(2), counter(3)],
            explicit_judgements: counter(4),
            action_counts: [counter(5), counter(6), counter(7), counter(8)],
        })
    }
}

/// Identifies a judgement pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JudgementKey {
    /// Locale of the query (`""` when the event gave none).
    pub locale: String,
    /// Normalised query text.
    pub query: String,
    /// Product id.
    pub product_id: String,
}

/// Encodes a judgement key so that all products of one (locale, query) are adjacent:
/// `u16 BE len(locale) ‖ locale ‖ u16 BE len(query) ‖ query ‖ product_id`
/// ([`crate::events::encode_judgement_pair`], the layout a decoded [`QueryEvent`] keeps its
/// texts in, so a query record's key is [`QueryEvent::pair_key`]).
pub fn judgement_key(locale: &str, query: &str, product_id: &str) -> Vec<u8> {
    crate::events::encode_judgement_pair(locale, query, product_id)
}

/// Decodes [`judgement_key`].
pub fn decode_judgement_key(key: &[u8]) -> Result<JudgementKey, StateError> {
    let (locale, query, product_id) = crate::events::split_judgement_pair(key)
        .ok_or_else(|| StateError::Corrupt { column_family: JUDGEMENTS_CF, detail: format!("key {key:02x?}") })?;
    Ok(JudgementKey { locale: locale.to_owned(), query: query.to_owned(), product_id: product_id.to_owned() })
}

/// Encodes an offsets key: `topic ‖ 0x00 ‖ partition as i32 BE`.
pub fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.len() + 5);
    key.extend_from_slice(topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

fn decode_offset_key(key: &[u8]) -> Result<(String, i32), StateError> {
    let corrupt = || StateError::Corrupt { column_family: OFFSETS_CF, detail: format!("key {key:02x?}") };
    if key.len() < 5 || key[key.len() - 5] != 0 {
        return Err(corrupt());
    }
    let topic = std::str::from_utf8(&key[..key.len() - 5]).map_err(|_| corrupt())?.to_owned();
    let partition = i32::from_be_bytes(key[key.len() - 4..].try_into().expect("4 bytes"));
    Ok((topic, partition))
}

/// Hex SHA-256 of the canonical JSON of a product's content (fields in declaration order,
/// attributes sorted): equal content, equal hash. The same hash prefixes the stored value.
pub fn content_hash(content: &ProductContent) -> String {
    hex::encode(canonical_content(content).1)
}

/// The canonical content JSON and its raw SHA-256, shared by [`content_hash`] and the stored
/// value's prefix so the two can never disagree. Written by sonic-rs, whose compact output is
/// byte for byte serde_json's (same field order, same string escapes: `\"`, `\\`, the short
/// forms `\b \t \n \f \r` and `\u00xx` for other control characters, nothing else escaped),
/// at about a third of serde_json's cost; stored hashes therefore stay valid, which
/// `canonical_content_is_serde_jsons_compact_output` and a pinned hash check.
fn canonical_content(content: &ProductContent) -> (Vec<u8>, [u8; CONTENT_HASH_BYTES]) {
    let content_json = sonic_rs::to_vec(content).expect("ProductContent serialises");
    let hash = Sha256::digest(&content_json).into();
    (content_json, hash)
}

/// Reads `Cumulative stall: 00:00:1.250 H:M:S, 3.1 percent` (RocksDB's DB stats, a fixed
/// format) as seconds.
fn parse_cumulative_stall_seconds(stats: &str) -> Option<f64> {
    let line = stats.lines().find_map(|line| line.trim().strip_prefix("Cumulative stall: "))?;
    let (clock, _) = line.split_once(" H:M:S")?;
    let mut parts = clock.split(':');
    let (hours, minutes, seconds) = (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    if parts.next().is_some() {
        return None;
    }
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

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
    fn of(records: &[SourcedRecord], outcomes: &[ApplyOutcome]) -> Self {
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
fn increment<Label: Copy + PartialEq>(entries: &mut Vec<(std::sync::Arc<str>, Label, u64)>, topic: &std::sync::Arc<str>, label: Label) {
    let same_topic = |entry_topic: &std::sync::Arc<str>| std::sync::Arc::ptr_eq(entry_topic, topic) || entry_topic == topic;
    match entries.iter_mut().find(|(entry_topic, entry_label, _)| *entry_label == label && same_topic(entry_topic)) {
        Some((_, _, count)) => *count += 1,
        None => entries.push((std::sync::Arc::clone(topic), label, 1)),
    }
}

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

/// Whether this state directory belongs to the Kafka cluster it is about to consume from.
/// Offsets are only meaningful within one cluster, so a state dir is bound to the first
/// cluster it consumed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterBinding {
    /// The directory was not bound yet; it is now bound to the given cluster.
    NewlyBound,
    /// The directory belongs to this cluster.
    Same,
    /// The directory belongs to another cluster.
    Mismatch {
        /// The cluster id stored in state.
        stored_cluster_id: String,
        /// Whether that cluster was an embedded (in-process, now gone) broker.
        stored_was_embedded: bool,
    },
}

/// Options for [`StateStore::open`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateOptions {
    /// fsync the WAL on every batch. Off by default: a batch is one atomic WAL record with its
    /// offsets, so a machine crash can only roll state back to an earlier consistent batch, and
    /// those events are consumed again from Kafka.
    pub sync_writes: bool,
    /// RocksDB block cache size in MiB, shared by all column families.
    pub block_cache_mib: usize,
    /// Memtable of the `products` and `judgements` column families (see [`MemtableKind`]).
    pub memtable: MemtableKind,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self { sync_writes: false, block_cache_mib: 256, memtable: MemtableKind::Skiplist }
    }
}

/// How the `products` and `judgements` column families keep unflushed writes: they take one
/// insert per ingested event and are otherwise read by key. Either way the same data is stored;
/// the choice moves CPU between the state writer and RocksDB's background flush (README
/// "Benchmark → Ingest → Hash or skiplist memtables").
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MemtableKind {
    /// RocksDB's default skiplist (the default here too): dearer inserts on the state writer, no
    /// sort at flush; less CPU in all, so best where every core is busy.
    Skiplist,
    /// RocksDB `HashLinkList` hash tables (the whole key as the prefix): an insert costs the
    /// state writer about half a skiplist insert, but the memtable is sorted when it is flushed
    /// (and for each full scan), which costs more than the inserts save. Worth it where the
    /// state writer, the pipeline's serial stage, is the limit and a core is free for the
    /// background flush.
    Hash,
}

/// The RocksDB-backed state of one indexer.
pub struct StateStore {
    database: DB,
    path: PathBuf,
    write_options_sync: bool,
    embedding_target: OnceLock<EmbeddingTarget>,
    /// Serialises the writers that read-then-write the embedding queue (batch apply and the
    /// embedding workers), so a worker never dequeues an entry a newer upsert replaced.
    queue_write_lock: Mutex<()>,
    /// Serialises DocID writers, so two products can never take the same free DocID.
    docid_write_lock: Mutex<()>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("StateStore").field("path", &self.path).finish()
    }
}

impl StateStore {
    /// Opens (creating if needed) the state in `path` for writing. Only one process may hold it.
    pub fn open(path: &Path, options: &StateOptions) -> Result<Self, StateError> {
        std::fs::create_dir_all(path).map_err(|source| StateError::CreateDirectory { path: path.to_owned(), source })?;
        let mut database_options = Options::default();
        database_options.create_if_missing(true);
        database_options.create_missing_column_families(true);
        // Hash memtables take one writer at a time; all writes are serialised here anyway.
        database_options.set_allow_concurrent_memtable_write(false);
        database_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_mib.max(8) * 1024 * 1024);
        let mut table_options = rocksdb::BlockBasedOptions::default();
        table_options.set_block_cache(&cache);
        table_options.set_bloom_filter(10.0, false);
        database_options.set_block_based_table_factory(&table_options);
        let descriptors = COLUMN_FAMILIES.iter().map(|name| {
            let mut column_options = Options::default();
            column_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            column_options.set_block_based_table_factory(&table_options);
            if POINT_LOOKUP_COLUMN_FAMILIES.contains(name) {
                // The ingest path looks up every product and judgement pair it touches, and most
                // lookups of a growing catalog miss: a whole-key bloom filter on the memtable
                // answers those misses without walking the skiplist.
                column_options.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
                column_options.set_memtable_whole_key_filtering(true);
            }
            let hashed_memtable = HASH_MEMTABLE_BYTES_PER_BUCKET.iter().find(|(hashed, _)| hashed == name);
            if let (Some((_, bytes_per_bucket)), MemtableKind::Hash) = (hashed_memtable, options.memtable) {
                column_options.set_write_buffer_size(WRITE_BUFFER_BYTES);
                column_options.set_prefix_extractor(rocksdb::SliceTransform::create_noop());
                column_options.set_memtable_factory(rocksdb::MemtableFactory::HashLinkList { bucket_count: WRITE_BUFFER_BYTES / bytes_per_bucket });
            }
            ColumnFamilyDescriptor::new(*name, column_options)
        });
        let database = DB::open_cf_descriptors(&database_options, path, descriptors)
            .map_err(|source| StateError::Rocks { path: path.to_owned(), source })?;
        let store = Self::from_database(database, path, options.sync_writes);
        store.check_or_write_format_version()?;
        Ok(store)
    }

    /// Flushes every column family's memtable to SST files and waits: what RocksDB does in the
    /// background as memtables fill, done now (used by `bench stages` to charge a write's
    /// deferred flush cost to it).
    pub fn flush_memtables(&self) -> Result<(), StateError> {
        let column_families: Vec<&rocksdb::ColumnFamily> = COLUMN_FAMILIES.iter().map(|name| self.column_family(name)).collect();
        self.database.flush_cfs_opt(&column_families, &rocksdb::FlushOptions::default()).map_err(|error| self.rocks_error(error))
    }

    /// Opens the state read-only, alongside a running writer (used by `inspect`).
    ///
    /// The column families every state has had since its first format ([`BASE_COLUMN_FAMILIES`])
    /// must be there; one missing is a [`StateError::MissingColumnFamily`] (a writer creates them
    /// one by one right after creating the directory, so a reader can catch it in between). A
    /// directory written before a later column family existed opens without it, and its readers
    /// find it empty.
    pub fn open_read_only(path: &Path) -> Result<Self, StateError> {
        let existing = DB::list_cf(&Options::default(), path).map_err(|source| StateError::Rocks { path: path.to_owned(), source })?;
        if let Some(missing) = BASE_COLUMN_FAMILIES.iter().find(|name| !existing.iter().any(|found| found == *name)) {
            return Err(StateError::MissingColumnFamily { path: path.to_owned(), column_family: missing });
        }
        let present = COLUMN_FAMILIES.iter().filter(|name| existing.iter().any(|found| found == *name));
        let database = DB::open_cf_for_read_only(&Options::default(), path, present, false)
            .map_err(|source| StateError::Rocks { path: path.to_owned(), source })?;
        let store = Self::from_database(database, path, false);
        if let Some(found) = store.meta_counter(FORMAT_VERSION_KEY)? {
            if found != FORMAT_VERSION {
                return Err(StateError::FormatVersion { path: path.to_owned(), found });
            }
        }
        Ok(store)
    }

    fn from_database(database: DB, path: &Path, write_options_sync: bool) -> Self {
        Self { database, path: path.to_owned(), write_options_sync, embedding_target: OnceLock::new(), queue_write_lock: Mutex::new(()), docid_write_lock: Mutex::new(()) }
    }

    /// Iterates `column_family` from `mode` in key order. Every scan goes through here: the
    /// hash-memtable column families only iterate in order when asked for total order.
    fn scan<'store>(&'store self, column_family: &'store rocksdb::ColumnFamily, mode: IteratorMode<'_>) -> rocksdb::DBIterator<'store> {
        let mut read_options = rocksdb::ReadOptions::default();
        read_options.set_total_order_seek(true);
        self.database.iterator_cf_opt(column_family, read_options, mode)
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the encoder whose precomputed vectors batch apply stores. Once per store; a
    /// second, different target is refused.
    pub fn set_embedding_target(&self, target: EmbeddingTarget) -> Result<(), EmbeddingTarget> {
        match self.embedding_target.set(target) {
            Ok(()) => Ok(()),
            Err(target) if self.embedding_target.get() == Some(&target) => Ok(()),
            Err(target) => Err(target),
        }
    }

    /// The encoder set with [`StateStore::set_embedding_target`].
    pub fn embedding_target(&self) -> Option<&EmbeddingTarget> {
        self.embedding_target.get()
    }

    fn try_column_family(&self, name: &'static str) -> Option<&rocksdb::ColumnFamily> {
        self.database.cf_handle(name)
    }

    fn rocks_error(&self, source: rocksdb::Error) -> StateError {
        StateError::Rocks { path: self.path.clone(), source }
    }

    fn column_family(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.database.cf_handle(name).expect("all column families are opened with the database")
    }

    fn check_or_write_format_version(&self) -> Result<(), StateError> {
        match self.meta_counter(FORMAT_VERSION_KEY)? {
            Some(found) if found != FORMAT_VERSION => Err(StateError::FormatVersion { path: self.path.clone(), found }),
            Some(_) => Ok(()),
            None => self
                .database
                .put_cf(self.column_family(META_CF), FORMAT_VERSION_KEY, FORMAT_VERSION.to_le_bytes())
                .map_err(|error| self.rocks_error(error)),
        }
    }

    /// A point read; `None` too when a read-only state lacks `column_family` (written before it
    /// existed).
    fn get(&self, column_family: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let Some(handle) = self.try_column_family(column_family) else {
            return Ok(None);
        };
        self.database.get_cf(handle, key).map_err(|error| self.rocks_error(error))
    }

    fn meta_counter(&self, name: &str) -> Result<Option<i64>, StateError> {
        let Some(bytes) = self.get(META_CF, name.as_bytes())? else {
            return Ok(None);
        };
        let array: [u8; 8] = bytes.as_slice().try_into().map_err(|_| StateError::Corrupt {
            column_family: META_CF,
            detail: format!("counter {name} is {} bytes", bytes.len()),
        })?;
        Ok(Some(i64::from_le_bytes(array)))
    }

    /// Binds the state to `cluster_id` on first use, or reports whether it matches.
    pub fn bind_cluster(&self, cluster_id: &str, embedded: bool) -> Result<ClusterBinding, StateError> {
        let stored = self.get(META_CF, CLUSTER_ID_KEY.as_bytes())?;
        match stored {
            Some(stored) if stored == cluster_id.as_bytes() => Ok(ClusterBinding::Same),
            Some(stored) => Ok(ClusterBinding::Mismatch {
                stored_cluster_id: String::from_utf8_lossy(&stored).into_owned(),
                stored_was_embedded: self.get(META_CF, CLUSTER_EMBEDDED_KEY.as_bytes())?.is_some(),
            }),
            None => {
                let meta = self.column_family(META_CF);
                let mut batch = WriteBatch::default();
                batch.put_cf(meta, CLUSTER_ID_KEY, cluster_id.as_bytes());
                if embedded {
                    batch.put_cf(meta, CLUSTER_EMBEDDED_KEY, b"1");
                }
                self.database.write(batch).map_err(|error| self.rocks_error(error))?;
                Ok(ClusterBinding::NewlyBound)
            }
        }
    }

    /// The Kafka cluster id this state is bound to, if any.
    pub fn bound_cluster_id(&self) -> Result<Option<String>, StateError> {
        Ok(self.get(META_CF, CLUSTER_ID_KEY.as_bytes())?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// The next offset to consume for a partition, if any batch of it was applied.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        let Some(bytes) = self.get(OFFSETS_CF, &offset_key(topic, partition))? else {
            return Ok(None);
        };
        let array: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StateError::Corrupt { column_family: OFFSETS_CF, detail: format!("offset of {topic}/{partition}") })?;
        Ok(Some(i64::from_be_bytes(array)))
    }

    /// Every stored next offset, by (topic, partition).
    pub fn stored_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StateError> {
        let mut offsets = BTreeMap::new();
        for entry in self.scan(self.column_family(OFFSETS_CF), IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            let array: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| StateError::Corrupt { column_family: OFFSETS_CF, detail: "offset value size".into() })?;
            offsets.insert(decode_offset_key(&key)?, i64::from_be_bytes(array));
        }
        Ok(offsets)
    }

    /// The stored product, if present.
    pub fn product(&self, product_id: &str) -> Result<Option<StoredProduct>, StateError> {
        self.get(PRODUCTS_CF, product_id.as_bytes())?.map(|bytes| decode_product_value(&bytes)).transpose()
    }

    /// The raw content hash of a stored product, read without decoding the product.
    fn product_content_hash(&self, product_id: &str) -> Result<Option<[u8; CONTENT_HASH_BYTES]>, StateError> {
        let column_family = self.column_family(PRODUCTS_CF);
        let Some(value) = self.database.get_pinned_cf(column_family, product_id.as_bytes()).map_err(|error| self.rocks_error(error))? else {
            return Ok(None);
        };
        stored_content_hash(product_id, &value).map(Some)
    }

    /// The aggregate of a (locale, query, product) pair; pass `""` for no locale and the
    /// query as normalised by [`crate::events::normalize_query`].
    pub fn judgement(&self, locale: &str, query: &str, product_id: &str) -> Result<Option<JudgementAggregate>, StateError> {
        self.get(JUDGEMENTS_CF, &judgement_key(locale, query, product_id))?
            .map(|bytes| JudgementAggregate::decode(&bytes))
            .transpose()
    }

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

    /// The cached vector of `content_hash` under encoder `cache_id`.
    pub fn embedding(&self, cache_id: &str, content_hash: &ContentHash) -> Result<Option<Vec<f32>>, StateError> {
        let Some(column_family) = self.try_column_family(EMBEDDINGS_CF) else {
            return Ok(None);
        };
        let key = embedding_key(cache_id, content_hash);
        let value = self.database.get_pinned_cf(column_family, key).map_err(|error| self.rocks_error(error))?;
        value.map(|bytes| decode_vector(&bytes)).transpose()
    }

    /// The vector of a stored product's current content under encoder `cache_id`, if computed.
    pub fn product_embedding(&self, product_id: &str, cache_id: &str) -> Result<Option<Vec<f32>>, StateError> {
        match self.product_content_hash(product_id)? {
            Some(hash) => self.embedding(cache_id, &hash),
            None => Ok(None),
        }
    }

    /// Vectors cached under encoder `cache_id` (a key scan; for `inspect` and summaries).
    pub fn count_embeddings(&self, cache_id: &str) -> Result<u64, StateError> {
        let Some(column_family) = self.try_column_family(EMBEDDINGS_CF) else {
            return Ok(0);
        };
        let prefix = embedding_key_prefix(cache_id);
        let mut count = 0;
        for entry in self.scan(column_family, IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
            let (key, _) = entry.map_err(|error| self.rocks_error(error))?;
            if !key.starts_with(&prefix) {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Up to `limit` entries of queue `column_family` in key order, starting after `after`
    /// (exclusive), keeping the product ids `accept` says this worker owns.
    fn queue_page(&self, column_family: &'static str, after: Option<&str>, limit: usize, accept: impl Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let Some(handle) = self.try_column_family(column_family) else {
            return Ok(Vec::new());
        };
        let mode = match after {
            Some(after) => IteratorMode::From(after.as_bytes(), rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut page = Vec::new();
        for entry in self.scan(handle, mode) {
            if page.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            let product_id = String::from_utf8_lossy(&key).into_owned();
            if after.is_some_and(|after| after == product_id) || !accept(&product_id) {
                continue;
            }
            page.push((product_id, value.to_vec()));
        }
        Ok(page)
    }

    /// Up to `limit` products waiting for a vector in key order, starting after `after`
    /// (exclusive), keeping those `accept` says this worker owns.
    pub fn embedding_queue_page(&self, after: Option<&str>, limit: usize, accept: impl Fn(&str) -> bool) -> Result<Vec<QueuedProduct>, StateError> {
        self.queue_page(EMBEDDING_QUEUE_CF, after, limit, accept)?
            .into_iter()
            .map(|(product_id, value)| Ok(QueuedProduct { product_id, content_hash: decode_content_hash(&value, EMBEDDING_QUEUE_CF)? }))
            .collect()
    }

    /// Up to `limit` products waiting for a DocID in key order, starting after `after` (exclusive).
    pub fn docid_queue_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StateError> {
        Ok(self.queue_page(DOCID_QUEUE_CF, after, limit, |_| true)?.into_iter().map(|(product_id, _)| product_id).collect())
    }

    /// Number of keys in `column_family` (a key scan; 0 when a read-only state lacks it).
    fn count_keys(&self, column_family: &'static str) -> Result<u64, StateError> {
        let Some(handle) = self.try_column_family(column_family) else {
            return Ok(0);
        };
        let mut count = 0;
        for entry in self.scan(handle, IteratorMode::Start) {
            entry.map_err(|error| self.rocks_error(error))?;
            count += 1;
        }
        Ok(count)
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

    /// Seconds RocksDB has held writes back (write stalls and slowdowns: too many memtables or
    /// level-0 files, pending compaction) since this process opened the state, from the
    /// `rocksdb.dbstats` property's "Cumulative stall" line.
    pub fn cumulative_write_stall_seconds(&self) -> Result<f64, StateError> {
        let stats = self.database.property_value("rocksdb.dbstats").map_err(|error| self.rocks_error(error))?.unwrap_or_default();
        parse_cumulative_stall_seconds(&stats).ok_or_else(|| StateError::Corrupt {
            column_family: "(database)",
            detail: format!("no \"Cumulative stall: H:M:S\" line in rocksdb.dbstats: {stats:?}"),
        })
    }

    /// RocksDB's estimate of the queued products (exact after a flush; for the gauge).
    pub fn embedding_queue_estimate(&self) -> Result<u64, StateError> {
        let Some(column_family) = self.try_column_family(EMBEDDING_QUEUE_CF) else {
            return Ok(0);
        };
        Ok(self
            .database
            .property_int_value_cf(column_family, "rocksdb.estimate-num-keys")
            .map_err(|error| self.rocks_error(error))?
            .unwrap_or(0))
    }

    /// Vectors cached per encoder cache id, and the exact number of queued products (key
    /// scans; for `inspect`).
    pub fn embedding_summary(&self) -> Result<(BTreeMap<String, u64>, u64), StateError> {
        let mut by_encoder: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(column_family) = self.try_column_family(EMBEDDINGS_CF) {
            for entry in self.scan(column_family, IteratorMode::Start) {
                let (key, _) = entry.map_err(|error| self.rocks_error(error))?;
                let length = key.get(..2).map_or(0, |prefix| u16::from_be_bytes([prefix[0], prefix[1]]) as usize);
                let cache_id = key.get(2..2 + length).map(String::from_utf8_lossy).unwrap_or_default();
                *by_encoder.entry(cache_id.into_owned()).or_insert(0) += 1;
            }
        }
        Ok((by_encoder, self.count_keys(EMBEDDING_QUEUE_CF)?))
    }

    /// Whether any product is queued (exact).
    pub fn embedding_queue_is_empty(&self) -> Result<bool, StateError> {
        Ok(self.embedding_queue_page(None, 1, |_| true)?.is_empty())
    }

    /// Stores computed vectors and removes their queue entries, in one write. An entry whose
    /// queued hash changed meanwhile (a newer upsert) stays queued; its vector is still cached
    /// under the hash it was computed for. Each dequeued product without a DocID joins the DocID
    /// queue in the same write: its vector now exists, so the DocID worker can place it.
    pub fn store_embeddings(&self, cache_id: &str, computed: &[(QueuedProduct, Vec<f32>)], cache_hits: &[QueuedProduct]) -> Result<usize, StateError> {
        let embeddings = self.column_family(EMBEDDINGS_CF);
        let queue = self.column_family(EMBEDDING_QUEUE_CF);
        let docid_queue = self.column_family(DOCID_QUEUE_CF);
        // Lock order: DocIDs, then the embedding queue (as in batch apply). The DocID lock keeps
        // a delete or an assignment from landing between the DocID check and this write.
        let _docids_exclusive = self.docid_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _exclusive = self.queue_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        for (queued, vector) in computed {
            batch.put_cf(embeddings, embedding_key(cache_id, &queued.content_hash), encode_vector(vector));
        }
        let mut dequeued = 0;
        for queued in computed.iter().map(|(queued, _)| queued).chain(cache_hits) {
            let current = self.database.get_pinned_cf(queue, queued.product_id.as_bytes()).map_err(|error| self.rocks_error(error))?;
            if current.as_deref() == Some(queued.content_hash.as_slice()) {
                batch.delete_cf(queue, queued.product_id.as_bytes());
                dequeued += 1;
                // The entry was current, so the product is stored (a delete removes the entry).
                if self.docid(&queued.product_id)?.is_none() {
                    batch.put_cf(docid_queue, queued.product_id.as_bytes(), []);
                }
            }
        }
        self.database.write(batch).map_err(|error| self.rocks_error(error))?;
        Ok(dequeued)
    }

    /// Queues every stored product whose current content has no vector under `cache_id`: run
    /// at start-up, it covers a new or changed encoder and state written before the queue
    /// existed. Returns how many were queued.
    pub fn enqueue_missing_embeddings(&self, cache_id: &str) -> Result<u64, StateError> {
        let products = self.column_family(PRODUCTS_CF);
        let queue = self.column_family(EMBEDDING_QUEUE_CF);
        let mut missing: Vec<(Vec<u8>, ContentHash)> = Vec::new();
        for entry in self.scan(products, IteratorMode::Start) {
            let (key, value) = entry.map_err(|error| self.rocks_error(error))?;
            let hash = decode_content_hash(value.get(..CONTENT_HASH_BYTES).unwrap_or_default(), PRODUCTS_CF)?;
            if self.embedding(cache_id, &hash)?.is_none() {
                missing.push((key.to_vec(), hash));
            }
        }
        let _exclusive = self.queue_write_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        let mut queued = 0;
        for (product_id, hash) in &missing {
            // Re-check under the lock: the product may have changed since the scan.
            if self.product_content_hash(&String::from_utf8_lossy(product_id))? == Some(*hash) {
                batch.put_cf(queue, product_id, hash);
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
    fn duplicate_mask(&self, batch: &PreparedBatch) -> Result<Option<Vec<bool>>, StateError> {
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
    fn fold_products<'batch>(
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
    fn fold_judgements<'batch>(
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
    fn commit_batch_write(
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
                // the ingest path, the writer's costliest part (README "Benchmark").
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
struct PartitionSpan {
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

    fn product_id(&self, index: u32) -> &str {
        product_id_of(&self.records, index)
    }

    fn pair_key(&self, index: u32) -> &[u8] {
        pair_key_of(&self.records, index)
    }
}

fn pair_key_of(records: &[SourcedRecord], index: u32) -> &[u8] {
    match &records[index as usize].record {
        DecodedRecord::Query(event) => event.pair_key(),
        _ => unreachable!("judgement_order holds query records only"),
    }
}

fn product_id_of(records: &[SourcedRecord], index: u32) -> &str {
    match &records[index as usize].record {
        DecodedRecord::Product(event) => event.product_id(),
        _ => unreachable!("product_order holds product records only"),
    }
}

/// What one product's records in a batch change, in the writer's fold.
#[derive(Debug, Default, PartialEq)]
struct ProductChange<'batch> {
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
struct BatchWrite<'batch> {
    products: Vec<(&'batch str, ProductChange<'batch>)>,
    judgements: Vec<(&'batch [u8], [u8; JudgementAggregate::ENCODED_BYTES])>,
    /// Precomputed vectors to cache: (embedding key, encoded vector).
    embeddings: Vec<(Vec<u8>, Vec<u8>)>,
    product_delta: i64,
    new_judgement_pairs: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
