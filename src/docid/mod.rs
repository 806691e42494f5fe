//! DocIDs: MERGE's semantic document identifiers, `levels` codes of `codebook_size` values each
//! (4 × 256 by default).
//!
//! - [`model`]: the RQ-VAE; [`losses`]: MERGE's loss terms; [`train`]: batches, k-means++
//!   initialisation, training and the report of `train-docids`.
//! - [`assign`]: collision resolution (Sinkhorn, then a guaranteed overflow rule) that makes the
//!   map product ↔ DocID a bijection; its persistence lives in `state`.
//! - [`incremental`]: saved model directories and the worker that gives new products DocIDs
//!   between retrains.

pub mod assign;
pub mod incremental;
pub mod losses;
pub mod model;
pub mod train;

pub use assign::{place_one, resolve_collisions, sinkhorn_plan, AssignmentError, AssignmentReport, CodeSpace, DocId, DocumentCodes, SinkhornConfig};
