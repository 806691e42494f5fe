//! The events stage: types of the `products` and `query-events` topics, their decoding and
//! validation, graded relevance and the mapping of implicit interactions to it, and the
//! producer-side encoders.
//!
//! - [`decode`]: typed fast path and precise slow path; every reject gets its own
//!   [`DeadLetterReason`] and a detail naming the offending field, which is what a catalog team
//!   reading the dead-letter topic needs. Unknown fields are accepted and ignored so producers
//!   can add fields before we read them.
//! - [`relevance`]: E/S/C/I levels, interaction actions and the configurable mapping.
//! - [`encode`]: the wire JSON of product upserts, deletes and query events.
//!
//! Owns the wire format (`topics/*/schema.json` documents it). Pure functions over bytes: calls
//! no other stage, touches no Kafka client, no state and no model.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

mod decode;
pub use decode::{decode_product_event, decode_query_event};
mod encode;
pub use encode::{encode_product_upsert, encode_product_delete, encode_query_event};
mod relevance;
pub use relevance::{RelevanceLevel, InteractionAction, ActionGrade, RelevanceMapping};

/// The only `schema_version` this build understands, for every topic.
pub const SCHEMA_VERSION: u64 = 1;

/// Size limits applied while validating events (config section `[validation]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationLimits {
    /// Largest accepted message payload, in bytes.
    pub max_event_bytes: usize,
    /// Longest accepted `product_id`, in bytes.
    pub max_product_id_bytes: usize,
    /// Longest accepted `title`, in bytes.
    pub max_title_bytes: usize,
    /// Longest accepted free-text field (`description`, each bullet point, `brand`, …), in bytes.
    pub max_text_field_bytes: usize,
    /// Most bullet points or attributes accepted on one product.
    pub max_list_items: usize,
    /// Longest accepted `query`, in bytes.
    pub max_query_bytes: usize,
    /// Most components accepted in a precomputed `embedding`.
    pub max_embedding_dimension: usize,
    /// The model and dimension precomputed vectors are checked against: set at start-up from
    /// the configured encoder, not from the config file.
    #[serde(skip)]
    pub expected_embedding: Option<ExpectedEmbedding>,
}

/// The configured encoder's model name and dimension, for checking precomputed vectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedEmbedding {
    /// `embedding_model` value whose vectors are used.
    pub model_name: String,
    /// Their required length.
    pub dimension: usize,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1024 * 1024,
            max_product_id_bytes: 128,
            max_title_bytes: 2048,
            max_text_field_bytes: 64 * 1024,
            max_list_items: 256,
            max_query_bytes: 1024,
            max_embedding_dimension: 4096,
            expected_embedding: None,
        }
    }
}

/// Why an event was sent to the dead-letter topic. The snake_case name is the `reason` header
/// value and the `reason` label of `merge_indexer_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// The payload is not valid UTF-8 JSON.
    InvalidJson,
    /// The payload is JSON but not an object.
    NotAnObject,
    /// A required field is absent (or `null`).
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A field is empty or malformed (e.g. a product id with forbidden characters).
    InvalidValue,
    /// `schema_version` is not one this build understands.
    UnsupportedSchemaVersion,
    /// The whole payload is larger than `max_event_bytes`.
    OversizeEvent,
    /// A field is longer than its limit.
    OversizeField,
    /// `label` is not one of `E`, `S`, `C`, `I`.
    UnknownLabel,
    /// `action` is not one of `impression`, `click`, `add_to_cart`, `purchase`.
    UnknownAction,
    /// `op` is not `upsert` or `delete`.
    UnknownOperation,
    /// A query event carries both `label` and `action`, or neither.
    AmbiguousQueryEvent,
    /// The Kafka key of a product message differs from its `product_id`.
    KeyMismatch,
    /// A message without payload where one is required.
    EmptyPayload,
    /// A precomputed `embedding` for the configured `embedding_model` has the wrong dimension.
    EmbeddingDimensionMismatch,
}

impl DeadLetterReason {
    /// Every reason, for pre-registering metrics and documenting the topic.
    pub const ALL: [DeadLetterReason; 15] = [
        Self::InvalidJson,
        Self::NotAnObject,
        Self::MissingField,
        Self::WrongType,
        Self::InvalidValue,
        Self::UnsupportedSchemaVersion,
        Self::OversizeEvent,
        Self::OversizeField,
        Self::UnknownLabel,
        Self::UnknownAction,
        Self::UnknownOperation,
        Self::AmbiguousQueryEvent,
        Self::KeyMismatch,
        Self::EmptyPayload,
        Self::EmbeddingDimensionMismatch,
    ];

    /// The snake_case name used in headers, metrics and state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::InvalidValue => "invalid_value",
            Self::UnsupportedSchemaVersion => "unsupported_schema_version",
            Self::OversizeEvent => "oversize_event",
            Self::OversizeField => "oversize_field",
            Self::UnknownLabel => "unknown_label",
            Self::UnknownAction => "unknown_action",
            Self::UnknownOperation => "unknown_operation",
            Self::AmbiguousQueryEvent => "ambiguous_query_event",
            Self::KeyMismatch => "key_mismatch",
            Self::EmptyPayload => "empty_payload",
            Self::EmbeddingDimensionMismatch => "embedding_dimension_mismatch",
        }
    }

    /// Parses [`DeadLetterReason::as_str`] back.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A rejected event: the class of the problem and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct InvalidEvent {
    /// The class of problem (header `reason` on the dead letter).
    pub reason: DeadLetterReason,
    /// What exactly is wrong, naming the field (header `detail` on the dead letter).
    pub detail: String,
}

impl InvalidEvent {
    fn new(reason: DeadLetterReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

/// The content of a product, as upserted on the `products` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductContent {
    /// Locale of the listing (`us`, `es`, `jp`, …), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// Product title (required, non-empty).
    pub title: String,
    /// Long description; may contain HTML, cleaned at encoding time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Bullet points, in display order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bullet_points: Vec<String>,
    /// Brand name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    /// Colour name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    /// Category path, e.g. `Home > Kitchen > Pans`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Free-form attributes (size, material, …), sorted by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl ProductContent {
    /// A product with only a title; every optional field empty.
    pub fn with_title(title: impl Into<String>) -> Self {
        Self {
            locale: None,
            title: title.into(),
            description: None,
            bullet_points: Vec::new(),
            brand: None,
            color: None,
            category: None,
            attributes: BTreeMap::new(),
        }
    }
}

/// A vector computed by the producer, carried on a product upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecomputedEmbedding {
    /// The model that computed it (`embedding_model`).
    pub model: String,
    /// The vector.
    pub vector: Vec<f32>,
}

/// A decoded `products` message.
#[derive(Debug, Clone, PartialEq)]
pub enum ProductEvent {
    /// Insert or replace the product.
    Upsert {
        /// Catalog id of the product.
        product_id: String,
        /// The product's new content.
        content: ProductContent,
        /// A precomputed vector of the configured encoder model, used instead of encoding
        /// (vectors of other models are dropped at decoding).
        embedding: Option<PrecomputedEmbedding>,
    },
    /// Remove the product (explicit `op: delete`, or a Kafka tombstone).
    Delete {
        /// Catalog id of the product.
        product_id: String,
    },
}

impl ProductEvent {
    /// The product this event is about.
    pub fn product_id(&self) -> &str {
        match self {
            Self::Upsert { product_id, .. } | Self::Delete { product_id } => product_id,
        }
    }
}

/// What a query event says about a (query, product) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySignal {
    /// An explicit graded judgement.
    Judgement(RelevanceLevel),
    /// An implicit interaction.
    Interaction(InteractionAction),
}

/// A decoded `query-events` message. Its three texts share one allocation laid out as the
/// judgement pair key ([`encode_judgement_pair`]), which the state uses as is: decoding a query
/// event allocates once, and preparing a batch borrows the key instead of building it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryEvent {
    /// `u16 BE len(locale) ‖ locale ‖ u16 BE len(query) ‖ query ‖ product_id`, every text valid
    /// UTF-8 (checked at construction).
    pair: Vec<u8>,
    /// The judgement or interaction.
    pub signal: QuerySignal,
}

impl QueryEvent {
    /// A query event from its parts: `query` as normalised by [`normalize_query`], `locale` as
    /// validated (lower-case), `None` or empty when the event gave none.
    ///
    /// # Panics
    /// When `locale` or `query` is longer than 65,535 bytes (decoding rejects those first).
    pub fn new(query: &str, locale: Option<&str>, product_id: &str, signal: QuerySignal) -> Self {
        Self { pair: encode_judgement_pair(locale.unwrap_or(""), query, product_id), signal }
    }

    /// The normalised query.
    pub fn query(&self) -> &str {
        let (_, query, _) = self.parts();
        query
    }

    /// The locale, if the event gave one.
    pub fn locale(&self) -> Option<&str> {
        let (locale, _, _) = self.parts();
        Some(locale).filter(|locale| !locale.is_empty())
    }

    /// The product judged or interacted with.
    pub fn product_id(&self) -> &str {
        let (_, _, product_id) = self.parts();
        product_id
    }

    /// The (locale, query, product) pair encoded as [`encode_judgement_pair`] does: the key of
    /// the pair's aggregate in the state.
    pub fn pair_key(&self) -> &[u8] {
        &self.pair
    }

    fn parts(&self) -> (&str, &str, &str) {
        let parts = split_judgement_pair(&self.pair);
        debug_assert!(parts.is_some(), "a QueryEvent's pair is well formed by construction");
        parts.unwrap_or_default()
    }
}

/// Encodes a (locale, query, product) pair so that all products of one (locale, query) sort
/// together: `u16 BE len(locale) ‖ locale ‖ u16 BE len(query) ‖ query ‖ product_id`. The
/// state's judgement keys use this layout.
///
/// # Panics
/// When `locale` or `query` is longer than 65,535 bytes.
pub fn encode_judgement_pair(locale: &str, query: &str, product_id: &str) -> Vec<u8> {
    let mut pair = Vec::with_capacity(4 + locale.len() + query.len() + product_id.len());
    push_prefixed(&mut pair, locale);
    push_prefixed(&mut pair, query);
    pair.extend_from_slice(product_id.as_bytes());
    pair
}

/// Splits an [`encode_judgement_pair`] key into (locale, query, product id); `None` when it is
/// not one.
pub fn split_judgement_pair(pair: &[u8]) -> Option<(&str, &str, &str)> {
    let take_prefixed = |bytes: &[u8]| -> Option<(usize, usize)> {
        let length = u16::from_be_bytes(bytes.get(0..2)?.try_into().ok()?) as usize;
        (bytes.len() >= 2 + length).then_some((2, 2 + length))
    };
    let (locale_start, locale_end) = take_prefixed(pair)?;
    let rest = &pair[locale_end..];
    let (query_start, query_end) = take_prefixed(rest)?;
    let locale = std::str::from_utf8(&pair[locale_start..locale_end]).ok()?;
    let query = std::str::from_utf8(&rest[query_start..query_end]).ok()?;
    let product_id = std::str::from_utf8(&rest[query_end..]).ok()?;
    Some((locale, query, product_id))
}

fn push_prefixed(buffer: &mut Vec<u8>, text: &str) {
    let length = u16::try_from(text.len()).expect("pair texts are at most 65,535 bytes");
    buffer.extend_from_slice(&length.to_be_bytes());
    buffer.extend_from_slice(text.as_bytes());
}

/// Lower-cases a query and collapses its whitespace, so `"  Red  Shoes "` and `"red shoes"` are
/// one query (the same normalisation as the ESCI `query_id`).
pub fn normalize_query(query: &str) -> String {
    let mut normalized = String::with_capacity(query.len());
    push_normalized_query(&mut normalized, query);
    normalized
}

/// Appends [`normalize_query`]`(query)` to `normalized`.
fn push_normalized_query(normalized: &mut String, query: &str) {
    let start = normalized.len();
    for word in query.split_whitespace() {
        if normalized.len() > start {
            normalized.push(' ');
        }
        if word.is_ascii() {
            normalized.extend(word.chars().map(|character| character.to_ascii_lowercase()));
        } else {
            normalized.push_str(&word.to_lowercase());
        }
    }
}

#[cfg(test)]
mod tests;
