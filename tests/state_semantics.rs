//! Product upsert/delete/re-upsert (explicit and tombstone), interactions for products that
//! are not known yet, and the mapping of implicit actions to relevance levels — end to end
//! through the embedded broker.

mod common;

use common::*;
use merge_indexer::events::{ActionGrade, RelevanceLevel};
use merge_indexer::kafka::OutgoingMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_delete_reupsert_and_unknown_products() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "semantics");
    config.kafka.embedded_partitions = 1;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let products = config.kafka.topics.products.clone();
    let queries = config.kafka.topics.query_events.clone();
    let upsert = |id: &str, title: &str| message(&products, Some(id), &format!(r#"{{"schema_version":1,"product_id":"{id}","title":"{title}"}}"#));
    let messages = vec![
        upsert("A", "first"),
        upsert("B", "bee"),
        upsert("A", "second"),
        upsert("A", "second"), // same content: unchanged
        message(&products, Some("A"), r#"{"schema_version":1,"op":"delete","product_id":"A"}"#),
        OutgoingMessage { topic: products.clone(), key: Some(b"B".to_vec()), payload: None }, // tombstone
        message(&products, Some("Z"), r#"{"schema_version":1,"op":"delete","product_id":"Z"}"#), // absent: unchanged
        upsert("A", "third"),
        // Interactions for a product that does not exist yet: kept.
        message(&queries, None, r#"{"schema_version":1,"query":"Late Product","product_id":"LATE","action":"click"}"#),
        message(&queries, None, r#"{"schema_version":1,"query":"late   product","product_id":"LATE","action":"purchase"}"#),
    ];
    produce(&config, &bootstrap, &messages).await;
    let state = open_state(&config);
    let summary = run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(summary.outcomes.get("unchanged").copied(), Some(2));
    assert_eq!(summary.outcomes.get("applied").copied(), Some(8));

    let product_a = state.product("A").unwrap().expect("A re-upserted after delete");
    assert_eq!(product_a.content.title, "third");
    assert_eq!(product_a.updated_by.offset, 7);
    assert!(state.product("B").unwrap().is_none(), "tombstone deleted B");
    assert_eq!(state.counts().unwrap().products, 1);

    let late = state.judgement("", "late product", "LATE").unwrap().expect("interactions for unknown products are kept");
    assert_eq!(late.action_counts, [0, 1, 0, 1]);
    assert_eq!(late.max_level, Some(RelevanceLevel::Exact));
    assert_eq!(state.count_judgements_without_product().unwrap(), 1);

    // The product arrives later; the pair is now complete.
    produce(&config, &bootstrap, &[upsert("LATE", "arrived")]).await;
    run_until_caught_up(&config, state.clone(), &bootstrap).await;
    assert_eq!(state.count_judgements_without_product().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_actions_follow_the_configured_mapping() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path(), "mapping");
    config.kafka.embedded_partitions = 1;
    config.relevance.impression = ActionGrade::Level(RelevanceLevel::Irrelevant);
    config.relevance.click = ActionGrade::Ungraded;
    let broker = start_broker(&config);
    let bootstrap = broker.bootstrap_servers().to_owned();
    let queries = config.kafka.topics.query_events.clone();
    let event = |product: &str, field: &str, value: &str| {
        message(&queries, None, &format!(r#"{{"schema_version":1,"query":"shoes","locale":"us","product_id":"{product}","{field}":"{value}"}}"#))
    };
    let messages = vec![
        event("IMPRESSED", "action", "impression"),
        event("CLICKED", "action", "click"),
        event("CLICKED", "action", "click"),
        event("CARTED", "action", "impression"),
        event("CARTED", "action", "add_to_cart"),
        event("JUDGED", "action", "purchase"),
        event("JUDGED", "label", "C"),
    ];
    produce(&config, &bootstrap, &messages).await;
    let state = open_state(&config);
    run_until_caught_up(&config, state.clone(), &bootstrap).await;
    let pair = |product: &str| state.judgement("us", "shoes", product).unwrap().expect("pair stored");
    assert_eq!(pair("IMPRESSED").max_level, Some(RelevanceLevel::Irrelevant), "impression mapped to I by config");
    assert_eq!(pair("CLICKED").max_level, None, "click configured as ungraded");
    assert_eq!(pair("CLICKED").action_counts[1], 2);
    assert_eq!(pair("CARTED").max_level, Some(RelevanceLevel::Substitute), "max of I and S");
    let judged = pair("JUDGED");
    assert_eq!(judged.max_level, Some(RelevanceLevel::Exact), "purchase (E) outranks the explicit C");
    assert_eq!(judged.explicit_judgements, 1);
    assert_eq!(judged.level_counts, [0, 1, 0, 1]);
}
