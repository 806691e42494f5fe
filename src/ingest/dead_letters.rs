//! The dead-letter sender: rejected messages go to `dead-letters` with their key, payload and
//! headers naming the reason and the source position; a batch is applied only once all are acknowledged.

use super::*;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::metrics as names;

/// Sends rejected messages to the dead-letter topic, each with its original key and payload
/// and headers naming the reason and the source position.
#[derive(Clone)]
pub(super) struct DeadLetterSender {
    pub(super) producer: FutureProducer,
    pub(super) topic: String,
    pub(super) group_id: String,
    /// Deliveries refused or failed since the indexer connected (each retry counts), also
    /// exported as `merge_indexer_dead_letter_delivery_failures_total`.
    pub(super) delivery_failures: Arc<std::sync::atomic::AtomicU64>,
}

impl DeadLetterSender {
    /// Sends every dead letter and blocks until Kafka has acknowledged all of them; retries the
    /// failed ones with back-off until they are delivered or `stop` is set (then the batch is not
    /// applied and will be consumed again).
    pub(super) fn deliver_blocking(&self, dead_letters: &[RejectedMessage], stop: &StopSignal) -> anyhow::Result<()> {
        let mut pending: Vec<&RejectedMessage> = dead_letters.iter().collect();
        let mut backoff = Duration::from_millis(100);
        while !pending.is_empty() {
            // All sends first, so the acknowledgements are awaited concurrently.
            let deliveries: Vec<_> = pending.iter().map(|rejected| self.send(rejected)).collect();
            let mut still_pending = Vec::new();
            for (rejected, delivery) in pending.into_iter().zip(deliveries) {
                let acknowledged = delivery.and_then(|delivery| match futures::executor::block_on(delivery) {
                    Ok(Ok(_delivery)) => Ok(()),
                    Ok(Err((error, _message))) => Err(error.to_string()),
                    Err(_canceled) => Err("the producer dropped the delivery report".to_owned()),
                });
                if let Err(error) = acknowledged {
                    metrics::counter!(names::DEAD_LETTER_DELIVERY_FAILURES_TOTAL).increment(1);
                    self.delivery_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%error, topic = %rejected.position.topic, partition = rejected.position.partition,
                        offset = rejected.position.offset, "dead letter delivery failed; retrying");
                    still_pending.push(rejected);
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                break;
            }
            if stop.sleep_unless_stopped(backoff) {
                anyhow::bail!("stopped while {} dead letters were undelivered; the batch will be consumed again", pending.len());
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        Ok(())
    }

    /// Hands one dead letter to the producer; the future resolves on Kafka's acknowledgement.
    pub(super) fn send(&self, rejected: &RejectedMessage) -> Result<rdkafka::producer::DeliveryFuture, String> {
        let position = &rejected.position;
        let partition = position.partition.to_string();
        let offset = position.offset.to_string();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(rejected.invalid.reason.as_str()) })
            .insert(Header { key: "detail", value: Some(rejected.invalid.detail.as_str()) })
            .insert(Header { key: "source_topic", value: Some(&*position.topic) })
            .insert(Header { key: "source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "source_offset", value: Some(offset.as_str()) })
            .insert(Header { key: "dead_lettered_at_ms", value: Some(now_ms.as_str()) })
            .insert(Header { key: "indexer_group_id", value: Some(self.group_id.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &rejected.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &rejected.payload {
            record = record.payload(payload.as_slice());
        }
        self.producer.send_result(record).map_err(|(error, _record)| error.to_string())
    }
}
