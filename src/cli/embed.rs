//! `merge-indexer embed`: text (or product events) on stdin → one JSON vector per line on stdout.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use merge_indexer::config::Config;
use merge_indexer::encoder::{build_encoder, EncoderKind};

/// `embed` flags.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The encoder [default: the configured one, hashing unless set].
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderKind>,
    /// MiniLM model directory [default: encoder.model_dir, $MERGE_INDEXER_MODEL_DIR or models/all-MiniLM-L6-v2].
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Texts per encoder call [default: encoder.batch_size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Render each input line, read as a product JSON event, as product text first.
    #[arg(long)]
    pub products: bool,
    /// Accepted for symmetry with the other commands; `embed` does not touch state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

pub(super) fn embed_command(mut config: Config, arguments: &EmbedArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    if let Some(model_dir) = &arguments.model_dir {
        config.encoder.model_dir = Some(model_dir.clone());
    }
    let encoder = build_encoder(&config.encoder)?;
    let batch_size = arguments.batch_size.unwrap_or(config.encoder.batch_size).max(1);
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut pending: Vec<String> = Vec::with_capacity(batch_size);
    let flush = |pending: &mut Vec<String>, stdout: &mut std::io::BufWriter<std::io::StdoutLock<'_>>| -> anyhow::Result<()> {
        let texts: Vec<&str> = pending.iter().map(String::as_str).collect();
        for vector in encoder.encode(&texts)? {
            serde_json::to_writer(&mut *stdout, &vector)?;
            stdout.write_all(b"\n")?;
        }
        pending.clear();
        Ok(())
    };
    for (number, line) in stdin.lines().enumerate() {
        let line = line.with_context(|| format!("reading stdin line {}", number + 1))?;
        let text = if arguments.products {
            let event = merge_indexer::events::decode_product_event(None, Some(line.as_bytes()), &config.validation)
                .map_err(|invalid| anyhow::anyhow!("line {}: {}: {}", number + 1, invalid.reason, invalid.detail))?;
            match event {
                merge_indexer::events::ProductEvent::Upsert { content, .. } => merge_indexer::encoder::product_text(&content, &config.encoder.text),
                merge_indexer::events::ProductEvent::Delete { product_id } => bail!("line {}: delete of {product_id} has no text", number + 1),
            }
        } else {
            line
        };
        pending.push(text);
        if pending.len() >= batch_size {
            flush(&mut pending, &mut stdout)?;
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut stdout)?;
    }
    stdout.flush()?;
    Ok(())
}
