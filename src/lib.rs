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

/// Sleeps up to `duration` in slices of at most `slice`, checking `is_stopped` before each, so a
/// worker's pause or back-off never holds up shutdown by more than one slice. Returns whether it
/// was stopped (`false`: the whole duration passed).
pub(crate) fn sleep_unless_stopped(duration: std::time::Duration, slice: std::time::Duration, is_stopped: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + duration;
    loop {
        if is_stopped() {
            return true;
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(slice));
    }
}

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
