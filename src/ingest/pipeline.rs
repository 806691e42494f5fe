//! The pipeline threads behind the consume loop: a preparer (decode, validate, group by key) and
//! the state writer, joined by bounded channels, with a stop signal for shutdown and errors.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::state::{PreparedBatch, StateStore};

/// When the pipeline threads should stop waiting: the run's shutdown request, or the pipeline
/// being closed (after an error, when nobody will take its results any more).
#[derive(Debug, Clone)]
pub(super) struct StopSignal {
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) abandoned: Arc<AtomicBool>,
}

impl StopSignal {
    pub(super) fn is_set(&self) -> bool {
        *self.shutdown.borrow() || self.abandoned.load(Ordering::Acquire)
    }

    /// Sleeps for `duration`, checking the signal every 20 ms; true when it was set.
    pub(super) fn sleep_unless_stopped(&self, duration: Duration) -> bool {
        crate::sleep_unless_stopped(duration, Duration::from_millis(20), || self.is_set())
    }
}

/// What the pipeline hands back per batch.
pub(super) struct AppliedBatch {
    /// The write's report (with the records counted by outcome), or why the batch was not
    /// written.
    pub(super) report: anyhow::Result<crate::state::BatchReport>,
    /// How long the RocksDB write took.
    pub(super) write_duration: Duration,
    /// When the write completed.
    pub(super) completed: Instant,
    /// CPU time the `batch-preparer` thread spent on the batch (decode, dead letters, prepare).
    pub(super) prepare_cpu: Duration,
    /// CPU time the `state-writer` thread spent on the batch.
    pub(super) write_cpu: Duration,
}

/// A batch on its way from the preparer to the writer, with the preparer's CPU time for it.
pub(super) type PreparedHandoff = (anyhow::Result<PreparedBatch>, Duration);

/// The batch pipeline behind the consumer task: two threads, strictly in submission order.
/// `batch-preparer` decodes and validates each [`RawBatch`], delivers its dead letters (a batch
/// is written only after Kafka acknowledged them), then encodes product values, keys judgements
/// and sorts ([`PreparedBatch::prepare`]); `state-writer` reads, folds and writes it
/// ([`StateStore::apply_prepared`]). The consumer task meanwhile polls and copies the next
/// batches, so the three stages overlap and, on a machine with fewer cores than stages, the
/// scheduler gives idle time to whichever stage has work.
pub(super) struct BatchPipeline {
    pub(super) batches: Option<std::sync::mpsc::Sender<RawBatch>>,
    pub(super) applied: tokio::sync::mpsc::UnboundedReceiver<AppliedBatch>,
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
    pub(super) abandoned: Arc<AtomicBool>,
    /// Batches submitted and not yet taken back with [`BatchPipeline::take_applied`].
    pub(super) in_flight: usize,
}

impl BatchPipeline {
    pub(super) fn start(
        state: Arc<StateStore>,
        mapping: crate::events::RelevanceMapping,
        decoder: BatchDecoder,
        dead_letters: DeadLetterSender,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let (batches, pending) = std::sync::mpsc::channel::<RawBatch>();
        let (prepared_sender, prepared) = std::sync::mpsc::channel::<PreparedHandoff>();
        let (applied_sender, applied) = tokio::sync::mpsc::unbounded_channel();
        // Written batches go back to the preparer to be freed: their records were allocated
        // there, so freeing them there is the allocator's fast path, and the writer (the
        // pipeline's bottleneck) spent ~18 % of its time in those frees (perf, 2026-11-26).
        let (spent_sender, spent) = std::sync::mpsc::channel::<PreparedBatch>();
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = StopSignal { shutdown, abandoned: Arc::clone(&abandoned) };
        let preparer = std::thread::Builder::new()
            .name("batch-preparer".into())
            .spawn(move || {
                for raw in pending {
                    let cpu_before = crate::metrics::thread_cpu_time();
                    spent.try_iter().for_each(drop);
                    let (records, rejected) = decoder.decode(&raw);
                    drop(raw);
                    let prepared = dead_letters.deliver_blocking(&rejected, &stop).map(|()| PreparedBatch::prepare(records));
                    // A batch whose dead letters could not be delivered stops the pipeline: a
                    // later batch's offsets would otherwise cover its events.
                    let failed = prepared.is_err();
                    let prepare_cpu = crate::metrics::thread_cpu_time().saturating_sub(cpu_before);
                    if prepared_sender.send((prepared, prepare_cpu)).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the batch preparer thread")?;
        let writer = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                for (prepared, prepare_cpu) in prepared {
                    let (started, cpu_before) = (Instant::now(), crate::metrics::thread_cpu_time());
                    let report = prepared.and_then(|batch| Ok((state.apply_prepared(&batch, &mapping)?, batch)));
                    let (write_duration, completed) = (started.elapsed(), Instant::now());
                    // After a failed batch no later batch may land: its offsets would cover the
                    // failed batch's events. The consumer task stops on the error it receives.
                    let failed = report.is_err();
                    let report = report.map(|(report, batch)| {
                        // Once the preparer has stopped, the batch is dropped here instead.
                        let _ = spent_sender.send(batch);
                        report
                    });
                    let write_cpu = crate::metrics::thread_cpu_time().saturating_sub(cpu_before);
                    let applied = AppliedBatch { report, write_duration, completed, prepare_cpu, write_cpu };
                    if applied_sender.send(applied).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the state writer thread")?;
        Ok(Self { batches: Some(batches), applied, threads: vec![preparer, writer], abandoned, in_flight: 0 })
    }

    pub(super) fn submit(&mut self, batch: RawBatch) -> anyhow::Result<()> {
        let sender = self.batches.as_ref().context("the batch pipeline is closed")?;
        sender.send(batch).map_err(|_| anyhow::anyhow!("the batch pipeline has stopped"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// The next written batch: waits for it when `wait`, else only takes one already written.
    pub(super) async fn take_applied(&mut self, wait: bool) -> anyhow::Result<Option<AppliedBatch>> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let applied = if wait {
            self.applied.recv().await.context("the batch pipeline has stopped")?
        } else {
            match self.applied.try_recv() {
                Ok(applied) => applied,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => anyhow::bail!("the batch pipeline has stopped"),
            }
        };
        self.in_flight -= 1;
        Ok(Some(applied))
    }

    /// Stops the threads once they have finished what was submitted; a dead-letter delivery
    /// still retrying gives up.
    pub(super) fn close(&mut self) {
        self.abandoned.store(true, Ordering::Release);
        self.batches = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a batch pipeline thread panicked");
            }
        }
    }
}

impl Drop for BatchPipeline {
    fn drop(&mut self) {
        self.close();
    }
}
