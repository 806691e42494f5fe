//! merge-indexer: a streaming incremental indexer for MERGE generative retrieval.
//!
//! Events flow `source` (Kafka consumer, micro-batches, dead letters) → `events` (decoding,
//! validation, relevance mapping) → `state` (RocksDB, one atomic write per batch with its
//! offsets). `metrics` names what every stage records; `config` layers defaults, a TOML file,
//! environment and flags; `kafka` holds client set-up and the embedded broker; `synth` and
//! `datasets` produce synthetic and real (ESCI) event streams; `cli` and `bench` are the
//! command line. See ARCHITECTURE.md for the whole picture, including the stages to come.

#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod config;
pub mod datasets;
pub mod docid;
pub mod encoder;
pub mod events;
pub mod kafka;
pub mod metrics;
pub mod retrieval_metrics;
pub mod source;
pub mod state;
pub mod synth;
pub mod topics;

/// The burn backend family this binary was built for (`cuda` with the `cuda` feature, `flex`
/// with the `flex` feature, else the CPU `ndarray` backend); reported in
/// `merge_indexer_build_info`.
#[cfg(feature = "cuda")]
pub const BACKEND_NAME: &str = "cuda";
/// The burn backend family this binary was built for (`cuda` with the `cuda` feature, `flex`
/// with the `flex` feature, else the CPU `ndarray` backend); reported in
/// `merge_indexer_build_info`.
#[cfg(all(feature = "flex", not(feature = "cuda")))]
pub const BACKEND_NAME: &str = "flex";
/// The burn backend family this binary was built for (`cuda` with the `cuda` feature, `flex`
/// with the `flex` feature, else the CPU `ndarray` backend); reported in
/// `merge_indexer_build_info`.
#[cfg(not(any(feature = "cuda", feature = "flex")))]
pub const BACKEND_NAME: &str = "ndarray";
