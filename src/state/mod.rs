//! The state stage: RocksDB holding products, aggregated judgements, consumer offsets and
//! counters — written together in one `WriteBatch` per micro-batch so a crash neither loses nor
//! double-applies an event — plus the embedding cache, the DocID map and their work queues.
//!
//! - [`StateStore`] (here): open, options, cluster binding, offsets, point reads.
//! - [`codec`] keys and value encodings; [`apply`] batch preparation and the atomic write;
//!   [`embeddings`] vectors and the embedding queue; [`docids`] the product ↔ DocID map and the
//!   DocID queue; [`inspect`] counters, scans and the `inspect` report.
//!
//! Owns the on-disk layout, documented in `state/README.md` (keep the two in step). **The only
//! module that touches RocksDB**: other stages go through [`StateStore`]'s methods. May call
//! `events` (record types) and `docid` (the [`DocId`](crate::docid::DocId) type); never Kafka,
//! encoders or models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

mod apply;
pub use apply::{DecodedRecord, SourcedRecord, ApplyOutcome, BatchReport, OutcomeCounts, PreparedBatch};
mod codec;
use codec::*;
pub use codec::{SourcePosition, StoredProduct, CONTENT_HASH_BYTES, ContentHash, embedding_key, encode_vector, JudgementAggregate, JudgementKey, judgement_key, decode_judgement_key, offset_key, content_hash};
mod docids;
pub use docids::{DocIdPlacement};
mod embeddings;
pub use embeddings::{EmbeddingTarget, QueuedProduct};
mod inspect;
pub use inspect::{inspect_report, InspectReport, StateCounts};

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
/// is sorted when it is flushed, which costs more than the inserts save (docs/performance-notes.md,
/// "2026-11-27: hash memtables"), and a full scan sorts it too (retrain, startup and
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
/// the choice moves CPU between the state writer and RocksDB's background flush (docs/performance-notes.md,
/// "2026-11-27: hash memtables").
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
}

#[cfg(test)]
mod tests;
