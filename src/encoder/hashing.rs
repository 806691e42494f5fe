//! The zero-weight hashing encoder: word unigrams, word bigrams and character n-grams of each
//! word are hashed into a sparse bag (2^`bucket_bits` buckets, sublinear term frequency), which
//! a fixed seeded random projection (entries ±1/√d, generated on the fly from the bucket
//! number) maps to a dense `dimension`-d vector, then L2-normalised. Deterministic across
//! machines and releases: the hash is XXH3-64 and the projection is a pure function of
//! (seed, bucket, component).

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{l2_normalise, EncoderError, TextEncoder};

/// Hashing encoder parameters; part of its cache id.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashingEncoderConfig {
    /// Output dimension.
    pub dimension: usize,
    /// log2 of the number of hash buckets of the sparse bag.
    pub bucket_bits: u32,
    /// Seed of the hash and the projection.
    pub seed: u64,
    /// Shortest and longest character n-gram, taken over each word wrapped in `<` `>`.
    pub char_ngram_min: usize,
    /// See `char_ngram_min`.
    pub char_ngram_max: usize,
    /// Weight of the character n-grams relative to words (1.0).
    pub char_ngram_weight: f32,
    /// Weight of word bigrams relative to words (1.0).
    pub bigram_weight: f32,
}

impl Default for HashingEncoderConfig {
    fn default() -> Self {
        Self { dimension: 384, bucket_bits: 20, seed: 0x6d65_7267_655f_6831, char_ngram_min: 3, char_ngram_max: 5, char_ngram_weight: 0.5, bigram_weight: 1.0 }
    }
}

/// Feature kinds are hashed with different seeds so a word and an identical n-gram differ.
const WORD_SEED_OFFSET: u64 = 1;
const BIGRAM_SEED_OFFSET: u64 = 2;
const CHAR_SEED_OFFSET: u64 = 3;
const PROJECTION_SEED_OFFSET: u64 = 4;

/// The hashing encoder.
#[derive(Debug, Clone)]
pub struct HashingEncoder {
    config: HashingEncoderConfig,
    cache_id: String,
}

impl HashingEncoder {
    /// A hashing encoder; fails on a zero dimension or an out-of-range bucket count.
    pub fn new(config: HashingEncoderConfig) -> Result<Self, EncoderError> {
        if config.dimension == 0 || !(8..=32).contains(&config.bucket_bits) || config.char_ngram_min == 0 || config.char_ngram_min > config.char_ngram_max {
            return Err(EncoderError::InvalidModel(format!("invalid hashing encoder config {config:?}")));
        }
        let cache_id = format!(
            "hashing-v1:d{}:b{}:s{:x}:c{}-{}:w{}:{}",
            config.dimension, config.bucket_bits, config.seed, config.char_ngram_min, config.char_ngram_max, config.char_ngram_weight, config.bigram_weight
        );
        Ok(Self { config, cache_id })
    }

    /// The sparse bag of `text`: bucket → weight (1 + ln tf, times the feature kind's weight),
    /// in bucket order.
    pub fn sparse_features(&self, text: &str) -> BTreeMap<u32, f32> {
        let config = &self.config;
        let bucket_mask = (1_u64 << config.bucket_bits) - 1;
        let lowered = text.to_lowercase();
        let words: Vec<&str> = lowered.split(|character: char| !character.is_alphanumeric()).filter(|word| !word.is_empty()).collect();
        let mut counts: HashMap<(u32, u8), f32> = HashMap::new();
        let mut add = |bytes: &[u8], seed_offset: u64, kind: u8| {
            let bucket = (xxh3_64_with_seed(bytes, config.seed.wrapping_add(seed_offset)) & bucket_mask) as u32;
            *counts.entry((bucket, kind)).or_insert(0.0) += 1.0;
        };
        let mut wrapped = String::new();
        for word in &words {
            add(word.as_bytes(), WORD_SEED_OFFSET, 0);
            wrapped.clear();
            wrapped.push('<');
            wrapped.push_str(word);
            wrapped.push('>');
            let boundaries: Vec<usize> = wrapped.char_indices().map(|(index, _)| index).chain(std::iter::once(wrapped.len())).collect();
            let characters = boundaries.len() - 1;
            for length in config.char_ngram_min..=config.char_ngram_max.min(characters) {
                for start in 0..=characters - length {
                    add(&wrapped.as_bytes()[boundaries[start]..boundaries[start + length]], CHAR_SEED_OFFSET, 2);
                }
            }
        }
        for pair in words.windows(2) {
            let bigram = format!("{} {}", pair[0], pair[1]);
            add(bigram.as_bytes(), BIGRAM_SEED_OFFSET, 1);
        }
        // Summed in (bucket, kind) order: floating-point addition must not depend on the
        // hash map's per-process iteration order, or vectors would differ between runs.
        let mut ordered: Vec<((u32, u8), f32)> = counts.into_iter().collect();
        ordered.sort_unstable_by_key(|(key, _)| *key);
        let mut features: BTreeMap<u32, f32> = BTreeMap::new();
        for ((bucket, kind), count) in ordered {
            let kind_weight = match kind {
                0 => 1.0,
                1 => config.bigram_weight,
                _ => config.char_ngram_weight,
            };
            *features.entry(bucket).or_insert(0.0) += kind_weight * (1.0 + count.ln());
        }
        features
    }

    /// Dense, normalised embedding of one text (all zeros for a text without any word).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        let dimension = self.config.dimension;
        let mut dense = vec![0.0_f32; dimension];
        let projection_seed = self.config.seed.wrapping_add(PROJECTION_SEED_OFFSET);
        for (bucket, weight) in self.sparse_features(text) {
            // 64 signs per hash: component c of the bucket's row uses bit c % 64 of hash c / 64.
            for (block_index, block) in dense.chunks_mut(64).enumerate() {
                let key = (u64::from(bucket) << 16) | block_index as u64;
                let signs = xxh3_64_with_seed(&key.to_le_bytes(), projection_seed);
                for (bit, component) in block.iter_mut().enumerate() {
                    if signs >> bit & 1 == 1 {
                        *component += weight;
                    } else {
                        *component -= weight;
                    }
                }
            }
        }
        // The 1/√d scale of the projection cancels in the normalisation.
        l2_normalise(dense)
    }
}

impl TextEncoder for HashingEncoder {
    fn model_name(&self) -> &str {
        "hashing-v1"
    }

    fn cache_id(&self) -> &str {
        &self.cache_id
    }

    fn dimension(&self) -> usize {
        self.config.dimension
    }

    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError> {
        Ok(texts.iter().map(|text| self.embed(text)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(left: &[f32], right: &[f32]) -> f32 {
        left.iter().zip(right).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn deterministic_normalised_and_sensitive_to_content() {
        let encoder = HashingEncoder::new(HashingEncoderConfig::default()).unwrap();
        let pan = encoder.embed("Non-stick frying pan, 28 cm");
        assert_eq!(pan, encoder.embed("Non-stick frying pan, 28 cm"));
        // Bit-identical across instances (each hash map has its own random iteration order).
        for _ in 0..8 {
            assert_eq!(pan, HashingEncoder::new(HashingEncoderConfig::default()).unwrap().embed("Non-stick frying pan, 28 cm"));
        }
        assert_eq!(pan.len(), 384);
        assert!((cosine(&pan, &pan) - 1.0).abs() < 1e-5);
        let similar = encoder.embed("frying pan non stick 28cm");
        let unrelated = encoder.embed("wireless bluetooth headphones");
        assert!(cosine(&pan, &similar) > 0.5, "shared words and n-grams: {}", cosine(&pan, &similar));
        assert!(cosine(&pan, &unrelated).abs() < 0.3, "nothing shared: {}", cosine(&pan, &unrelated));
        assert!(cosine(&pan, &similar) > cosine(&pan, &unrelated) + 0.3);
    }

    #[test]
    fn character_ngrams_match_misspellings_and_case_is_ignored() {
        let encoder = HashingEncoder::new(HashingEncoderConfig::default()).unwrap();
        let right = encoder.embed("HEADPHONES");
        let misspelt = encoder.embed("headphnes");
        let other = encoder.embed("saucepan");
        assert_eq!(right, encoder.embed("headphones"));
        assert!(cosine(&right, &misspelt) > cosine(&right, &other) + 0.2);
    }

    #[test]
    fn empty_text_is_the_zero_vector_and_bad_config_is_refused() {
        let encoder = HashingEncoder::new(HashingEncoderConfig::default()).unwrap();
        assert!(encoder.embed(" ,;- ").iter().all(|value| *value == 0.0));
        assert!(HashingEncoder::new(HashingEncoderConfig { dimension: 0, ..Default::default() }).is_err());
        assert!(HashingEncoder::new(HashingEncoderConfig { char_ngram_min: 6, ..Default::default() }).is_err());
    }
}
