//! DocIDs between retrains: a trained RQ-VAE saved as a model directory, and the worker that
//! gives every new product a DocID as soon as its vector exists — quantize with the saved
//! model, resolve against the stored DocIDs, persist both directions and dequeue in one atomic
//! write ([`crate::state::StateStore::assign_docids`]).
//!
//! A model directory holds `config.json` (the [`DocIdTrainingConfig`], model shape included),
//! `rqvae.safetensors` (the weights) and `manifest.json` ([`DocIdModelManifest`]: which encoder's
//! vectors the model reads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::config::Config as _;
use burn::store::{ModuleSnapshot, SafetensorsStore};

use super::assign::{CodeSpace, DocumentCodes};
use super::model::RqVae;
use super::train::{quantize_documents, DocIdTrainingConfig, Variant};
use crate::encoder::InferenceBackend;
use crate::metrics as names;
use crate::state::{DocIdPlacement, StateError, StateStore};

/// File name of the training configuration in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights in a model directory.
pub const WEIGHTS_FILE: &str = "rqvae.safetensors";
/// File name of the manifest in a model directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Version of [`DocIdModelManifest`]'s layout.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// What a saved DocID model was trained on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DocIdModelManifest {
    /// [`MANIFEST_FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// Cache id of the encoder whose vectors the model reads (`TextEncoder::cache_id`).
    pub encoder_cache_id: String,
    /// Model name of that encoder.
    pub encoder_model: String,
    /// Width of those vectors.
    pub embedding_dimension: usize,
    /// Loss variant trained.
    pub variant: Variant,
    /// Documents it was trained on.
    pub trained_documents: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// When it was written (seconds since the Unix epoch).
    pub created_unix_seconds: u64,
}

impl DocIdModelManifest {
    /// The manifest of a model trained now, with `variant` for `epochs`, on `documents` vectors of
    /// `encoder`.
    pub fn for_training(encoder: &dyn crate::encoder::TextEncoder, variant: Variant, documents: usize, epochs: usize) -> Self {
        Self {
            format_version: MANIFEST_FORMAT_VERSION,
            encoder_cache_id: encoder.cache_id().to_owned(),
            encoder_model: encoder.model_name().to_owned(),
            embedding_dimension: encoder.dimension(),
            variant,
            trained_documents: documents,
            epochs,
            created_unix_seconds: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0),
        }
    }
}

/// Errors loading or saving a DocID model directory.
#[derive(Debug, thiserror::Error)]
pub enum DocIdModelError {
    /// A file is missing or unreadable.
    #[error("DocID model file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is present but not valid.
    #[error("DocID model file {path} is invalid: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The model reads another encoder's vectors than the indexer computes.
    #[error("the DocID model in {model_dir} reads vectors of encoder {model_encoder}, but the indexer encodes with {configured_encoder}: retrain it (`merge-indexer train-docids`) or configure that encoder")]
    EncoderMismatch {
        /// The model directory.
        model_dir: PathBuf,
        /// The encoder in its manifest.
        model_encoder: String,
        /// The encoder configured now.
        configured_encoder: String,
    },
}

/// A trained RQ-VAE ready to quantize vectors on the inference backend.
#[derive(Debug)]
pub struct DocIdModel {
    /// Where it was loaded from.
    pub directory: PathBuf,
    /// What it was trained on.
    pub manifest: DocIdModelManifest,
    /// How it was trained (model shape included).
    pub training: DocIdTrainingConfig,
    model: RqVae<InferenceBackend>,
    device: burn::tensor::Device<InferenceBackend>,
}

impl DocIdModel {
    /// Writes `model` with its configuration and manifest as `directory`, replacing any model
    /// there: the files are written to a sibling directory first and renamed into place, so a
    /// reader (or a crash) sees the old model or the new one, never a mix.
    pub fn save<B: burn::tensor::backend::Backend>(
        directory: &Path,
        manifest: &DocIdModelManifest,
        training: &DocIdTrainingConfig,
        model: &RqVae<B>,
    ) -> Result<(), DocIdModelError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DocIdModelError::Io { path, source }
        };
        let name = directory.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "docid-model".into());
        let parent = directory.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let partial = parent.join(format!(".{name}.partial"));
        let previous = parent.join(format!(".{name}.previous"));
        for leftover in [&partial, &previous] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover).map_err(io(leftover))?;
            }
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let config_path = partial.join(CONFIG_FILE);
        training.save(&config_path).map_err(io(&config_path))?;
        let weights_path = partial.join(WEIGHTS_FILE);
        let mut store = SafetensorsStore::from_file(&weights_path);
        model
            .save_into(&mut store)
            .map_err(|error| DocIdModelError::Invalid { path: weights_path.clone(), detail: format!("saving: {error}") })?;
        let manifest_path = partial.join(MANIFEST_FILE);
        let manifest_json = serde_json::to_vec_pretty(manifest).expect("the manifest serialises");
        std::fs::write(&manifest_path, manifest_json).map_err(io(&manifest_path))?;
        if directory.exists() {
            std::fs::rename(directory, &previous).map_err(io(directory))?;
        }
        std::fs::rename(&partial, directory).map_err(io(directory))?;
        if previous.exists() {
            std::fs::remove_dir_all(&previous).map_err(io(&previous))?;
        }
        Ok(())
    }

    /// Loads a model directory written by [`DocIdModel::save`]. Every weight tensor must be
    /// present with its configured shape.
    pub fn load(directory: &Path) -> Result<Self, DocIdModelError> {
        let manifest_path = directory.join(MANIFEST_FILE);
        let manifest_bytes = std::fs::read(&manifest_path).map_err(|source| DocIdModelError::Io { path: manifest_path.clone(), source })?;
        let manifest: DocIdModelManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|error| DocIdModelError::Invalid { path: manifest_path.clone(), detail: error.to_string() })?;
        if manifest.format_version != MANIFEST_FORMAT_VERSION {
            return Err(DocIdModelError::Invalid {
                path: manifest_path,
                detail: format!("format version {} (this build reads {MANIFEST_FORMAT_VERSION})", manifest.format_version),
            });
        }
        let config_path = directory.join(CONFIG_FILE);
        let training = DocIdTrainingConfig::load(&config_path).map_err(|error| DocIdModelError::Invalid { path: config_path.clone(), detail: error.to_string() })?;
        if training.model.input_dim != manifest.embedding_dimension {
            return Err(DocIdModelError::Invalid {
                path: config_path,
                detail: format!("input width {} but the manifest says {}-dimensional vectors", training.model.input_dim, manifest.embedding_dimension),
            });
        }
        let device = burn::tensor::Device::<InferenceBackend>::default();
        let mut model: RqVae<InferenceBackend> = training.model.init(&device, training.seed);
        let weights_path = directory.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(DocIdModelError::Io { path: weights_path, source: std::io::Error::from(std::io::ErrorKind::NotFound) });
        }
        let mut store = SafetensorsStore::from_file(&weights_path).validate(true).allow_partial(false);
        let result = model.load_from(&mut store).map_err(|error| DocIdModelError::Invalid { path: weights_path.clone(), detail: error.to_string() })?;
        if !result.missing.is_empty() || !result.errors.is_empty() {
            return Err(DocIdModelError::Invalid {
                path: weights_path,
                detail: format!("missing tensors {:?}, errors {:?}", result.missing, result.errors),
            });
        }
        Ok(Self { directory: directory.to_owned(), manifest, training, model, device })
    }

    /// Fails unless the model reads the vectors of the encoder with cache id `encoder_cache_id`.
    pub fn check_encoder(&self, encoder_cache_id: &str) -> Result<(), DocIdModelError> {
        if self.manifest.encoder_cache_id == encoder_cache_id {
            return Ok(());
        }
        Err(DocIdModelError::EncoderMismatch {
            model_dir: self.directory.clone(),
            model_encoder: self.manifest.encoder_cache_id.clone(),
            configured_encoder: encoder_cache_id.to_owned(),
        })
    }

    /// The DocID space: levels × codebook size.
    pub fn space(&self) -> CodeSpace {
        CodeSpace { levels: self.training.model.levels, codebook_size: self.training.model.codebook_size }
    }

    /// Codes and last-level costs of each vector.
    ///
    /// # Shapes
    /// - `embeddings`: `n` vectors of `input_dim` → `n` × (`levels` codes, `codebook_size` costs)
    pub fn quantize(&self, embeddings: &[Vec<f32>]) -> Vec<DocumentCodes> {
        if embeddings.is_empty() {
            return Vec::new();
        }
        debug_assert!(embeddings.iter().all(|vector| vector.len() == self.training.model.input_dim));
        let rows: Vec<usize> = (0..embeddings.len()).collect();
        quantize_documents(&self.model, embeddings, &rows, &self.device)
    }
}

/// Trains a model on `embeddings` (product `product_ids[i]` has `embeddings[i]`) and `queries`,
/// replaces the stored product ↔ DocID map with its collision-free DocIDs in one write, and saves
/// the model with `manifest` into `model_dir`, from where `run` assigns new products. Run it
/// while no DocID worker is using the state (the indexer stopped, or before it starts one).
/// `on_epoch` sees each epoch's mean loss terms.
#[allow(clippy::too_many_arguments)]
pub fn train_and_store(
    state: &StateStore,
    product_ids: &[String],
    embeddings: &[Vec<f32>],
    queries: &[super::train::TrainingQuery],
    training: &DocIdTrainingConfig,
    manifest: &DocIdModelManifest,
    model_dir: &Path,
    on_epoch: impl FnMut(usize, &super::train::LossTerms),
) -> anyhow::Result<(Vec<super::DocId>, super::train::DocIdReport)> {
    debug_assert_eq!(product_ids.len(), embeddings.len());
    let device = burn::tensor::Device::<InferenceBackend>::default();
    let (docids, report, model) = super::train::train_docids::<burn::backend::Autodiff<InferenceBackend>>(training, embeddings, queries, &device, on_epoch)?;
    let pairs: Vec<(String, super::DocId)> = product_ids.iter().cloned().zip(docids.iter().cloned()).collect();
    state.replace_docids(&pairs)?;
    DocIdModel::save(model_dir, manifest, training, &model)?;
    Ok((docids, report))
}

/// What one pass of the DocID worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DocIdPassReport {
    /// Products placed, by how.
    pub placements: BTreeMap<&'static str, u64>,
    /// Queued products whose vector is not computed yet (left queued).
    pub waiting_for_vector: u64,
}

impl DocIdPassReport {
    fn add(&mut self, other: &Self) {
        for (placement, count) in &other.placements {
            *self.placements.entry(placement).or_default() += count;
        }
        self.waiting_for_vector += other.waiting_for_vector;
    }

    /// Products that got a new DocID.
    pub fn newly_assigned(&self) -> u64 {
        [DocIdPlacement::QuantizerCodes, DocIdPlacement::LastLevelResolved, DocIdPlacement::Overflow]
            .iter()
            .map(|placement| self.placements.get(placement.as_str()).copied().unwrap_or(0))
            .sum()
    }

    /// Whether the pass changed anything in state.
    fn made_progress(&self) -> bool {
        self.placements.iter().any(|(placement, count)| *count > 0 && *placement != DocIdPlacement::SpaceFull.as_str())
    }
}

/// How often the DocID worker refreshes `merge_indexer_docid_queue_products` (an exact key
/// scan of the queue).
pub const QUEUE_GAUGE_REFRESH: Duration = Duration::from_secs(10);

/// Assigns DocIDs to the products in the DocID queue whose vectors exist.
#[derive(Debug)]
pub struct DocIdWorker {
    state: Arc<StateStore>,
    model: Arc<DocIdModel>,
    encoder_cache_id: String,
    page_size: usize,
}

impl DocIdWorker {
    /// A worker reading vectors of encoder `encoder_cache_id` (checked against the model).
    pub fn new(state: Arc<StateStore>, model: Arc<DocIdModel>, encoder_cache_id: &str, page_size: usize) -> Result<Self, DocIdModelError> {
        model.check_encoder(encoder_cache_id)?;
        Ok(Self { state, model, encoder_cache_id: encoder_cache_id.to_owned(), page_size: page_size.max(1) })
    }

    /// Works through the whole queue once, page by page.
    pub fn drain(&self) -> Result<DocIdPassReport, StateError> {
        let mut report = DocIdPassReport::default();
        let mut after: Option<String> = None;
        loop {
            let page = self.state.docid_queue_page(after.as_deref(), self.page_size)?;
            let Some(last) = page.last() else {
                return Ok(report);
            };
            after = Some(last.clone());
            report.add(&self.process_page(page)?);
        }
    }

    fn process_page(&self, page: Vec<String>) -> Result<DocIdPassReport, StateError> {
        let mut report = DocIdPassReport::default();
        let mut product_ids = Vec::with_capacity(page.len());
        let mut vectors = Vec::with_capacity(page.len());
        let mut gone = Vec::new();
        for product_id in page {
            match self.state.product_embedding(&product_id, &self.encoder_cache_id)? {
                Some(vector) if vector.len() == self.model.training.model.input_dim => {
                    product_ids.push(product_id);
                    vectors.push(vector);
                }
                Some(vector) => {
                    tracing::error!(product_id, width = vector.len(), expected = self.model.training.model.input_dim, "stored vector has the wrong width; left queued");
                    report.waiting_for_vector += 1;
                }
                None if !self.state.contains_product(&product_id)? => gone.push(product_id),
                None => report.waiting_for_vector += 1,
            }
        }
        let started = Instant::now();
        let codes = self.model.quantize(&vectors);
        let mut documents: Vec<(String, DocumentCodes)> = product_ids.into_iter().zip(codes).collect();
        // A product deleted while queued: dequeued by the same call (it places nothing).
        let placeholder = DocumentCodes { codes: vec![0; self.model.space().levels], last_level_costs: vec![0.0; self.model.space().codebook_size] };
        documents.extend(gone.into_iter().map(|product_id| (product_id, placeholder.clone())));
        if documents.is_empty() {
            return Ok(report);
        }
        let outcomes = self.state.assign_docids(&documents, self.model.space())?;
        metrics::histogram!(names::DOCID_ASSIGNMENT_BATCH_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        for (placement, _) in &outcomes {
            *report.placements.entry(placement.as_str()).or_default() += 1;
            metrics::counter!(names::DOCID_ASSIGNMENTS_TOTAL, "placement" => placement.as_str()).increment(1);
            if *placement == DocIdPlacement::SpaceFull {
                tracing::error!("no free DocID left in the code space; products stay queued until a retrain with a larger space");
            }
        }
        tracing::debug!(placed = outcomes.len(), waiting = report.waiting_for_vector, "DocID page done");
        Ok(report)
    }

    /// Runs [`DocIdWorker::drain`] on its own thread until `stop` is set. After a pass that
    /// changed nothing it pauses `idle_poll`, doubling the pause after each further idle pass up
    /// to 25 × `idle_poll` (a long queue of products still waiting for vectors is then not
    /// re-read five times a second); any progress resets it. A state error is logged and
    /// retried after 5 s.
    pub fn spawn(self, stop: Arc<AtomicBool>, idle_poll: Duration) -> std::io::Result<JoinHandle<DocIdPassReport>> {
        std::thread::Builder::new().name("docid-assign".into()).spawn(move || {
            let mut total = DocIdPassReport::default();
            let longest_pause = idle_poll * 25;
            let mut pause = idle_poll;
            let mut queue_counted_at: Option<Instant> = None;
            while !stop.load(Ordering::Acquire) {
                match self.drain() {
                    Ok(report) => {
                        total.add(&report);
                        // The gauge is an exact key scan: refreshed at most every
                        // QUEUE_GAUGE_REFRESH, so a queue of millions of products waiting for
                        // vectors is not scanned after every page.
                        if queue_counted_at.is_none_or(|counted| counted.elapsed() >= QUEUE_GAUGE_REFRESH) {
                            if let Ok(queued) = self.state.docid_queue_len() {
                                metrics::gauge!(names::DOCID_QUEUE_PRODUCTS).set(queued as f64);
                            }
                            queue_counted_at = Some(Instant::now());
                        }
                        if report.made_progress() {
                            pause = idle_poll;
                        } else {
                            sleep_unless_stopped(pause, &stop);
                            pause = (pause * 2).min(longest_pause);
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "DocID worker failed; retrying in 5 s");
                        std::thread::sleep(Duration::from_secs(5));
                    }
                }
            }
            total
        })
    }
}

/// Sleeps `pause` in 50 ms slices, returning early once `stop` is set (so shutdown never waits
/// out a long idle pause).
fn sleep_unless_stopped(pause: Duration, stop: &AtomicBool) {
    crate::sleep_unless_stopped(pause, Duration::from_millis(50), || stop.load(Ordering::Acquire));
}

/// The running DocID worker.
#[derive(Debug)]
pub struct DocIdAssigner {
    stop: Arc<AtomicBool>,
    worker: JoinHandle<DocIdPassReport>,
    /// The model it assigns with.
    pub model: Arc<DocIdModel>,
}

impl DocIdAssigner {
    /// Queues every stored product without a DocID and starts the worker.
    pub fn start(state: &Arc<StateStore>, model: DocIdModel, encoder_cache_id: &str, page_size: usize, idle_poll: Duration) -> anyhow::Result<Self> {
        let model = Arc::new(model);
        let worker = DocIdWorker::new(Arc::clone(state), Arc::clone(&model), encoder_cache_id, page_size)?;
        let queued = state.enqueue_missing_docids()?;
        tracing::info!(model_dir = %model.directory.display(), queued, variant = ?model.manifest.variant, "DocID assignment starting");
        let stop = Arc::new(AtomicBool::new(false));
        let worker = worker.spawn(Arc::clone(&stop), idle_poll)?;
        Ok(Self { stop, worker, model })
    }

    /// Whether the worker thread has ended (it only ends when stopped or on a panic).
    pub fn is_finished(&self) -> bool {
        self.worker.is_finished()
    }

    /// Stops the worker after its current page; returns what it did in total.
    pub fn stop(self) -> DocIdPassReport {
        self.stop.store(true, Ordering::Release);
        self.worker.join().unwrap_or_else(|_| {
            tracing::error!("the DocID worker panicked");
            DocIdPassReport::default()
        })
    }
}
