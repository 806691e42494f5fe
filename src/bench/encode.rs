//! `merge-indexer bench encode`: encoder throughput (products/s) at several batch sizes.

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use merge_indexer::config::Config;
use merge_indexer::synth::{SyntheticCatalog, SyntheticCatalogSpec};

/// `bench encode` flags.
#[derive(Debug, Args, Clone)]
pub struct EncodeBenchArgs {
    /// Encoder to time [default: the configured one].
    #[arg(long, value_enum)]
    pub encoder: Option<merge_indexer::encoder::EncoderKind>,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    pub batch_sizes: Vec<usize>,
    /// Products to encode per batch size (real ESCI products when the graded folder is present,
    /// else the synthetic catalog).
    #[arg(long, default_value_t = 512)]
    pub products: usize,
}

/// One batch size's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct EncodeRound {
    /// Texts per encoder call.
    pub batch_size: usize,
    /// Products encoded.
    pub products: usize,
    /// Products per second.
    pub products_per_second: f64,
}

/// Product texts for encoder benchmarks and the retrieval check: the graded ESCI products
/// (title + description) when present, else synthetic products.
pub(super) fn benchmark_product_texts(config: &Config, limit: usize) -> anyhow::Result<(Vec<String>, &'static str)> {
    let directory = merge_indexer::eval::datasets::default_esci_graded_dir();
    if directory.join("products.jsonl").is_file() {
        let data = merge_indexer::eval::datasets::EsciGraded::load(&directory)?;
        let texts = data.products.iter().take(limit).map(|product| merge_indexer::encoder::product_text(&product.content(), &config.encoder.text)).collect();
        return Ok((texts, "ESCI graded products (title + description)"));
    }
    eprintln!("graded ESCI data not found in {}; timing synthetic products instead", directory.display());
    let spec = SyntheticCatalogSpec { products: limit, queries: 1, judgements_per_query: 1, seed: 7, churn_fraction: 0.0 };
    let catalog = SyntheticCatalog::generate(&spec);
    let texts = catalog.products.values().map(|product| merge_indexer::encoder::product_text(&product.content, &config.encoder.text)).collect();
    Ok((texts, "synthetic products"))
}

/// Times the encoder on product texts at each batch size (after one warm-up batch) and prints
/// a table and one JSON line.
pub fn encode_benchmark(mut config: Config, arguments: &EncodeBenchArgs) -> anyhow::Result<()> {
    if let Some(kind) = arguments.encoder {
        config.encoder.kind = kind;
    }
    let encoder = merge_indexer::encoder::build_encoder(&config.encoder)?;
    let (texts, source) = benchmark_product_texts(&config, arguments.products)?;
    let mut rounds = Vec::new();
    for &batch_size in &arguments.batch_sizes {
        let batch_size = batch_size.max(1);
        let warm_up: Vec<&str> = texts.iter().take(batch_size).map(String::as_str).collect();
        encoder.encode(&warm_up)?;
        let started = Instant::now();
        for chunk in texts.chunks(batch_size) {
            let borrowed: Vec<&str> = chunk.iter().map(String::as_str).collect();
            encoder.encode(&borrowed)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let round = EncodeRound { batch_size, products: texts.len(), products_per_second: texts.len() as f64 / seconds.max(1e-9) };
        println!("{} batch {:>4}: {:>9.1} products/s ({} {source})", encoder.model_name(), batch_size, round.products_per_second, texts.len());
        rounds.push(round);
    }
    println!(
        "{}",
        serde_json::json!({ "encoder": encoder.cache_id(), "backend": merge_indexer::BACKEND_NAME, "source": source, "rounds": rounds })
    );
    Ok(())
}
