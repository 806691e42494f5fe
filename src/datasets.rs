//! Readers for the real ESCI (Amazon Shopping Queries) files in `../shared/data/esci`, turning
//! them into the events of our topics. The data is read by path and never copied into the repo.
//!
//! ESCI keys a product by (ASIN, locale) — the same ASIN can be listed in several locales with
//! different text — so the product id used here is `{locale}:{asin}`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::events::{encode_product_upsert, encode_query_event, normalize_query, ProductContent, QuerySignal, RelevanceLevel};
use crate::kafka::OutgoingMessage;

/// Environment variable that overrides where the ESCI folder is looked for.
pub const ESCI_DIR_ENV: &str = "MERGE_INDEXER_ESCI_DIR";

/// The ESCI folder: `$MERGE_INDEXER_ESCI_DIR`, else `../shared/data/esci` relative to the crate.
pub fn default_esci_dir() -> PathBuf {
    if let Ok(directory) = std::env::var(ESCI_DIR_ENV) {
        return PathBuf::from(directory);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/esci")
}

#[derive(Debug, Deserialize)]
struct EsciProductRow {
    product_id: String,
    product_locale: String,
    product_title: String,
    product_description: Option<String>,
    product_bullet_point: Option<String>,
    product_brand: Option<String>,
    product_color: Option<String>,
}

#[derive(Debug, Deserialize)]
struct EsciJudgementRow {
    query: String,
    locale: String,
    product_id: String,
    esci_label: String,
}

/// One ESCI judgement, keyed as our state keys it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EsciJudgement {
    /// Query locale.
    pub locale: String,
    /// Normalised query.
    pub query: String,
    /// `{locale}:{asin}`.
    pub product_id: String,
    /// Label.
    pub level: RelevanceLevel,
}

/// The ESCI products and judgements, as events.
#[derive(Debug, Clone)]
pub struct EsciDataset {
    /// `(product_id, upsert payload)` per product.
    pub products: Vec<(String, Vec<u8>)>,
    /// Judgements of the train and test splits.
    pub judgements: Vec<EsciJudgement>,
}

/// Our product id for an ESCI (ASIN, locale).
pub fn esci_product_id(locale: &str, asin: &str) -> String {
    format!("{locale}:{asin}")
}

impl EsciDataset {
    /// Reads `products.jsonl`, `judgments_train.csv` and `judgments_test.csv` from `directory`.
    pub fn load(directory: &Path) -> anyhow::Result<Self> {
        let products_path = directory.join("products.jsonl");
        let text = std::fs::read_to_string(&products_path).with_context(|| format!("reading {}", products_path.display()))?;
        let mut products = Vec::new();
        for (line_number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
            let row: EsciProductRow = serde_json::from_str(line)
                .with_context(|| format!("{}:{}", products_path.display(), line_number + 1))?;
            let product_id = esci_product_id(&row.product_locale, &row.product_id);
            let bullet_points = row
                .product_bullet_point
                .map(|bullets| bullets.lines().map(str::trim).filter(|line| !line.is_empty()).map(String::from).collect())
                .unwrap_or_default();
            let content = ProductContent {
                locale: Some(row.product_locale),
                title: row.product_title,
                description: row.product_description,
                bullet_points,
                brand: row.product_brand,
                color: row.product_color,
                category: None,
                attributes: Default::default(),
            };
            products.push((product_id.clone(), encode_product_upsert(&product_id, &content)));
        }
        let mut judgements = Vec::new();
        for split in ["judgments_train.csv", "judgments_test.csv"] {
            let path = directory.join(split);
            let mut reader = csv::Reader::from_path(&path).with_context(|| format!("opening {}", path.display()))?;
            for row in reader.deserialize::<EsciJudgementRow>() {
                let row = row.with_context(|| format!("parsing {}", path.display()))?;
                let level = RelevanceLevel::from_label(&row.esci_label)
                    .with_context(|| format!("{}: unknown label {:?}", path.display(), row.esci_label))?;
                judgements.push(EsciJudgement {
                    product_id: esci_product_id(&row.locale, &row.product_id),
                    query: normalize_query(&row.query),
                    locale: row.locale,
                    level,
                });
            }
        }
        Ok(Self { products, judgements })
    }

    /// Distinct (locale, query, product) pairs among the judgements.
    pub fn distinct_pairs(&self) -> BTreeSet<(String, String, String)> {
        self.judgements
            .iter()
            .map(|judgement| (judgement.locale.clone(), judgement.query.clone(), judgement.product_id.clone()))
            .collect()
    }

    /// All events as messages: products (keyed by id) then judgements.
    pub fn messages(&self, products_topic: &str, query_events_topic: &str) -> Vec<OutgoingMessage> {
        let products = self.products.iter().map(|(product_id, payload)| OutgoingMessage {
            topic: products_topic.to_owned(),
            key: Some(product_id.as_bytes().to_vec()),
            payload: Some(payload.clone()),
        });
        let judgements = self.judgements.iter().map(|judgement| OutgoingMessage {
            topic: query_events_topic.to_owned(),
            key: Some(judgement.query.as_bytes().to_vec()),
            payload: Some(encode_query_event(
                &judgement.query,
                Some(&judgement.locale),
                &judgement.product_id,
                QuerySignal::Judgement(judgement.level),
            )),
        });
        products.chain(judgements).collect()
    }
}
