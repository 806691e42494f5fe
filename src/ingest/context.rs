//! The consumer's rebalance context: on assignment every partition starts at the offset stored
//! in state (never Kafka's committed offset); it tracks the assigned set and a rebalance generation.

use super::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::metrics as names;
use crate::state::StateStore;

/// Consumer context: positions partitions from state on assignment and tracks what this
/// member owns, so an open batch can drop events of revoked partitions.
pub struct IngestContext {
    pub(super) state: Arc<StateStore>,
    pub(super) assigned: Mutex<BTreeSet<TopicPartition>>,
    pub(super) rebalance_generation: AtomicU64,
}

impl IngestContext {
    pub(super) fn new(state: Arc<StateStore>) -> Self {
        Self { state, assigned: Mutex::new(BTreeSet::new()), rebalance_generation: AtomicU64::new(0) }
    }

    /// The partitions currently assigned to this member.
    pub fn assigned_partitions(&self) -> BTreeSet<TopicPartition> {
        self.assigned.lock().expect("assignment lock").clone()
    }

    /// Incremented on every assignment change.
    pub fn rebalance_generation(&self) -> u64 {
        self.rebalance_generation.load(Ordering::SeqCst)
    }

    pub(super) fn position_from_state(&self, partitions: &mut TopicPartitionList) {
        for (topic, partition) in partition_pairs(partitions) {
            let offset = match self.state.next_offset(&topic, partition) {
                Ok(Some(next)) => Offset::Offset(next),
                Ok(None) => Offset::Beginning,
                Err(error) => {
                    // Kafka's committed offset is never ahead of state (it is committed after
                    // the state write), so falling back to it can only cause duplicates, which
                    // the offset check in state skips.
                    tracing::error!(%topic, partition, %error, "reading stored offset failed; using the committed offset");
                    Offset::Stored
                }
            };
            tracing::debug!(%topic, partition, ?offset, "partition assigned");
            if let Err(error) = partitions.set_partition_offset(&topic, partition, offset) {
                tracing::error!(%topic, partition, %error, "setting the start offset failed");
            }
        }
    }
}

pub(super) fn partition_pairs(partitions: &TopicPartitionList) -> Vec<TopicPartition> {
    partitions.elements().iter().map(|element| (element.topic().to_owned(), element.partition())).collect()
}

impl ClientContext for IngestContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(&self, base_consumer: &BaseConsumer<Self>, error: RDKafkaRespErr, partitions: &mut TopicPartitionList) {
        let cooperative = matches!(base_consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let pairs = partition_pairs(partitions);
        let result = match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(names::REBALANCES_TOTAL, "kind" => "assign").increment(1);
                self.position_from_state(partitions);
                tracing::info!(partitions = pairs.len(), "partitions assigned; positioned at the offsets stored in state");
                self.assigned.lock().expect("assignment lock").extend(pairs);
                if cooperative {
                    base_consumer.incremental_assign(partitions)
                } else {
                    base_consumer.assign(partitions)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(names::REBALANCES_TOTAL, "kind" => "revoke").increment(1);
                let mut assigned = self.assigned.lock().expect("assignment lock");
                for pair in &pairs {
                    tracing::debug!(topic = %pair.0, partition = pair.1, "partition revoked");
                    assigned.remove(pair);
                }
                drop(assigned);
                tracing::info!(partitions = pairs.len(), "partitions revoked; events of open batches for them are dropped");
                if cooperative {
                    base_consumer.incremental_unassign(partitions)
                } else {
                    base_consumer.unassign()
                }
            }
            other => {
                metrics::counter!(names::REBALANCES_TOTAL, "kind" => "error").increment(1);
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.assigned.lock().expect("assignment lock").clear();
                base_consumer.unassign()
            }
        };
        self.rebalance_generation.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = result {
            tracing::error!(%error, "applying the rebalance failed");
        }
    }
}
