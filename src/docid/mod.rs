//! DocIDs: MERGE's semantic document identifiers, `levels` codes of `codebook_size` values each
//! (4 × 256 by default).
//!
//! Today this holds the collision resolution that makes the map product ↔ DocID a bijection
//! ([`assign`]), and its persistence lives in `state`. The RQ-VAE that produces the codes
//! (issue 4) is still to come; [`assign`] takes its output — each document's codes and the cost of
//! every last-level code — as plain data.

pub mod assign;
pub mod losses;
pub mod model;
pub mod train;

pub use assign::{place_one, resolve_collisions, sinkhorn_plan, AssignmentError, AssignmentReport, CodeSpace, DocId, DocumentCodes, SinkhornConfig};
