//! Producer-side encoders: the wire JSON of product upserts, deletes and query events, as the
//! synthetic catalog, the ESCI loader and the tests produce them.

use super::*;

use serde_json::Value;

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
