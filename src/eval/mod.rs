//! Offline evaluation: retrieval metrics over graded judgements ([`metrics`]) and the readers of
//! the real ESCI data ([`datasets`]). The retriever's evaluation (issue 15) lands here.
//!
//! May read files by path (`../shared/data/…`, never copied into the repo) and call `events`
//! (to turn ESCI rows into events) and `encoder`; touches no state and no Kafka.

pub mod datasets;
pub mod metrics;
