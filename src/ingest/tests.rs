use super::*;
#[allow(unused_imports)]
use super::batch::*;
#[allow(unused_imports)]
use super::context::*;
#[allow(unused_imports)]
use super::dead_letters::*;
#[allow(unused_imports)]
use super::lag::*;
#[allow(unused_imports)]
use super::pipeline::*;

#[test]
fn exactly_once_settings_win_over_pass_through_and_defaults_yield_to_it() {
    let mut kafka = KafkaConfig::default();
    kafka.properties.insert("enable.auto.commit".into(), "true".into());
    kafka.properties.insert("group.id".into(), "someone-else".into());
    kafka.properties.insert("isolation.level".into(), "read_uncommitted".into());
    kafka.properties.insert("security.protocol".into(), "SASL_SSL".into());
    let client_config = consumer_client_config(&kafka, "broker:9092", "indexer-a").unwrap();
    assert_eq!(client_config.get("enable.auto.commit"), Some("false"));
    assert_eq!(client_config.get("enable.auto.offset.store"), Some("false"));
    assert_eq!(client_config.get("group.id"), Some("indexer-a"));
    assert_eq!(client_config.get("isolation.level"), Some("read_uncommitted"), "pass-through beats our default");
    assert_eq!(client_config.get("auto.offset.reset"), Some("earliest"));
    assert_eq!(client_config.get("fetch.queue.backoff.ms"), Some("10"));
    assert_eq!(client_config.get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(client_config.get("bootstrap.servers"), Some("broker:9092"));
}
