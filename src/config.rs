//! Configuration: built-in defaults, then a TOML file, then `MERGE_INDEXER_*` environment
//! variables, then command-line flags — each layer overriding the one before. Every key is
//! documented in README.md ("Configuration") and in `ops/config/merge-indexer.example.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::encoder::{EncoderConfig, EncoderKind};
use crate::events::{RelevanceMapping, ValidationLimits};
use crate::state::StateOptions;

/// Prefix of the environment variables read as configuration; nested keys are joined with
/// `__`, e.g. `MERGE_INDEXER_KAFKA__GROUP_ID`.
pub const ENV_PREFIX: &str = "MERGE_INDEXER_";

/// Top-level keys of [`Config`], the only ones read from the environment.
const TOP_LEVEL_KEYS: [&str; 9] = ["state_dir", "metrics_addr", "kafka", "batch", "validation", "relevance", "state", "encoder", "docids"];

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the RocksDB state (default `./state`).
    pub state_dir: PathBuf,
    /// Address of the Prometheus `/metrics` endpoint (default `127.0.0.1:9898`).
    pub metrics_addr: SocketAddr,
    /// Kafka connection, topics and consumer settings.
    pub kafka: KafkaConfig,
    /// Micro-batch bounds.
    pub batch: BatchConfig,
    /// Event size limits.
    pub validation: ValidationLimits,
    /// Mapping of implicit actions to relevance levels.
    pub relevance: RelevanceMapping,
    /// RocksDB options.
    pub state: StateOptions,
    /// Text encoder and embedding workers.
    pub encoder: EncoderConfig,
    /// DocID model and incremental assignment.
    pub docids: DocIdConfig,
}

/// Where the DocID model lives and how new products get DocIDs between retrains.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DocIdConfig {
    /// Directory of the trained model `train-docids` writes (default `<state_dir>/docid-model`).
    pub model_dir: Option<PathBuf>,
    /// Assign DocIDs to new products when a model is present (default true).
    pub assign_new_products: bool,
    /// Queued products quantized and persisted per write.
    pub page_size: usize,
    /// Pause after a pass that assigned nothing, in milliseconds.
    pub idle_poll_ms: u64,
}

impl Default for DocIdConfig {
    fn default() -> Self {
        Self { model_dir: None, assign_new_products: true, page_size: 256, idle_poll_ms: 200 }
    }
}

impl Config {
    /// The DocID model directory: `docids.model_dir`, else `<state_dir>/docid-model`.
    pub fn docid_model_dir(&self) -> PathBuf {
        self.docids.model_dir.clone().unwrap_or_else(|| self.state_dir.join("docid-model"))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("./state"),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9898)),
            kafka: KafkaConfig::default(),
            batch: BatchConfig::default(),
            validation: ValidationLimits::default(),
            relevance: RelevanceMapping::default(),
            state: StateOptions::default(),
            encoder: EncoderConfig::default(),
            docids: DocIdConfig::default(),
        }
    }
}

/// Topic names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicNames {
    /// Product upserts and deletes (compacted, key = product_id).
    pub products: String,
    /// Query judgements and interactions.
    pub query_events: String,
    /// Index version announcements.
    pub index_versions: String,
    /// Rejected events with their reason.
    pub dead_letters: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        Self {
            products: "products".into(),
            query_events: "query-events".into(),
            index_versions: "index-versions".into(),
            dead_letters: "dead-letters".into(),
        }
    }
}

/// Kafka settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`; absent means "start the embedded mock cluster".
    pub brokers: Option<String>,
    /// Consumer group id. Each state directory is one full replica: give every replica its own group.
    pub group_id: String,
    /// `client.id` reported to the brokers.
    pub client_id: String,
    /// Topic names.
    pub topics: TopicNames,
    /// Any librdkafka property, passed through unchanged (`security.protocol`, `ssl.*`, `sasl.*`, …).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are read from environment variables at start-up
    /// (property → variable name), for secrets such as `sasl.password`.
    pub properties_from_env: BTreeMap<String, String>,
    /// How often consumer lag is refreshed, in milliseconds.
    pub lag_refresh_interval_ms: u64,
    /// Partitions per topic when the embedded cluster creates the topics.
    pub embedded_partitions: i32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: None,
            group_id: "merge-indexer".into(),
            client_id: "merge-indexer".into(),
            topics: TopicNames::default(),
            properties: BTreeMap::new(),
            properties_from_env: BTreeMap::new(),
            lag_refresh_interval_ms: 5_000,
            embedded_partitions: 4,
        }
    }
}

impl KafkaConfig {
    /// The pass-through librdkafka properties with secrets resolved from the environment.
    pub fn resolved_properties(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut properties = self.properties.clone();
        for (property, variable) in &self.properties_from_env {
            let value = std::env::var(variable).map_err(|_| ConfigError::MissingSecret {
                property: property.clone(),
                variable: variable.clone(),
            })?;
            properties.insert(property.clone(), value);
        }
        Ok(properties)
    }
}

/// Micro-batch bounds: a batch closes at `max_events` events or `max_wait_ms` after its first event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most events in one batch (one RocksDB write).
    pub max_events: usize,
    /// Longest a batch stays open after its first event, in milliseconds.
    pub max_wait_ms: u64,
    /// Most batches handed from the consumer task to the pipeline (decode and prepare, then
    /// write) and not yet written: the consumer keeps reading while up to this many are in it.
    pub max_in_flight: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_events: 2_000, max_wait_ms: 200, max_in_flight: 4 }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers could not be merged or a value has the wrong type.
    #[error("configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A property's secret variable is not set.
    #[error("kafka property `{property}` is read from ${variable}, which is not set")]
    MissingSecret {
        /// librdkafka property.
        property: String,
        /// Environment variable.
        variable: String,
    },
    /// The config file named on the command line does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
}

/// Command-line overrides, applied last. `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    /// `--state-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// `--metrics-addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// `--brokers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// `--encoder`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderKind>,
}

impl Config {
    /// Loads defaults ← `config_file` ← environment (`MERGE_INDEXER_*`) ← flags.
    pub fn load(config_file: Option<&Path>, flags: &FlagOverrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = config_file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only the configuration's own keys: other MERGE_INDEXER_* variables (the --config
        // flag's MERGE_INDEXER_CONFIG, test data paths) are not configuration.
        let environment = Env::prefixed(ENV_PREFIX)
            .filter(|key| {
                let top_level = key.as_str().split("__").next().unwrap_or_default().to_ascii_lowercase();
                TOP_LEVEL_KEYS.contains(&top_level.as_str())
            })
            .split("__");
        figment = figment.merge(environment);
        if let Some(state_dir) = &flags.state_dir {
            figment = figment.merge(Serialized::default("state_dir", state_dir));
        }
        if let Some(metrics_addr) = &flags.metrics_addr {
            figment = figment.merge(Serialized::default("metrics_addr", metrics_addr));
        }
        if let Some(brokers) = &flags.brokers {
            figment = figment.merge(Serialized::default("kafka.brokers", brokers));
        }
        if let Some(encoder) = &flags.encoder {
            figment = figment.merge(Serialized::default("encoder.kind", encoder));
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error by design
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "indexer.toml",
                r#"
                state_dir = "/from/file"
                [kafka]
                group_id = "from-file"
                [kafka.properties]
                "security.protocol" = "SASL_SSL"
                [batch]
                max_events = 10
                [relevance]
                impression = "I"
                click = "S"
                add_to_cart = "E"
                purchase = "E"
                "#,
            )?;
            jail.set_env("MERGE_INDEXER_KAFKA__GROUP_ID", "from-env");
            jail.set_env("MERGE_INDEXER_BATCH__MAX_WAIT_MS", "7");
            let flags = FlagOverrides { state_dir: Some("/from/flag".into()), ..Default::default() };
            let config = Config::load(Some(Path::new("indexer.toml")), &flags).expect("loads");
            assert_eq!(config.state_dir, PathBuf::from("/from/flag"));
            assert_eq!(config.kafka.group_id, "from-env");
            assert_eq!(config.batch.max_events, 10);
            assert_eq!(config.batch.max_wait_ms, 7);
            assert_eq!(config.kafka.properties["security.protocol"], "SASL_SSL");
            assert_eq!(config.metrics_addr, Config::default().metrics_addr);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_secrets_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[batch]\nmax_event = 3\n")?;
            assert!(Config::load(Some(Path::new("bad.toml")), &FlagOverrides::default()).is_err());
            Ok(())
        });
        let mut kafka = KafkaConfig::default();
        kafka.properties_from_env.insert("sasl.password".into(), "MERGE_INDEXER_TEST_UNSET_SECRET_VARIABLE".into());
        assert!(matches!(kafka.resolved_properties(), Err(ConfigError::MissingSecret { .. })));
    }

    #[test]
    fn example_config_in_ops_parses_and_matches_defaults() {
        // Inside a jail: other tests set MERGE_INDEXER_* variables in jails of their own.
        figment::Jail::expect_with(|jail| {
            jail.set_env("MERGE_INDEXER_CONFIG", "ignored: not a configuration key");
            jail.set_env("MERGE_INDEXER_ESCI_DIR", "/ignored/too");
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/config/merge-indexer.example.toml");
            let config = Config::load(Some(&path), &FlagOverrides::default()).expect("example config loads");
            assert_eq!(config, Config::default(), "the example file documents the defaults; keep them equal");
            Ok(())
        });
    }
}
