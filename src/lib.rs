//! merge-indexer: a streaming incremental indexer for MERGE generative retrieval — the library a
//! Rust pipeline or serving layer builds on. The `merge-indexer` binary (its `cli` and `bench`
//! modules) is a thin command line over it.
//!
//! One module per pipeline stage, in data-flow order:
//! - [`events`]: event types, decoding and validation, relevance levels, producer encoders;
//! - [`ingest`]: the Kafka consumer, micro-batches, pipeline threads, dead letters, lag;
//! - [`state`]: RocksDB (the only module that touches it): one atomic write per batch with its
//!   offsets, the embedding and DocID queues, the DocID map, inspection;
//! - [`encoder`]: product and query text → vectors (MiniLM in burn, hashing), the embedding workers;
//! - [`docid`]: MERGE's RQ-VAE, losses, training, collision resolution, incremental assignment;
//! - [`eval`]: offline retrieval metrics and the ESCI datasets;
//! - [`service`]: the stages wired into the running indexer, and the demo.
//!
//! Shared by all: [`config`] (defaults, TOML, environment, flags), [`metrics`] (every metric's
//! name), [`kafka`] (client set-up, embedded broker, producers, topic admin), [`synth`] (the
//! synthetic catalog). See ARCHITECTURE.md for the map and the stages to come (retriever, index
//! versions, serving).

#![warn(missing_docs)]

pub mod config;
pub mod docid;
pub mod encoder;
pub mod eval;
pub mod events;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod retriever;
pub mod service;
pub mod state;
pub mod synth;

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

/// The burn backend family this binary was built for (`cuda` with the `cuda` feature, else burn's
/// CPU `flex` backend); reported in `merge_indexer_build_info`.
#[cfg(feature = "cuda")]
pub const BACKEND_NAME: &str = "cuda";
/// The burn backend family this binary was built for (`cuda` with the `cuda` feature, else burn's
/// CPU `flex` backend); reported in `merge_indexer_build_info`.
#[cfg(not(feature = "cuda"))]
pub const BACKEND_NAME: &str = "flex";
