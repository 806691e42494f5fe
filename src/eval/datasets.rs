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

/// Environment variable that overrides where the graded ESCI folder is looked for.
pub const ESCI_GRADED_DIR_ENV: &str = "MERGE_INDEXER_ESCI_GRADED_DIR";

/// The graded ESCI folder: `$MERGE_INDEXER_ESCI_GRADED_DIR`, else `../shared/data/esci-graded`
/// relative to the crate.
pub fn default_esci_graded_dir() -> PathBuf {
    if let Ok(directory) = std::env::var(ESCI_GRADED_DIR_ENV) {
        return PathBuf::from(directory);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/esci-graded")
}

/// A product of the graded ESCI folder (`products.jsonl`).
#[derive(Debug, Clone, Deserialize)]
pub struct GradedProduct {
    /// The ASIN (or ISBN-10), as in ESCI.
    pub product_id: String,
    /// Always `us` in this folder.
    pub locale: String,
    /// Title, never empty.
    pub title: String,
    /// Description (may hold HTML), when present.
    pub description: Option<String>,
    /// Bullet points as one string, when present.
    pub bullets: Option<String>,
    /// Brand, when present.
    pub brand: Option<String>,
    /// Colour, when present.
    pub color: Option<String>,
}

impl GradedProduct {
    /// The product as our events carry it.
    pub fn content(&self) -> ProductContent {
        let mut content = ProductContent::with_title(self.title.clone());
        content.locale = Some(self.locale.clone());
        content.description = self.description.clone().filter(|text| !text.is_empty());
        content.bullet_points = self.bullets.iter().filter(|text| !text.is_empty()).cloned().collect();
        content.brand = self.brand.clone().filter(|text| !text.is_empty());
        content.color = self.color.clone().filter(|text| !text.is_empty());
        content
    }
}

/// One row of `judgments_{train,test}.csv`.
#[derive(Debug, Clone, Deserialize)]
pub struct GradedJudgement {
    /// ESCI query id.
    pub query_id: String,
    /// Query text as in ESCI.
    pub query: String,
    /// The judged product's id (as in `products.jsonl`).
    pub product_id: String,
    /// `E`, `S`, `C` or `I`.
    pub esci_label: String,
}

impl GradedJudgement {
    /// The label as a level (`None` for an unknown letter).
    pub fn level(&self) -> Option<RelevanceLevel> {
        RelevanceLevel::from_label(&self.esci_label)
    }
}

/// The graded ESCI folder: every product, and the train and test judgements (queries with
/// their full graded lists).
#[derive(Debug, Clone)]
pub struct EsciGraded {
    /// Products in file order.
    pub products: Vec<GradedProduct>,
    /// `judgments_train.csv`.
    pub train: Vec<GradedJudgement>,
    /// `judgments_test.csv`.
    pub test: Vec<GradedJudgement>,
}

impl EsciGraded {
    /// Reads `products.jsonl`, `judgments_train.csv` and `judgments_test.csv` from `directory`.
    pub fn load(directory: &Path) -> anyhow::Result<Self> {
        let products_path = directory.join("products.jsonl");
        let text = std::fs::read_to_string(&products_path).with_context(|| format!("reading {}", products_path.display()))?;
        let products = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .enumerate()
            .map(|(index, line)| serde_json::from_str(line).with_context(|| format!("{} line {}", products_path.display(), index + 1)))
            .collect::<anyhow::Result<Vec<GradedProduct>>>()?;
        let read_judgements = |name: &str| -> anyhow::Result<Vec<GradedJudgement>> {
            let path = directory.join(name);
            let mut reader = csv::Reader::from_path(&path).with_context(|| format!("opening {}", path.display()))?;
            reader.deserialize().map(|row| row.with_context(|| format!("reading {}", path.display()))).collect()
        };
        Ok(Self { products, train: read_judgements("judgments_train.csv")?, test: read_judgements("judgments_test.csv")? })
    }
}
