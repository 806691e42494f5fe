//! `merge-indexer train-docids`: MERGE DocIDs trained on the graded ESCI folder or on state,
//! stored in state with their model and a report.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use merge_indexer::config::Config;
use merge_indexer::encoder::{build_encoder, EncoderKind};
use merge_indexer::service::progress::epoch_progress;
use merge_indexer::state::StateStore;

use merge_indexer::docid::esci::EsciTrainingData;
use merge_indexer::docid::incremental::DocIdModelManifest;

/// `train-docids` flags.
#[derive(Debug, Args)]
pub struct TrainDocidsArgs {
    /// The graded ESCI folder (`products.jsonl`, `judgments_train.csv`) [default:
    /// $MERGE_INDEXER_ESCI_GRADED_DIR or ../shared/data/esci-graded]. Only train judgements are used.
    #[arg(long, conflicts_with = "from_state")]
    pub data: Option<PathBuf>,
    /// Train on what the indexer stored instead: every product with a vector under the
    /// configured encoder and the graded judgements in state (stop the indexer first).
    #[arg(long)]
    pub from_state: bool,
    /// State directory the DocIDs are written to [default: ./state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Loss variant.
    #[arg(long, value_enum, default_value = "merge")]
    pub variant: merge_indexer::docid::train::Variant,
    /// Epochs [default: the paper's 300].
    #[arg(long, default_value_t = 300)]
    pub epochs: usize,
    /// Anchor documents per batch [default: the paper's 2048].
    #[arg(long, default_value_t = 2048)]
    pub batch_size: usize,
    /// Encoder of the product embeddings [default: the configured one, hashing unless set].
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderKind>,
    /// Clip each parameter's gradient to this L2 norm before the AdamW step [default: none, as
    /// in the paper].
    #[arg(long)]
    pub grad_clip_norm: Option<f64>,
    /// Where the report is written as JSON.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// Where the trained model goes: rqvae.safetensors, its training config (config.json) and
    /// manifest.json (the encoder it reads) [default: `docids.model_dir`, else
    /// <state-dir>/docid-model]. `run` and `demo` assign new products DocIDs with it.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
}

pub(super) fn train_docids_command(config: Config, arguments: &TrainDocidsArgs) -> anyhow::Result<()> {
    use merge_indexer::docid::model::RqVaeConfig;
    use merge_indexer::docid::train::DocIdTrainingConfig;
    let encoder = build_encoder(&config.encoder)?;
    let state = StateStore::open(&config.state_dir, &config.state)
        .with_context(|| format!("opening the state in {} (a running indexer holds it: stop it first)", config.state_dir.display()))?;
    let (data, test_queries) = if arguments.from_state {
        let set = merge_indexer::docid::train::TrainingSet::from_state(&state, encoder.cache_id())?;
        println!(
            "read {} products with {} vectors and {} graded queries from {} ({} products without a vector yet are left out)",
            set.product_ids.len(),
            encoder.cache_id(),
            set.queries.len(),
            config.state_dir.display(),
            set.products_without_vector
        );
        (set, Vec::new())
    } else {
        let directory = arguments.data.clone().unwrap_or_else(merge_indexer::eval::datasets::default_esci_graded_dir);
        let esci = EsciTrainingData::load(&directory, encoder.as_ref(), &config.encoder.text, config.encoder.batch_size.max(1) * 4)?;
        (esci.set, esci.test_queries)
    };
    anyhow::ensure!(!data.embeddings.is_empty(), "no products with vectors to train on");
    let model = RqVaeConfig::new(encoder.dimension());
    let training = DocIdTrainingConfig::new(model)
        .with_variant(arguments.variant)
        .with_epochs(arguments.epochs)
        .with_batch_size(arguments.batch_size)
        .with_gradient_clip_norm(arguments.grad_clip_norm);
    let (queries, validation_queries) = merge_indexer::docid::train::split_validation(data.queries, training.validation_fraction, training.seed);
    println!(
        "training {:?} on {} products, {} train queries ({} more held out for validation), {} epochs",
        arguments.variant,
        data.embeddings.len(),
        queries.len(),
        validation_queries.len(),
        arguments.epochs
    );
    let model_dir = arguments.model_dir.clone().unwrap_or_else(|| config.docid_model_dir());
    let manifest = DocIdModelManifest::for_training(encoder.as_ref(), arguments.variant, data.embeddings.len(), arguments.epochs);
    let (progress, on_epoch) = epoch_progress(arguments.epochs);
    let (docids, report) =
        merge_indexer::docid::incremental::train_and_store(&state, &data.product_ids, &data.embeddings, &queries, &training, &manifest, &model_dir, on_epoch)?;
    progress.finish();
    let levels = report.unique_tokens_per_layer.len();
    let unique_tokens_test = merge_indexer::docid::train::unique_tokens_per_layer(&docids, &test_queries, levels);
    let unique_tokens_validation = merge_indexer::docid::train::unique_tokens_per_layer(&docids, &validation_queries, levels);
    let mut report_value = serde_json::to_value(&report)?;
    report_value["unique_tokens_per_layer_test"] = serde_json::json!(unique_tokens_test);
    report_value["unique_tokens_per_layer_validation"] = serde_json::json!(unique_tokens_validation);
    report_value["validation_queries"] = serde_json::json!(validation_queries.len());
    report_value["train_queries"] = serde_json::json!(queries.len());
    report_value["test_queries"] = serde_json::json!(test_queries.len());
    report_value["encoder"] = serde_json::json!(encoder.cache_id());
    report_value["source"] = serde_json::json!(if arguments.from_state { "state" } else { "esci-graded" });
    let report_json = serde_json::to_string_pretty(&report_value)?;
    if let Some(path) = &arguments.report_json {
        std::fs::write(path, &report_json)?;
    }
    println!(
        "DocIDs: {} products, collisions before {} after {} (moved within prefix {}, up {}); utilisation per level {:?}; unique tokens per layer (Table 3) train {:?} validation {:?} test {:?}; {:.3} s/step",
        docids.len(),
        report.collisions_before,
        report.collisions_after,
        report.assignment.reassigned_in_prefix,
        report.assignment.moved_up,
        report.utilisation_per_level.iter().map(|value| format!("{value:.3}")).collect::<Vec<_>>(),
        report.unique_tokens_per_layer.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
        unique_tokens_validation.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
        unique_tokens_test.iter().map(|value| format!("{value:.2}")).collect::<Vec<_>>(),
        report.seconds_per_step
    );
    println!("stored in {}; model, config and manifest in {}", config.state_dir.display(), model_dir.display());
    Ok(())
}
