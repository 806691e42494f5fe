//! Decoding and validation of `products` and `query-events` messages: a typed fast path
//! (sonic-rs, borrowing plain strings) and a precise slow path over `serde_json::Value` that
//! names the reason and the offending field of every reject.

use super::*;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The fields of a `products` message, typed but not yet validated. Decoded straight from
/// the payload on the fast path, or extracted from a [`Value`] (with precise type errors) when
/// the fast path fails; either way [`validate_product`] applies the same rules.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ProductWire {
    pub(super) schema_version: Option<u64>,
    pub(super) product_id: Option<String>,
    pub(super) op: Option<String>,
    pub(super) locale: Option<String>,
    pub(super) title: Option<String>,
    pub(super) description: Option<String>,
    pub(super) bullet_points: Option<Vec<String>>,
    pub(super) brand: Option<String>,
    pub(super) color: Option<String>,
    pub(super) category: Option<String>,
    pub(super) attributes: Option<BTreeMap<String, String>>,
    pub(super) embedding: Option<Vec<f32>>,
    pub(super) embedding_model: Option<String>,
}

/// The fields of a `query-events` message, borrowing from the payload where JSON allows.
#[derive(Debug, Default, Deserialize)]
pub(super) struct QueryWire<'a> {
    pub(super) schema_version: Option<u64>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    pub(super) query: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    pub(super) product_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    pub(super) locale: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    pub(super) label: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_optional_str")]
    pub(super) action: Option<Cow<'a, str>>,
}

/// Deserializes an optional JSON string, borrowing it from the payload when it holds no escape
/// sequence and copying it only when it does. serde's own `Option<Cow<str>>` always copies,
/// `#[serde(borrow)]` or not (the attribute reaches a `Cow` field, not one inside an `Option`).
pub(super) fn borrowed_optional_str<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
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

pub(super) fn validate_product(wire: ProductWire, key: Option<&[u8]>, limits: &ValidationLimits) -> Result<ProductEvent, InvalidEvent> {
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
pub(super) fn validate_embedding(
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

pub(super) fn validate_query(wire: QueryWire<'_>, limits: &ValidationLimits) -> Result<QueryEvent, InvalidEvent> {
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

pub(super) fn check_payload_size(payload: &[u8], limits: &ValidationLimits) -> Result<(), InvalidEvent> {
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
pub(super) fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, InvalidEvent> {
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

pub(super) fn product_wire_from_value(object: &Map<String, Value>) -> Result<ProductWire, InvalidEvent> {
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

pub(super) fn optional_number_list(object: &Map<String, Value>, field: &str) -> Result<Option<Vec<f32>>, InvalidEvent> {
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

pub(super) fn query_wire_from_value(object: &Map<String, Value>) -> Result<QueryWire<'_>, InvalidEvent> {
    Ok(QueryWire {
        schema_version: optional_u64(object, "schema_version")?,
        query: optional_str(object, "query")?.map(Cow::Borrowed),
        product_id: optional_str(object, "product_id")?.map(Cow::Borrowed),
        locale: optional_str(object, "locale")?.map(Cow::Borrowed),
        label: optional_str(object, "label")?.map(Cow::Borrowed),
        action: optional_str(object, "action")?.map(Cow::Borrowed),
    })
}

pub(super) fn check_schema_version(version: Option<u64>) -> Result<(), InvalidEvent> {
    match version {
        None => Err(InvalidEvent::new(DeadLetterReason::MissingField, "field `schema_version` is required")),
        Some(SCHEMA_VERSION) => Ok(()),
        Some(version) => Err(InvalidEvent::new(
            DeadLetterReason::UnsupportedSchemaVersion,
            format!("schema_version {version} is not supported (this build reads {SCHEMA_VERSION})"),
        )),
    }
}

pub(super) fn required<T>(field: &str, value: Option<T>) -> Result<T, InvalidEvent> {
    value.ok_or_else(|| InvalidEvent::new(DeadLetterReason::MissingField, format!("field `{field}` is required")))
}

pub(super) fn wrong_type(field: &str, expected: &str, value: &Value) -> InvalidEvent {
    InvalidEvent::new(
        DeadLetterReason::WrongType,
        format!("field `{field}` must be {expected}, got {}", json_type_name(value)),
    )
}

pub(super) fn optional_u64(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| wrong_type(field, "a non-negative integer", value)),
    }
}

pub(super) fn optional_str<'v>(object: &'v Map<String, Value>, field: &str) -> Result<Option<&'v str>, InvalidEvent> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

pub(super) fn optional_string_list(object: &Map<String, Value>, field: &str) -> Result<Option<Vec<String>>, InvalidEvent> {
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

pub(super) fn optional_string_map(object: &Map<String, Value>, field: &str) -> Result<Option<BTreeMap<String, String>>, InvalidEvent> {
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

pub(super) fn validate_locale(locale: &str) -> Result<String, InvalidEvent> {
    check_locale(locale)?;
    Ok(locale.to_ascii_lowercase())
}

pub(super) fn check_locale(locale: &str) -> Result<(), InvalidEvent> {
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

pub(super) fn check_item_count(field: &str, count: usize, limits: &ValidationLimits) -> Result<(), InvalidEvent> {
    if count <= limits.max_list_items {
        return Ok(());
    }
    Err(InvalidEvent::new(
        DeadLetterReason::OversizeField,
        format!("field `{field}` has {count} items, limit is {}", limits.max_list_items),
    ))
}

pub(super) fn check_length(field: &str, text: &str, limit: usize) -> Result<(), InvalidEvent> {
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
pub(super) fn validate_product_id(product_id: &str, limits: &ValidationLimits) -> Result<(), InvalidEvent> {
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

pub(super) fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
