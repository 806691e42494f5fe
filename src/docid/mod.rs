//! The DocID stage: MERGE's semantic document identifiers, `levels` codes of `codebook_size`
//! values each (4 × 256 by default).
//!
//! - [`model`]: the RQ-VAE; [`losses`]: MERGE's loss terms; [`train`]: batches, k-means++
//!   initialisation, training and the report of `train-docids`; [`esci`]: training data from
//!   the graded ESCI folder.
//! - [`assign`]: collision resolution (Sinkhorn, then a guaranteed overflow rule) that makes the
//!   map product ↔ DocID a bijection; its persistence lives in `state`.
//! - [`incremental`]: saved model directories and the worker that gives new products DocIDs
//!   between retrains.
//!
//! Owns the RQ-VAE and its saved model directory. May call `state` (vectors, the DocID map and
//! queue, through [`StateStore`](crate::state::StateStore)), `encoder` (the backend and, for
//! [`esci`], encoding), `eval::datasets` and `metrics`; never Kafka, never RocksDB directly.

pub mod assign;
pub mod esci;
pub mod incremental;
pub mod losses;
pub mod model;
pub mod train;

pub use assign::{place_one, resolve_collisions, sinkhorn_plan, AssignmentError, AssignmentReport, CodeSpace, DocId, DocumentCodes, SinkhornConfig};
