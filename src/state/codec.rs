//! Keys and value encodings of the state's column families (see `state/README.md`): products,
//! judgement aggregates and pair keys, offsets, vectors, content hashes.

use super::*;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::{ProductContent, QuerySignal, RelevanceLevel, RelevanceMapping};

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
pub(super) struct StoredProductBody {
    content: ProductContent,
    updated_by: SourcePosition,
}

/// Bytes of the raw SHA-256 content hash that prefixes every `products` value.
pub const CONTENT_HASH_BYTES: usize = 32;

/// A product's raw content hash.
pub type ContentHash = [u8; CONTENT_HASH_BYTES];

/// Encodes an embedding cache key: `u16 BE len(cache_id) ‖ cache_id ‖ content hash`.
pub fn embedding_key(cache_id: &str, content_hash: &ContentHash) -> Vec<u8> {
    debug_assert!(cache_id.len() <= u16::MAX as usize);
    let mut key = Vec::with_capacity(2 + cache_id.len() + CONTENT_HASH_BYTES);
    key.extend_from_slice(&(cache_id.len() as u16).to_be_bytes());
    key.extend_from_slice(cache_id.as_bytes());
    key.extend_from_slice(content_hash);
    key
}

pub(super) fn embedding_key_prefix(cache_id: &str) -> Vec<u8> {
    let mut prefix = embedding_key(cache_id, &[0; CONTENT_HASH_BYTES]);
    prefix.truncate(prefix.len() - CONTENT_HASH_BYTES);
    prefix
}

/// A vector as stored: little-endian `f32`s.
pub fn encode_vector(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|value| value.to_le_bytes()).collect()
}

pub(super) fn decode_vector(bytes: &[u8]) -> Result<Vec<f32>, StateError> {
    if bytes.len() % 4 != 0 {
        return Err(StateError::Corrupt { column_family: EMBEDDINGS_CF, detail: format!("vector of {} bytes", bytes.len()) });
    }
    Ok(bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4 bytes"))).collect())
}

pub(super) fn decode_content_hash(bytes: &[u8], column_family: &'static str) -> Result<ContentHash, StateError> {
    bytes.try_into().map_err(|_| StateError::Corrupt { column_family, detail: format!("content hash of {} bytes", bytes.len()) })
}

/// A product value ready to write: its raw content hash and the encoded value.
pub(super) type EncodedProduct = ([u8; CONTENT_HASH_BYTES], Vec<u8>);

/// Encodes a product value: `sha256(canonical content JSON) ‖ JSON {content, updated_by}`.
/// The content is serialised once; the hash prefix lets an upsert be compared with the stored
/// product without parsing it.
pub(super) fn encode_product_value(content: &ProductContent, updated_by: &SourcePosition) -> EncodedProduct {
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
pub(super) fn stored_content_hash(product_id: &str, value: &[u8]) -> Result<ContentHash, StateError> {
    value.get(..CONTENT_HASH_BYTES).and_then(|prefix| prefix.try_into().ok()).ok_or_else(|| StateError::Corrupt {
        column_family: PRODUCTS_CF,
        detail: format!("value of {product_id} is shorter than its hash"),
    })
}

pub(super) fn decode_product_value(value: &[u8]) -> Result<StoredProduct, StateError> {
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

pub(super) fn decode_offset_key(key: &[u8]) -> Result<(String, i32), StateError> {
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
pub(super) fn canonical_content(content: &ProductContent) -> (Vec<u8>, [u8; CONTENT_HASH_BYTES]) {
    let content_json = sonic_rs::to_vec(content).expect("ProductContent serialises");
    let hash = Sha256::digest(&content_json).into();
    (content_json, hash)
}
