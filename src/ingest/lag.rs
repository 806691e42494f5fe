//! Consumer lag: per-partition stored next offset against the broker's high watermark, from two
//! batched ListOffsets requests; the periodic gauge refresher and the caught-up check.

use super::*;
use rustc_hash::FxHashMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::metrics as names;
use crate::state::StateStore;

/// Lag of one partition: high watermark minus the next offset stored in state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset the next produced message will get.
    pub high_watermark: i64,
    /// Next offset to apply (the low watermark when nothing was applied yet).
    pub next_offset: i64,
    /// `high_watermark - next_offset`, at least 0.
    pub lag: i64,
}

impl Indexer {
    /// Lag of every assigned partition (blocking: asks the brokers for watermarks).
    pub fn partition_lags(&self) -> anyhow::Result<Vec<PartitionLag>> {
        partition_lags(&self.consumer, &self.state)
    }

    /// [`Indexer::partition_lags`] on a blocking thread, so the async runtime keeps running
    /// while the broker answers.
    pub async fn partition_lags_async(&self) -> anyhow::Result<Vec<PartitionLag>> {
        let consumer = Arc::clone(&self.consumer);
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || partition_lags(&consumer, &state)).await?
    }

    pub(super) async fn is_caught_up(&self) -> anyhow::Result<bool> {
        if self.assigned_partitions().is_empty() {
            return Ok(false);
        }
        let consumer = Arc::clone(&self.consumer);
        let state = Arc::clone(&self.state);
        let lags = tokio::task::spawn_blocking(move || partition_lags(&consumer, &state)).await??;
        Ok(lags.iter().all(|lag| lag.lag == 0))
    }

    pub(super) fn spawn_lag_refresher(&self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let consumer = Arc::clone(&self.consumer);
        let state = Arc::clone(&self.state);
        let interval = Duration::from_millis(self.config.kafka.lag_refresh_interval_ms.max(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
                let consumer = Arc::clone(&consumer);
                let state = Arc::clone(&state);
                match tokio::task::spawn_blocking(move || partition_lags(&consumer, &state)).await {
                    Ok(Ok(lags)) => {
                        for lag in lags {
                            metrics::gauge!(names::CONSUMER_LAG_MESSAGES, "topic" => lag.topic, "partition" => lag.partition.to_string())
                                .set(lag.lag as f64);
                        }
                    }
                    Ok(Err(error)) => tracing::warn!(%error, "refreshing consumer lag failed"),
                    Err(error) => tracing::warn!(%error, "lag task failed"),
                }
            }
        })
    }
}

/// Lag of every assigned partition. The watermarks of all partitions come from two batched
/// ListOffsets round trips (earliest, latest), not two per partition: per-partition queries to
/// 80 partitions took ~30 s against the embedded broker and, made when a batch came back empty,
/// held the consume loop for that long (a stall seen in `bench ingest`).
pub(super) fn partition_lags(consumer: &StreamConsumer<IngestContext>, state: &StateStore) -> anyhow::Result<Vec<PartitionLag>> {
    let assigned = consumer.context().assigned_partitions();
    if assigned.is_empty() {
        return Ok(Vec::new());
    }
    let low_watermarks = list_offsets(consumer, &assigned, Offset::Beginning)?;
    let high_watermarks = list_offsets(consumer, &assigned, Offset::End)?;
    let mut lags = Vec::with_capacity(assigned.len());
    for (topic, partition) in assigned {
        let key = (topic, partition);
        let (Some(&low_watermark), Some(&high_watermark)) = (low_watermarks.get(&key), high_watermarks.get(&key)) else {
            anyhow::bail!("the broker returned no watermark for {}/{}", key.0, key.1);
        };
        let (topic, partition) = key;
        let next_offset = state.next_offset(&topic, partition)?.unwrap_or(low_watermark).max(low_watermark);
        lags.push(PartitionLag { topic, partition, high_watermark, next_offset, lag: (high_watermark - next_offset).max(0) });
    }
    Ok(lags)
}

/// The earliest (`Offset::Beginning`) or latest (`Offset::End`) offset of each of `partitions`,
/// in one ListOffsets request per broker.
pub(super) fn list_offsets(consumer: &StreamConsumer<IngestContext>, partitions: &BTreeSet<TopicPartition>, which: Offset) -> anyhow::Result<FxHashMap<(String, i32), i64>> {
    debug_assert!(matches!(which, Offset::Beginning | Offset::End));
    let mut request = TopicPartitionList::with_capacity(partitions.len());
    for (topic, partition) in partitions {
        request.add_partition_offset(topic, *partition, which).with_context(|| format!("listing offsets of {topic}/{partition}"))?;
    }
    let answer = consumer.offsets_for_times(request, Duration::from_secs(5)).context("listing partition offsets")?;
    let mut offsets = FxHashMap::default();
    for element in answer.elements() {
        element.error().with_context(|| format!("listing offsets of {}/{}", element.topic(), element.partition()))?;
        let Offset::Offset(offset) = element.offset() else {
            anyhow::bail!("the broker answered {:?} for {}/{}", element.offset(), element.topic(), element.partition());
        };
        offsets.insert((element.topic().to_owned(), element.partition()), offset);
    }
    Ok(offsets)
}
