use super::*;
use std::borrow::Cow;
#[allow(unused_imports)]
use super::decode::*;
#[allow(unused_imports)]
use super::encode::*;
#[allow(unused_imports)]
use super::relevance::*;

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
