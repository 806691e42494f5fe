//! The retriever stage (issue 15), so far its decoding half: the prefix trie of the DocIDs that
//! exist ([`trie`]) and beam search constrained to it ([`beam`]) over any [`NextCodeScorer`].
//! The seq2seq model that scores next codes from a query (MiniLM states + a small transformer
//! decoder, w_t-weighted loss), `train`, `search` and `eval` are **not built yet**.
//!
//! Owns the trie and decoding. May call `docid` (the [`DocId`](crate::docid::DocId) type); never
//! state, Kafka or RocksDB: the trie is built from the DocID map a caller reads.

pub mod beam;
pub mod trie;

pub use beam::{constrained_beam_search, BeamHit, NextCodeScorer};
pub use trie::{DocIdTrie, NodeId, TrieError};
