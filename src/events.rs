//! Event types of the `products` and `query-events` topics, their JSON decoding and validation,
//! and the mapping of implicit interactions to graded relevance levels.
//!
//! Decoding is deliberately hand-written over [`serde_json::Value`] instead of a derived
//! `Deserialize`: every way an event can be wrong gets its own [`DeadLetterReason`] and a detail
//! naming the offending field, which is what a catalog team reading the dead-letter topic needs.
//! Unknown fields are accepted and ignored so producers can add fields before we read them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The only `schema_version` this build understands, for every topic.
pub const SCHEMA_VERSION: u64 = 1;

/// Graded relevance of a product to a query, ordered `Irrelevant < Complement < Substitute < Exact`
/// (the ESCI scale MERGE trains on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RelevanceLevel {
    /// `I`: the product does not satisfy the query.
    #[serde(rename = "I")]
    Irrelevant = 0,
    /// `C`: the product complements what the query asks for.
    #[serde(rename = "C")]
    Complement = 1,
    /// `S`: the product could substitute for what the query asks for.
    #[serde(rename = "S")]
    Substitute = 2,
    /// `E`: the product is exactly what the query asks for.
    #[serde(rename = "E")]
    Exact = 3,
}

impl RelevanceLevel {
    /// All levels, lowest first; the index of a level in this array is its `u8` value.
    pub const ALL: [RelevanceLevel; 4] = [
        RelevanceLevel::Irrelevant,
        RelevanceLevel::Complement,
        RelevanceLevel::Substitute,
        RelevanceLevel::Exact,
    ];

    /// Parses the one-letter ESCI label (`E`, `S`, `C`, `I`), case-sensitive.
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "E" => Some(Self::Exact),
            "S" => Some(Self::Substitute),
            "C" => Some(Self::Complement),
            "I" => Some(Self::Irrelevant),
            _ => None,
        }
    }

    /// The one-letter ESCI label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Exact => "E",
            Self::Substitute => "S",
            Self::Complement => "C",
            Self::Irrelevant => "I",
        }
    }

    /// The level's position in [`RelevanceLevel::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RelevanceLevel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.label())
    }
}

/// An implicit interaction logged by the search front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InteractionAction {
    /// The product was shown for the query.
    Impression,
    /// The product was clicked in the results of the query.
    Click,
    /// The product was added to the cart after the query.
    AddToCart,
    /// The product was bought after the query.
    Purchase,
}

impl InteractionAction {
    /// All actions, in funnel order; the index of an action here is its counter slot in state.
    pub const ALL: [InteractionAction; 4] = [
        InteractionAction::Impression,
        InteractionAction::Click,
        InteractionAction::AddToCart,
        InteractionAction::Purchase,
    ];

    /// Parses the wire name (`impression`, `click`, `add_to_cart`, `purchase`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "impression" => Some(Self::Impression),
            "click" => Some(Self::Click),
            "add_to_cart" => Some(Self::AddToCart),
            "purchase" => Some(Self::Purchase),
            _ => None,
        }
    }

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Impression => "impression",
            Self::Click => "click",
            Self::AddToCart => "add_to_cart",
            Self::Purchase => "purchase",
        }
    }

    /// The action's position in [`InteractionAction::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Impression => 0,
            Self::Click => 1,
            Self::AddToCart => 2,
            Self::Purchase => 3,
        }
    }
}

/// The relevance level an implicit action counts as; `None` means "count it, grade nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionGrade {
    /// The action is counted but contributes no relevance level.
    #[serde(rename = "none")]
    Ungraded,
    /// The action counts as this level.
    #[serde(untagged)]
    Level(RelevanceLevel),
}

/// How implicit actions map to relevance levels (config section `[relevance]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelevanceMapping {
    /// Level of an `impression` (default `none`: being shown says nothing about relevance).
    pub impression: ActionGrade,
    /// Level of a `click` (default `C`: weak evidence of relevance).
    pub click: ActionGrade,
    /// Level of an `add_to_cart` (default `S`).
    pub add_to_cart: ActionGrade,
    /// Level of a `purchase` (default `E`: the strongest behavioural evidence).
    pub purchase: ActionGrade,
}

impl Default for RelevanceMapping {
    fn default() -> Self {
        Self {
            impression: ActionGrade::Ungraded,
            click: ActionGrade::Level(RelevanceLevel::Complement),
            add_to_cart: ActionGrade::Level(RelevanceLevel::Substitute),
            purchase: ActionGrade::Level(RelevanceLevel::Exact),
        }
    }
}

impl RelevanceMapping {
    /// The level `action` counts as, or `None` where the action is configured as ungraded.
    pub fn level_of(&self, action: InteractionAction) -> Option<RelevanceLevel> {
        let grade = match action {
            InteractionAction::Impression => self.impression,
            InteractionAction::Click => self.click,
            InteractionAction::AddToCart => self.add_to_cart,
            InteractionAction::Purchase => self.purchase,
        };
        match grade {
            ActionGrade::Ungraded => None,
            ActionGrade::Level(level) => Some(level),
        }
    }
}

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

/// The fields of a `products` message, typed but not yet validated. Decoded straight from
/// the payload on the fast path, or extracted from a [`Value`] (with precise type errors) when
/// the fast path fails; either way [`validate_product`] applies the same rules.
#[derive(Debug, Default, Deserialize)]
struct ProductWire {
    schema_version: Option<u64>,
    product_id: Option<String>,
    op: Option<String>,
    locale: Option<String>,
    title: Option<String>,
    description: Option<String>,
    bullet_points: Option<Vec<String>>,
    brand: Option<String>,
    color: Option<String>,
    category: Option<String>,
    attributes: Option<BTreeMap<String, String>>,
    embedding: Option<Vec<f32>>,
    embedding_model: Option<String>,
}

/// The fields of a `query-events` message, borrowing from the payload where JSON allows.
#[derive(Debug, Default, Deserialize)]
struct QueryWire<'a> {
    schema_version: Option<u64>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    query: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    product_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    locale: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    label: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    action: Option<Cow<'a, str>>,
}

/// Deserializes an optional JSON string, borrowing it from the payload when it holds no escape
/// sequence and copying it only when it does. serde's own `Option<Cow<str>>` always copies,
/// `#[serde(borrow)]` or not (the attribute reaches a `Cow` field, not one inside an `Option`).
fn borrowed_optional_str<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct TextVisitor;
    impl<'de> serde::de::Visitor<'de> for TextVisitor {
        type Value = Cow<'de, str>;
        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a string")
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(text))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(text.to_owned()))
        }
        fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(text))
        }
    }
    struct OptionalTextVisitor;
    impl<'de> serde::de::Visitor<'de> for OptionalTextVisitor {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a string or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(TextVisitor).map(Some)
        }
    }
    deserializer.deserialize_option(OptionalTextVisitor)
}

/// Decodes one `products` message. A missing payload with a key is a tombstone (delete), as
/// Kafka's compaction convention has it; the key, when present, must equal `product_id`.
pub fn decode_product_event(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    limits: &ValidationLimits,
) -> Result<ProductEvent, InvalidEvent> {
    let Some(payload) = payload else {
        let Some(key) = key else {
            return Err(InvalidEvent::new(
                DeadLetterReason::EmptyPayload,
                "message has neither payload nor key",
            ));
        };
        let product_id = std::str::from_utf8(key)
            .map_err(|_| InvalidEvent::new(DeadLetterReason::InvalidValue, "tombstone key is not UTF-8"))?;
        validate_product_id(product_id, limits)?;
        return Ok(ProductEvent::Delete { product_id: product_id.to_owned() });
    };
    check_payload_size(payload, limits)?;
    let wire = match sonic_rs::from_slice::<ProductWire>(payload) {
        Ok(wire) => wire,
        Err(_) => product_wire_from_value(&parse_object(payload)?)?,
    };
    validate_product(wire, key, limits)
}

/// Decodes one `query-events` message: exactly one of `label` (explicit judgement) or `action`
/// (implicit interaction) must be present.
pub fn decode_query_event(payload: Option<&[u8]>, limits: &ValidationLimits) -> Result<QueryEvent, InvalidEvent> {
    let Some(payload) = payload else {
        return Err(InvalidEvent::new(DeadLetterReason::EmptyPayload, "query event without payload"));
    };
    check_payload_size(payload, limits)?;
    if let Ok(wire) = sonic_rs::from_slice::<QueryWire<'_>>(payload) {
        return validate_query(wire, limits);
    }
    let object = parse_object(payload)?;
    validate_query(query_wire_from_value(&object)?, limits)
}

fn validate_product(wire: ProductWire, key: Option<&[u8]>, limits: &ValidationLimits) -> Result<ProductEvent, InvalidEvent> {
    check_schema_version(wire.schema_version)?;
    let product_id = required("product_id", wire.product_id)?;
    validate_product_id(&product_id, limits)?;
    if let Some(key) = key {
        if key != product_id.as_bytes() {
            return Err(InvalidEvent::new(
                DeadLetterReason::KeyMismatch,
                format!("message key {:?} differs from product_id {product_id:?}", String::from_utf8_lossy(key)),
            ));
        }
    }
    match wire.op.as_deref().unwrap_or("upsert") {
        "delete" => return Ok(ProductEvent::Delete { product_id }),
        "upsert" => {}
        other => {
            return Err(InvalidEvent::new(
                DeadLetterReason::UnknownOperation,
                format!("op {other:?} is not \"upsert\" or \"delete\""),
            ))
        }
    }
    let title = required("title", wire.title)?;
    if title.trim().is_empty() {
        return Err(InvalidEvent::new(DeadLetterReason::InvalidValue, "field `title` is blank"));
    }
    check_length("title", &title, limits.max_title_bytes)?;
    let locale = wire.locale.as_deref().map(validate_locale).transpose()?;
    for (field, text) in [("description", &wire.description), ("brand", &wire.brand), ("color", &wire.color), ("category", &wire.category)] {
        if let Some(text) = text {
            check_length(field, text, limits.max_text_field_bytes)?;
        }
    }
    let bullet_points = wire.bullet_points.unwrap_or_default();
    check_item_count("bullet_points", bullet_points.len(), limits)?;
    for text in &bullet_points {
        check_length("bullet_points[]", text, limits.max_text_field_bytes)?;
    }
    let attributes = wire.attributes.unwrap_or_default();
    check_item_count("attributes", attributes.len(), limits)?;
    for (name, text) in &attributes {
        check_length("attributes{}", name, limits.max_text_field_bytes)?;
        check_length("attributes{}", text, limits.max_text_field_bytes)?;
    }
    let embedding = validate_embedding(wire.embedding, wire.embedding_model, limits)?;
    let content = ProductContent {
        locale,
        title,
        description: wire.description,
        bullet_points,
        brand: wire.brand,
        color: wire.color,
        category: wire.category,
        attributes,
    };
    Ok(ProductEvent::Upsert { product_id, content, embedding })
}

/// `embedding` and `embedding_model` come together. A vector of the configured model must have
/// its dimension (else the event is dead-lettered); a vector of another model is dropped (the
/// product is encoded as usual) and counted.
fn validate_embedding(
    vector: Option<Vec<f32>>,
    model: Option<String>,
    limits: &ValidationLimits,
) -> Result<Option<PrecomputedEmbedding>, InvalidEvent> {
    let (vector, model) = match (vector, model) {
        (None, None) => return Ok(None),
        (Some(vector), Some(model)) => (vector, model),
        (Some(_), None) => return Err(InvalidEvent::new(DeadLetterReason::MissingField, "field `embedding_model` is required with `embedding`")),
        (None, Some(_)) => return Err(InvalidEvent::new(DeadLetterReason::MissingField, "field `embedding` is required with `embedding_model`")),
    };
    if model.trim().is_empty() {
        return Err(InvalidEvent::new(DeadLetterReason::InvalidValue, "field `embedding_model` is blank"));
    }
    if vector.is_empty() {
        return Err(InvalidEvent::new(DeadLetterReason::InvalidValue, "field `embedding` is empty"));
    }
    if vector.len() > limits.max_embedding_dimension {
        return Err(InvalidEvent::new(
            DeadLetterReason::OversizeField,
            format!("field `embedding` has {} components, limit is {}", vector.len(), limits.max_embedding_dimension),
        ));
    }
    if let Some(index) = vector.iter().position(|value| !value.is_finite()) {
        return Err(InvalidEvent::new(DeadLetterReason::InvalidValue, format!("field `embedding[{index}]` is not a finite f32")));
    }
    let Some(expected) = &limits.expected_embedding else {
        return Ok(Some(PrecomputedEmbedding { model, vector }));
    };
    if model != expected.model_name {
        metrics::counter!(crate::metrics::PRECOMPUTED_EMBEDDINGS_TOTAL, "outcome" => "other_model").increment(1);
        tracing::debug!(%model, configured = %expected.model_name, "precomputed embedding of another model dropped");
        return Ok(None);
    }
    if vector.len() != expected.dimension {
        return Err(InvalidEvent::new(
            DeadLetterReason::EmbeddingDimensionMismatch,
            format!("`embedding` has {} components; model {model:?} produces {}", vector.len(), expected.dimension),
        ));
    }
    Ok(Some(PrecomputedEmbedding { model, vector }))
}

fn validate_query(wire: QueryWire<'_>, limits: &ValidationLimits) -> Result<QueryEvent, InvalidEvent> {
    check_schema_version(wire.schema_version)?;
    let raw_query = required("query", wire.query)?;
    check_length("query", &raw_query, limits.max_query_bytes)?;
    if raw_query.split_whitespace().next().is_none() {
        return Err(InvalidEvent::new(DeadLetterReason::InvalidValue, "field `query` is blank"));
    }
    let product_id = required("product_id", wire.product_id)?;
    validate_product_id(&product_id, limits)?;
    if let Some(locale) = wire.locale.as_deref() {
        check_locale(locale)?;
    }
    let locale = wire.locale.as_deref().unwrap_or("");
    let signal = match (wire.label, wire.action) {
        (Some(label), None) => {
            let level = RelevanceLevel::from_label(&label).ok_or_else(|| {
                InvalidEvent::new(DeadLetterReason::UnknownLabel, format!("label {label:?} is not one of E, S, C, I"))
            })?;
            QuerySignal::Judgement(level)
        }
        (None, Some(action)) => {
            let action = InteractionAction::from_name(&action).ok_or_else(|| {
                InvalidEvent::new(
                    DeadLetterReason::UnknownAction,
                    format!("action {action:?} is not one of impression, click, add_to_cart, purchase"),
                )
            })?;
            QuerySignal::Interaction(action)
        }
        (Some(_), Some(_)) => {
            return Err(InvalidEvent::new(
                DeadLetterReason::AmbiguousQueryEvent,
                "query event has both `label` and `action`; send one event per signal",
            ))
        }
        (None, None) => {
            return Err(InvalidEvent::new(
                DeadLetterReason::AmbiguousQueryEvent,
                "query event has neither `label` nor `action`",
            ))
        }
    };
    // One allocation for the three texts, in the pair key's layout: the lower-cased locale, the
    // normalised query (written in place, its length prefix patched after), the product id.
    let mut pair = String::with_capacity(4 + locale.len() + raw_query.len() + product_id.len());
    pair.push_str("\0\0");
    pair.push_str(locale);
    pair[2..].make_ascii_lowercase();
    pair.push_str("\0\0");
    let query_start = pair.len();
    push_normalized_query(&mut pair, &raw_query);
    let query_length = pair.len() - query_start;
    debug_assert!(query_length > 0, "a query with a word normalises to a non-empty one");
    let Ok(query_length) = u16::try_from(query_length) else {
        return Err(InvalidEvent::new(DeadLetterReason::OversizeField, format!("field `query` is {query_length} bytes once normalised, limit is 65535")));
    };
    pair.push_str(&product_id);
    let mut pair = pair.into_bytes();
    // `locale` is 2-16 ASCII bytes (or empty); both prefixes overwrite the NUL placeholders.
    pair[0..2].copy_from_slice(&(locale.len() as u16).to_be_bytes());
    pair[query_start - 2..query_start].copy_from_slice(&query_length.to_be_bytes());
    debug_assert!(split_judgement_pair(&pair).is_some());
    Ok(QueryEvent { pair, signal })
}

fn check_payload_size(payload: &[u8], limits: &ValidationLimits) -> Result<(), InvalidEvent> {
    if payload.len() > limits.max_event_bytes {
        return Err(InvalidEvent::new(
            DeadLetterReason::OversizeEvent,
            format!("payload is {} bytes, limit is {}", payload.len(), limits.max_event_bytes),
        ));
    }
    if payload.is_empty() {
        return Err(InvalidEvent::new(DeadLetterReason::EmptyPayload, "payload is empty"));
    }
    Ok(())
}

/// The slow path: parses the payload as a generic JSON object to say precisely what is wrong.
fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, InvalidEvent> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|error| InvalidEvent::new(DeadLetterReason::InvalidJson, error.to_string()))?;
    match value {
        Value::Object(object) => Ok(object),
        other => Err(InvalidEvent::new(
            DeadLetterReason::NotAnObject,
            format!("payload is a JSON {}, expected an object", json_type_name(&other)),
        )),
    }
}

fn product_wire_from_value(object: &Map<String, Value>) -> Result<ProductWire, InvalidEvent> {
    Ok(ProductWire {
        schema_version: optional_u64(object, "schema_version")?,
        product_id: optional_str(object, "product_id")?.map(str::to_owned),
        op: optional_str(object, "op")?.map(str::to_owned),
        locale: optional_str(object, "locale")?.map(str::to_owned),
        title: optional_str(object, "title")?.map(str::to_owned),
        description: optional_str(object, "description")?.map(str::to_owned),
        bullet_points: optional_string_list(object, "bullet_points")?,
        brand: optional_str(object, "brand")?.map(str::to_owned),
        color: optional_str(object, "color")?.map(str::to_owned),
        category: optional_str(object, "category")?.map(str::to_owned),
        attributes: optional_string_map(object, "attributes")?,
        embedding: optional_number_list(object, "embedding")?,
        embedding_model: optional_str(object, "embedding_model")?.map(str::to_owned),
    })
}

fn optional_number_list(object: &Map<String, Value>, field: &str) -> Result<Option<Vec<f32>>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| match item.as_f64() {
                Some(number) => Ok(number as f32),
                None => Err(wrong_type(&format!("{field}[{index}]"), "a number", item)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(wrong_type(field, "an array of numbers", other)),
    }
}

fn query_wire_from_value(object: &Map<String, Value>) -> Result<QueryWire<'_>, InvalidEvent> {
    Ok(QueryWire {
        schema_version: optional_u64(object, "schema_version")?,
        query: optional_str(object, "query")?.map(Cow::Borrowed),
        product_id: optional_str(object, "product_id")?.map(Cow::Borrowed),
        locale: optional_str(object, "locale")?.map(Cow::Borrowed),
        label: optional_str(object, "label")?.map(Cow::Borrowed),
        action: optional_str(object, "action")?.map(Cow::Borrowed),
    })
}

fn check_schema_version(version: Option<u64>) -> Result<(), InvalidEvent> {
    match version {
        None => Err(InvalidEvent::new(DeadLetterReason::MissingField, "field `schema_version` is required")),
        Some(SCHEMA_VERSION) => Ok(()),
        Some(version) => Err(InvalidEvent::new(
            DeadLetterReason::UnsupportedSchemaVersion,
            format!("schema_version {version} is not supported (this build reads {SCHEMA_VERSION})"),
        )),
    }
}

fn required<T>(field: &str, value: Option<T>) -> Result<T, InvalidEvent> {
    value.ok_or_else(|| InvalidEvent::new(DeadLetterReason::MissingField, format!("field `{field}` is required")))
}

fn wrong_type(field: &str, expected: &str, value: &Value) -> InvalidEvent {
    InvalidEvent::new(
        DeadLetterReason::WrongType,
        format!("field `{field}` must be {expected}, got {}", json_type_name(value)),
    )
}

fn optional_u64(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| wrong_type(field, "a non-negative integer", value)),
    }
}

fn optional_str<'v>(object: &'v Map<String, Value>, field: &str) -> Result<Option<&'v str>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

fn optional_string_list(object: &Map<String, Value>, field: &str) -> Result<Option<Vec<String>>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text.clone()),
                other => Err(wrong_type(&format!("{field}[{index}]"), "a string", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(wrong_type(field, "an array of strings", other)),
    }
}

fn optional_string_map(object: &Map<String, Value>, field: &str) -> Result<Option<BTreeMap<String, String>>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(entries)) => entries
            .iter()
            .map(|(name, value)| match value {
                Value::String(text) => Ok((name.clone(), text.clone())),
                other => Err(wrong_type(&format!("{field}.{name}"), "a string", other)),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some),
        Some(other) => Err(wrong_type(field, "an object of strings", other)),
    }
}

fn validate_locale(locale: &str) -> Result<String, InvalidEvent> {
    check_locale(locale)?;
    Ok(locale.to_ascii_lowercase())
}

fn check_locale(locale: &str) -> Result<(), InvalidEvent> {
    let well_formed = (2..=16).contains(&locale.len())
        && locale.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if !well_formed {
        return Err(InvalidEvent::new(
            DeadLetterReason::InvalidValue,
            format!("field `locale` {locale:?} must be 2-16 ASCII letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

fn check_item_count(field: &str, count: usize, limits: &ValidationLimits) -> Result<(), InvalidEvent> {
    if count <= limits.max_list_items {
        return Ok(());
    }
    Err(InvalidEvent::new(
        DeadLetterReason::OversizeField,
        format!("field `{field}` has {count} items, limit is {}", limits.max_list_items),
    ))
}

fn check_length(field: &str, text: &str, limit: usize) -> Result<(), InvalidEvent> {
    if text.len() <= limit {
        return Ok(());
    }
    Err(InvalidEvent::new(
        DeadLetterReason::OversizeField,
        format!("field `{field}` is {} bytes, limit is {limit}", text.len()),
    ))
}

/// Product ids are 1..=`max_product_id_bytes` bytes of printable ASCII without spaces, so they
/// can be Kafka keys, RocksDB key parts and log fields without escaping.
fn validate_product_id(product_id: &str, limits: &ValidationLimits) -> Result<(), InvalidEvent> {
    if product_id.is_empty() {
        return Err(InvalidEvent::new(DeadLetterReason::InvalidValue, "field `product_id` is empty"));
    }
    if product_id.len() > limits.max_product_id_bytes {
        return Err(InvalidEvent::new(
            DeadLetterReason::OversizeField,
            format!("field `product_id` is {} bytes, limit is {}", product_id.len(), limits.max_product_id_bytes),
        ));
    }
    if let Some(bad) = product_id.chars().find(|character| !character.is_ascii_graphic()) {
        return Err(InvalidEvent::new(
            DeadLetterReason::InvalidValue,
            format!("field `product_id` contains {bad:?}; only printable ASCII without spaces is allowed"),
        ));
    }
    Ok(())
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Encodes a product upsert as the JSON the `products` topic carries (used by `produce`, the
/// synthetic catalog and tests).
pub fn encode_product_upsert(product_id: &str, content: &ProductContent) -> Vec<u8> {
    let mut object = match serde_json::to_value(content) {
        Ok(Value::Object(object)) => object,
        _ => unreachable!("ProductContent always serialises to an object"),
    };
    object.insert("schema_version".into(), Value::from(SCHEMA_VERSION));
    object.insert("op".into(), Value::from("upsert"));
    object.insert("product_id".into(), Value::from(product_id));
    serde_json::to_vec(&object).expect("a JSON map serialises")
}

/// Encodes an explicit product delete for the `products` topic.
pub fn encode_product_delete(product_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schema_version": SCHEMA_VERSION, "op": "delete", "product_id": product_id,
    }))
    .expect("a JSON map serialises")
}

/// Encodes a query event (judgement or interaction) for the `query-events` topic.
pub fn encode_query_event(query: &str, locale: Option<&str>, product_id: &str, signal: QuerySignal) -> Vec<u8> {
    let mut object = serde_json::json!({
        "schema_version": SCHEMA_VERSION, "query": query, "product_id": product_id,
    });
    if let Some(locale) = locale {
        object["locale"] = Value::from(locale);
    }
    match signal {
        QuerySignal::Judgement(level) => object["label"] = Value::from(level.label()),
        QuerySignal::Interaction(action) => object["action"] = Value::from(action.name()),
    }
    serde_json::to_vec(&object).expect("a JSON map serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ValidationLimits {
        ValidationLimits::default()
    }

    #[test]
    fn query_wire_borrows_plain_strings_and_copies_only_escaped_ones() {
        let payload = br#"{"schema_version":1,"query":"red \"shoes\"","product_id":"P1","locale":null,"action":"click"}"#;
        // Both parsers: sonic-rs on the fast path, serde_json on the slow path.
        let from_sonic: QueryWire<'_> = sonic_rs::from_slice(payload).unwrap();
        let from_serde_json: QueryWire<'_> = serde_json::from_slice(payload).unwrap();
        for wire in [from_sonic, from_serde_json] {
            assert!(matches!(wire.product_id, Some(Cow::Borrowed("P1"))), "{:?}", wire.product_id);
            assert!(matches!(wire.action, Some(Cow::Borrowed("click"))), "{:?}", wire.action);
            assert_eq!(wire.query.as_deref(), Some("red \"shoes\""));
            assert!(matches!(wire.query, Some(Cow::Owned(_))), "an escaped string cannot be borrowed");
            assert_eq!((wire.locale, wire.label), (None, None), "null and absent are both None");
        }
        let number: Result<QueryWire<'_>, _> = sonic_rs::from_slice(br#"{"schema_version":1,"query":7}"#);
        assert!(number.is_err(), "a number is not a string");
    }

    #[test]
    fn product_upsert_round_trips_through_the_wire_format() {
        let content = ProductContent {
            locale: Some("us".into()),
            title: "Cast iron pan".into(),
            description: Some("<b>Heavy</b> pan".into()),
            bullet_points: vec!["oven safe".into(), "12 inch".into()],
            brand: Some("Lodge".into()),
            color: None,
            category: Some("Kitchen > Pans".into()),
            attributes: BTreeMap::from([("size".into(), "12in".into())]),
        };
        let bytes = encode_product_upsert("P1", &content);
        let decoded = decode_product_event(Some(b"P1"), Some(&bytes), &limits()).unwrap();
        assert_eq!(decoded, ProductEvent::Upsert { product_id: "P1".into(), content, embedding: None });
    }

    #[test]
    fn tombstone_and_explicit_delete_both_delete() {
        let tombstone = decode_product_event(Some(b"P9"), None, &limits()).unwrap();
        assert_eq!(tombstone, ProductEvent::Delete { product_id: "P9".into() });
        let explicit = decode_product_event(None, Some(&encode_product_delete("P9")), &limits()).unwrap();
        assert_eq!(explicit, tombstone);
    }

    #[test]
    fn each_malformation_has_its_own_reason() {
        let cases: Vec<(&[u8], DeadLetterReason)> = vec![
            (b"{not json", DeadLetterReason::InvalidJson),
            (b"[1,2]", DeadLetterReason::NotAnObject),
            (br#"{"product_id":"P1","title":"t"}"#, DeadLetterReason::MissingField),
            (br#"{"schema_version":2,"product_id":"P1","title":"t"}"#, DeadLetterReason::UnsupportedSchemaVersion),
            (br#"{"schema_version":"1","product_id":"P1","title":"t"}"#, DeadLetterReason::WrongType),
            (br#"{"schema_version":1,"product_id":7,"title":"t"}"#, DeadLetterReason::WrongType),
            (br#"{"schema_version":1,"product_id":"P1"}"#, DeadLetterReason::MissingField),
            (br#"{"schema_version":1,"product_id":"P 1","title":"t"}"#, DeadLetterReason::InvalidValue),
            (br#"{"schema_version":1,"product_id":"P1","title":"t","op":"merge"}"#, DeadLetterReason::UnknownOperation),
            (br#"{"schema_version":1,"product_id":"P1","title":"t","bullet_points":"x"}"#, DeadLetterReason::WrongType),
        ];
        for (payload, expected) in cases {
            let error = decode_product_event(None, Some(payload), &limits()).unwrap_err();
            assert_eq!(error.reason, expected, "payload {}", String::from_utf8_lossy(payload));
        }
    }

    /// The typed fast path parses with sonic-rs, the precise slow path with serde_json: both
    /// must accept and reject the same payloads, or a payload serde_json rejects could be stored.
    #[test]
    fn fast_path_accepts_exactly_what_serde_json_accepts() {
        let payloads: [&[u8]; 14] = [
            br#"{"schema_version":1,"query":"red shoes","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"caf\u00e9 \"x\"","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"\ud800","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"\udc00\ud800","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"a","product_id":"P1","label":"E"} trailing"#,
            br#"{"schema_version":1,"query":"a","query":"b","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"a","product_id":"P1","label":"E",}"#,
            br#"{"schema_version":1.0,"query":"a","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":-1,"query":"a","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"tab	inside","product_id":"P1","label":"E"}"#,
            br#"{"schema_version":1,"query":"a","product_id":"P1","label":"E","extra":{"deep":[1,2,{"x":null}]}}"#,
            b"{\"schema_version\":1,\"query\":\"\xff\",\"product_id\":\"P1\",\"label\":\"E\"}",
            br#"{"schema_version":1,"query":null,"product_id":"P1","label":"E"}"#,
            br#"  {"schema_version":1,"query":"a","product_id":"P1","action":"click"}  "#,
        ];
        for payload in payloads {
            // sonic-rs checks the whole input is UTF-8 first; serde_json's typed decode skips
            // unknown fields unchecked. Such a payload is not JSON, and the slow path names it.
            let is_utf8 = std::str::from_utf8(payload).is_ok();
            let reference = serde_json::from_slice::<QueryWire<'_>>(payload).map(|wire| format!("{wire:?}"));
            let fast = sonic_rs::from_slice::<QueryWire<'_>>(payload).map(|wire| format!("{wire:?}"));
            assert_eq!(fast.ok(), reference.ok().filter(|_| is_utf8), "query wire of {}", String::from_utf8_lossy(payload));
            let reference = serde_json::from_slice::<ProductWire>(payload).map(|wire| format!("{wire:?}"));
            let fast = sonic_rs::from_slice::<ProductWire>(payload).map(|wire| format!("{wire:?}"));
            assert_eq!(fast.ok(), reference.ok().filter(|_| is_utf8), "product wire of {}", String::from_utf8_lossy(payload));
        }
        let invalid_utf8 = b"{\"schema_version\":1,\"product_id\":\"P1\",\"title\":\"t\",\"note\":\"\xff\"}";
        let error = decode_product_event(None, Some(invalid_utf8), &limits()).unwrap_err();
        assert_eq!(error.reason, DeadLetterReason::InvalidJson);
    }

    #[test]
    fn oversize_fields_and_events_are_rejected() {
        let small = ValidationLimits { max_event_bytes: 200, max_title_bytes: 10, ..limits() };
        let long_title = br#"{"schema_version":1,"product_id":"P1","title":"a title that is too long"}"#;
        assert_eq!(decode_product_event(None, Some(long_title), &small).unwrap_err().reason, DeadLetterReason::OversizeField);
        let huge = format!(r#"{{"schema_version":1,"product_id":"P1","title":"t","description":"{}"}}"#, "x".repeat(300));
        assert_eq!(decode_product_event(None, Some(huge.as_bytes()), &small).unwrap_err().reason, DeadLetterReason::OversizeEvent);
    }

    #[test]
    fn key_must_match_product_id() {
        let payload = br#"{"schema_version":1,"product_id":"P1","title":"t"}"#;
        let error = decode_product_event(Some(b"P2"), Some(payload), &limits()).unwrap_err();
        assert_eq!(error.reason, DeadLetterReason::KeyMismatch);
    }

    #[test]
    fn query_events_decode_labels_and_actions() {
        let judgement = decode_query_event(Some(br#"{"schema_version":1,"query":"  Red  Shoes ","product_id":"P1","label":"S","locale":"US"}"#), &limits()).unwrap();
        assert_eq!(judgement.query(), "red shoes");
        assert_eq!(judgement.locale(), Some("us"));
        assert_eq!(judgement.product_id(), "P1");
        assert_eq!(judgement.pair_key(), encode_judgement_pair("us", "red shoes", "P1"));
        assert_eq!(judgement.signal, QuerySignal::Judgement(RelevanceLevel::Substitute));
        let click = decode_query_event(Some(br#"{"schema_version":1,"query":"q","product_id":"P1","action":"add_to_cart"}"#), &limits()).unwrap();
        assert_eq!(click.signal, QuerySignal::Interaction(InteractionAction::AddToCart));
    }

    #[test]
    fn a_query_events_texts_live_in_its_pair_key() {
        let payload = "{\"schema_version\":1,\"query\":\" ÉCHARPE\\tHomme \",\"product_id\":\"B0-1\",\"action\":\"click\"}";
        let event = decode_query_event(Some(payload.as_bytes()), &limits()).unwrap();
        assert_eq!((event.locale(), event.query(), event.product_id()), (None, "écharpe homme", "B0-1"));
        assert_eq!(event.pair_key(), encode_judgement_pair("", "écharpe homme", "B0-1"));
        let built = QueryEvent::new("écharpe homme", None, "B0-1", QuerySignal::Interaction(InteractionAction::Click));
        assert_eq!(built, event);
        let with_locale = QueryEvent::new("q", Some("fr-ca"), "P", QuerySignal::Judgement(RelevanceLevel::Exact));
        assert_eq!(split_judgement_pair(with_locale.pair_key()), Some(("fr-ca", "q", "P")));
        assert_eq!(split_judgement_pair(&[0, 5, b'u']), None, "a length prefix past the end");
    }

    #[test]
    fn query_event_errors_are_classified() {
        let cases: Vec<(&[u8], DeadLetterReason)> = vec![
            (br#"{"schema_version":1,"query":"q","product_id":"P1","label":"X"}"#, DeadLetterReason::UnknownLabel),
            (br#"{"schema_version":1,"query":"q","product_id":"P1","action":"hover"}"#, DeadLetterReason::UnknownAction),
            (br#"{"schema_version":1,"query":"q","product_id":"P1","label":"E","action":"click"}"#, DeadLetterReason::AmbiguousQueryEvent),
            (br#"{"schema_version":1,"query":"q","product_id":"P1"}"#, DeadLetterReason::AmbiguousQueryEvent),
            (br#"{"schema_version":1,"query":"   ","product_id":"P1","label":"E"}"#, DeadLetterReason::InvalidValue),
            (br#"{"schema_version":1,"product_id":"P1","label":"E"}"#, DeadLetterReason::MissingField),
            (b"", DeadLetterReason::EmptyPayload),
        ];
        for (payload, expected) in cases {
            let error = decode_query_event(Some(payload), &limits()).unwrap_err();
            assert_eq!(error.reason, expected, "payload {}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn default_mapping_grades_the_purchase_funnel() {
        let mapping = RelevanceMapping::default();
        assert_eq!(mapping.level_of(InteractionAction::Impression), None);
        assert_eq!(mapping.level_of(InteractionAction::Click), Some(RelevanceLevel::Complement));
        assert_eq!(mapping.level_of(InteractionAction::AddToCart), Some(RelevanceLevel::Substitute));
        assert_eq!(mapping.level_of(InteractionAction::Purchase), Some(RelevanceLevel::Exact));
        let parsed: RelevanceMapping =
            toml::from_str("impression = \"I\"\nclick = \"none\"\nadd_to_cart = \"E\"\npurchase = \"E\"").unwrap();
        assert_eq!(parsed.level_of(InteractionAction::Impression), Some(RelevanceLevel::Irrelevant));
        assert_eq!(parsed.level_of(InteractionAction::Click), None);
    }

    #[test]
    fn queries_are_lower_cased_and_whitespace_collapsed() {
        assert_eq!(normalize_query("  Red \t Shoes\n"), "red shoes");
        assert_eq!(normalize_query("ÉCHARPE  Homme"), "écharpe homme");
        assert_eq!(normalize_query("エプソン インク"), "エプソン インク");
        assert_eq!(normalize_query("   "), "");
    }

    #[test]
    fn relevance_levels_are_ordered() {
        assert!(RelevanceLevel::Exact > RelevanceLevel::Substitute);
        assert!(RelevanceLevel::Substitute > RelevanceLevel::Complement);
        assert!(RelevanceLevel::Complement > RelevanceLevel::Irrelevant);
        for reason in DeadLetterReason::ALL {
            assert_eq!(DeadLetterReason::from_name(reason.as_str()), Some(reason));
        }
    }
}
