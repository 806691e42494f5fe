//! A deterministic synthetic catalog for the demo, benchmarks and scale tests: products with
//! categories and attributes, queries derived from product attributes, and graded judgements
//! plus implicit interactions that follow the ESCI semantics (the source product is Exact,
//! same-kind products are Substitutes, same-category other kinds are Complements, other
//! categories are Irrelevant). The same seed always yields the same events.

use std::collections::BTreeMap;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::events::{encode_product_delete, encode_product_upsert, encode_query_event, InteractionAction, ProductContent, QuerySignal, RelevanceLevel};
use crate::kafka::OutgoingMessage;

struct CategorySpec {
    path: &'static str,
    kinds: &'static [&'static str],
    brands: &'static [&'static str],
    materials: &'static [&'static str],
    features: &'static [&'static str],
}

const CATEGORIES: &[CategorySpec] = &[
    CategorySpec {
        path: "Home & Kitchen > Cookware",
        kinds: &["frying pan", "saucepan", "dutch oven", "wok", "stock pot", "griddle"],
        brands: &["Lodge", "Cuisinart", "T-fal", "Calphalon", "Tramontina"],
        materials: &["cast iron", "stainless steel", "nonstick aluminum", "carbon steel", "enameled"],
        features: &["oven safe to 500F", "induction compatible", "dishwasher safe", "PFOA free", "stay-cool handle"],
    },
    CategorySpec {
        path: "Electronics > Headphones",
        kinds: &["over-ear headphones", "earbuds", "gaming headset", "sports earphones", "studio monitors"],
        brands: &["Sony", "Anker", "JBL", "Sennheiser", "Skullcandy"],
        materials: &["wireless", "wired", "bluetooth 5.3", "noise cancelling", "open-back"],
        features: &["40 hour battery", "built-in microphone", "sweat resistant", "foldable design", "USB-C charging"],
    },
    CategorySpec {
        path: "Sports & Outdoors > Running",
        kinds: &["running shoes", "trail shoes", "running shorts", "compression socks", "hydration vest"],
        brands: &["Brooks", "ASICS", "Saucony", "New Balance", "Hoka"],
        materials: &["mesh", "gore-tex", "recycled polyester", "merino wool", "knit"],
        features: &["cushioned midsole", "reflective details", "breathable upper", "wide toe box", "lightweight"],
    },
    CategorySpec {
        path: "Tools & Home Improvement > Lighting",
        kinds: &["desk lamp", "led strip", "floor lamp", "flashlight", "motion sensor light"],
        brands: &["Philips", "Govee", "BenQ", "Energizer", "Mr Beams"],
        materials: &["dimmable", "rechargeable", "smart wifi", "battery powered", "solar"],
        features: &["warm white 2700K", "touch control", "app control", "IP65 waterproof", "eye-caring"],
    },
    CategorySpec {
        path: "Pet Supplies > Dogs",
        kinds: &["dog toy", "dog bed", "dog leash", "dog harness", "dog bowl"],
        brands: &["KONG", "Chuckit", "Ruffwear", "Frisco", "Petmate"],
        materials: &["rubber", "nylon", "orthopedic foam", "stainless steel", "rope"],
        features: &["for large dogs", "chew resistant", "machine washable", "no pull", "non-slip base"],
    },
    CategorySpec {
        path: "Beauty & Personal Care > Skin Care",
        kinds: &["face moisturizer", "sunscreen", "cleanser", "serum", "eye cream"],
        brands: &["CeraVe", "Neutrogena", "La Roche-Posay", "Olay", "Cetaphil"],
        materials: &["hyaluronic acid", "vitamin c", "retinol", "mineral", "fragrance free"],
        features: &["for sensitive skin", "SPF 50", "non-comedogenic", "dermatologist tested", "oil free"],
    },
];

const COLORS: &[&str] = &["black", "white", "red", "blue", "green", "gray", "pink", "navy", "silver", "beige"];
const SIZES: &[&str] = &["small", "medium", "large", "8 inch", "10 inch", "12 inch", "2 pack", "XL"];

/// Shape of a synthetic catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticCatalogSpec {
    /// Products to create.
    pub products: usize,
    /// Distinct queries to create.
    pub queries: usize,
    /// Judged products per query (explicit labels), before interactions.
    pub judgements_per_query: usize,
    /// RNG seed; equal seeds give equal catalogs.
    pub seed: u64,
    /// Fraction of products that are later updated (new content), deleted and re-upserted.
    pub churn_fraction: f64,
}

impl Default for SyntheticCatalogSpec {
    fn default() -> Self {
        Self { products: 2_000, queries: 300, judgements_per_query: 8, seed: 42, churn_fraction: 0.05 }
    }
}

/// A generated product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticProduct {
    /// Product id (`SYN-000001`, …).
    pub product_id: String,
    /// Index into the category table.
    pub category_index: usize,
    /// Index into the category's kinds.
    pub kind_index: usize,
    /// The product's content.
    pub content: ProductContent,
}

/// One explicit judgement of the generated ground truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticJudgement {
    /// Query text.
    pub query: String,
    /// Judged product.
    pub product_id: String,
    /// Grade.
    pub level: RelevanceLevel,
}

/// A generated catalog: products, ground-truth judgements and the event stream that carries them.
#[derive(Debug, Clone)]
pub struct SyntheticCatalog {
    /// Final products (after churn), by id.
    pub products: BTreeMap<String, SyntheticProduct>,
    /// Explicit judgements.
    pub judgements: Vec<SyntheticJudgement>,
    /// Product events, in production order (upserts, updates, deletes, re-upserts).
    pub product_events: Vec<(String, Option<Vec<u8>>)>,
    /// Query events (judgements and interactions) as `(query, payload)`, in production order;
    /// the query is the message key, so one query's signals share a partition.
    pub query_events: Vec<(String, Vec<u8>)>,
}

impl SyntheticCatalog {
    /// Generates the catalog described by `spec`.
    pub fn generate(spec: &SyntheticCatalogSpec) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut products = BTreeMap::new();
        let mut product_events = Vec::new();
        for index in 0..spec.products {
            let product = random_product(&mut rng, index);
            product_events.push((product.product_id.clone(), Some(encode_product_upsert(&product.product_id, &product.content))));
            products.insert(product.product_id.clone(), product);
        }
        // Churn: some products get new content, some are deleted and come back.
        let churned = ((spec.products as f64) * spec.churn_fraction).round() as usize;
        let ids: Vec<String> = products.keys().cloned().collect();
        for product_id in ids.choose_multiple(&mut rng, churned) {
            let product = products.get_mut(product_id).expect("chosen from keys");
            if rng.random_bool(0.5) {
                product.content.title = format!("{} (2026 model)", product.content.title);
                product_events.push((product_id.clone(), Some(encode_product_upsert(product_id, &product.content))));
            } else {
                product_events.push((product_id.clone(), Some(encode_product_delete(product_id))));
                product_events.push((product_id.clone(), Some(encode_product_upsert(product_id, &product.content))));
            }
        }
        let (judgements, query_events) = random_query_events(&mut rng, &products, spec);
        Self { products, judgements, product_events, query_events }
    }

    /// Upserts of the products with index `first_index` or above (`SYN-{index}`), in index
    /// order: a catalog generated with more products starts with the same ones, so this is the
    /// "second wave" a smaller catalog of `first_index` products lacks.
    pub fn product_upserts_from(&self, products_topic: &str, first_index: usize) -> Vec<OutgoingMessage> {
        self.products
            .values()
            .filter(|product| product.product_id.strip_prefix("SYN-").and_then(|index| index.parse::<usize>().ok()).is_some_and(|index| index >= first_index))
            .map(|product| OutgoingMessage {
                topic: products_topic.to_owned(),
                key: Some(product.product_id.as_bytes().to_vec()),
                payload: Some(encode_product_upsert(&product.product_id, &product.content)),
            })
            .collect()
    }

    /// All events as messages for the given topic names, products first.
    pub fn messages(&self, products_topic: &str, query_events_topic: &str) -> Vec<OutgoingMessage> {
        let products = self.product_events.iter().map(|(product_id, payload)| OutgoingMessage {
            topic: products_topic.to_owned(),
            key: Some(product_id.as_bytes().to_vec()),
            payload: payload.clone(),
        });
        let queries = self.query_events.iter().map(|(query, payload)| OutgoingMessage {
            topic: query_events_topic.to_owned(),
            key: Some(query.as_bytes().to_vec()),
            payload: Some(payload.clone()),
        });
        products.chain(queries).collect()
    }
}

fn random_product(rng: &mut ChaCha8Rng, index: usize) -> SyntheticProduct {
    let category_index = rng.random_range(0..CATEGORIES.len());
    let category = &CATEGORIES[category_index];
    let kind_index = rng.random_range(0..category.kinds.len());
    let kind = category.kinds[kind_index];
    let brand = *category.brands.choose(rng).expect("non-empty");
    let material = *category.materials.choose(rng).expect("non-empty");
    let color = *COLORS.choose(rng).expect("non-empty");
    let size = *SIZES.choose(rng).expect("non-empty");
    let features: Vec<String> = category.features.choose_multiple(rng, 3).map(|feature| feature.to_string()).collect();
    let content = ProductContent {
        locale: Some("us".into()),
        title: format!("{brand} {material} {kind}, {color}, {size}"),
        description: Some(format!(
            "<p>The {brand} {kind} in {color}.</p><p>Made with {material}; {}.</p>",
            features.join(", ")
        )),
        bullet_points: features.clone(),
        brand: Some(brand.into()),
        color: Some(color.into()),
        category: Some(category.path.into()),
        attributes: BTreeMap::from([("material".into(), material.into()), ("size".into(), size.into()), ("kind".into(), kind.into())]),
    };
    SyntheticProduct { product_id: format!("SYN-{index:06}"), category_index, kind_index, content }
}

fn random_query_events(
    rng: &mut ChaCha8Rng,
    products: &BTreeMap<String, SyntheticProduct>,
    spec: &SyntheticCatalogSpec,
) -> (Vec<SyntheticJudgement>, Vec<(String, Vec<u8>)>) {
    let all: Vec<&SyntheticProduct> = products.values().collect();
    let mut judgements = Vec::new();
    let mut events = Vec::new();
    if all.is_empty() {
        return (judgements, events);
    }
    for _ in 0..spec.queries {
        let source = *all.choose(rng).expect("non-empty");
        let kind = CATEGORIES[source.category_index].kinds[source.kind_index];
        let color = source.content.color.clone().unwrap_or_default();
        let brand = source.content.brand.clone().unwrap_or_default();
        let query = match rng.random_range(0..3) {
            0 => format!("{color} {kind}"),
            1 => format!("{brand} {kind}"),
            _ => format!("{kind} {}", source.content.attributes["material"]),
        };
        let mut judged = vec![(source.product_id.clone(), RelevanceLevel::Exact)];
        for candidate in all.choose_multiple(rng, spec.judgements_per_query.saturating_sub(1)) {
            if candidate.product_id == source.product_id {
                continue;
            }
            let level = if candidate.category_index != source.category_index {
                RelevanceLevel::Irrelevant
            } else if candidate.kind_index != source.kind_index {
                RelevanceLevel::Complement
            } else if candidate.content.color == source.content.color || candidate.content.brand == source.content.brand {
                RelevanceLevel::Exact
            } else {
                RelevanceLevel::Substitute
            };
            judged.push((candidate.product_id.clone(), level));
        }
        for (product_id, level) in judged {
            events.push((query.clone(), encode_query_event(&query, Some("us"), &product_id, QuerySignal::Judgement(level))));
            events.push((query.clone(), encode_query_event(&query, Some("us"), &product_id, QuerySignal::Interaction(InteractionAction::Impression))));
            let click_probability = match level {
                RelevanceLevel::Exact => 0.6,
                RelevanceLevel::Substitute => 0.3,
                RelevanceLevel::Complement => 0.1,
                RelevanceLevel::Irrelevant => 0.02,
            };
            if rng.random_bool(click_probability) {
                events.push((query.clone(), encode_query_event(&query, Some("us"), &product_id, QuerySignal::Interaction(InteractionAction::Click))));
                if level == RelevanceLevel::Exact && rng.random_bool(0.3) {
                    events.push((query.clone(), encode_query_event(&query, Some("us"), &product_id, QuerySignal::Interaction(InteractionAction::Purchase))));
                }
            }
            judgements.push(SyntheticJudgement { query: query.clone(), product_id, level });
        }
    }
    (judgements, events)
}

/// Malformed messages, one per dead-letter class the demo shows (topic is `products` or
/// `query-events` as given).
pub fn malformed_examples(products_topic: &str, query_events_topic: &str) -> Vec<OutgoingMessage> {
    let product = |key: Option<&str>, payload: &str| OutgoingMessage {
        topic: products_topic.to_owned(),
        key: key.map(|key| key.as_bytes().to_vec()),
        payload: Some(payload.as_bytes().to_vec()),
    };
    let query = |payload: &str| OutgoingMessage {
        topic: query_events_topic.to_owned(),
        key: None,
        payload: Some(payload.as_bytes().to_vec()),
    };
    vec![
        product(Some("BAD-1"), "{\"schema_version\":1,\"product_id\":\"BAD-1\",\"title\":"),
        product(Some("BAD-2"), "{\"schema_version\":1,\"product_id\":\"BAD-2\"}"),
        product(Some("BAD-3"), "{\"schema_version\":1,\"product_id\":\"BAD-3\",\"title\":42}"),
        product(Some("OTHER"), "{\"schema_version\":1,\"product_id\":\"BAD-4\",\"title\":\"t\"}"),
        query("{\"schema_version\":1,\"query\":\"red pan\",\"product_id\":\"SYN-000001\",\"label\":\"X\"}"),
        query("{\"schema_version\":1,\"query\":\"red pan\",\"product_id\":\"SYN-000001\",\"action\":\"hover\"}"),
        query("{\"schema_version\":9,\"query\":\"red pan\",\"product_id\":\"SYN-000001\",\"label\":\"E\"}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_catalog_different_seed_different_catalog() {
        let spec = SyntheticCatalogSpec { products: 50, queries: 10, ..Default::default() };
        let first = SyntheticCatalog::generate(&spec);
        let second = SyntheticCatalog::generate(&spec);
        assert_eq!(first.product_events, second.product_events);
        assert_eq!(first.query_events, second.query_events);
        let other = SyntheticCatalog::generate(&SyntheticCatalogSpec { seed: 7, ..spec });
        assert_ne!(first.product_events, other.product_events);
        assert_eq!(first.products.len(), 50);
        assert!(first.judgements.iter().any(|judgement| judgement.level == RelevanceLevel::Exact));
    }
}
