//! Micro-batches as consumed: raw messages copied into one buffer per batch, and their decoding
//! into state records or rejected messages bound for the dead-letter topic.

use std::ops::Range;
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message};

use crate::config::Config;
use crate::events::{decode_product_event, decode_query_event, InvalidEvent};
use crate::state::{DecodedRecord, SourcePosition, SourcedRecord};

/// A message rejected by validation, with the bytes the dead letter carries.
pub(super) struct RejectedMessage {
    pub(super) position: SourcePosition,
    pub(super) invalid: InvalidEvent,
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Option<Vec<u8>>,
}

/// Which of the two subscribed topics a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum SubscribedTopic {
    Products,
    QueryEvents,
}

impl SubscribedTopic {
    /// The topic's configured name.
    pub(super) fn name(self, topics: &crate::config::TopicNames) -> &str {
        match self {
            Self::Products => &topics.products,
            Self::QueryEvents => &topics.query_events,
        }
    }
}

/// One consumed message: its position, and where its key and payload lie in
/// [`RawBatch::bytes`].
#[derive(Debug)]
pub(super) struct RawMessage {
    pub(super) topic: SubscribedTopic,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<Range<usize>>,
    pub(super) payload: Option<Range<usize>>,
}

/// A micro-batch as consumed and not yet decoded. Every message's key and payload is copied
/// out of librdkafka's buffers into one byte arena (one allocation per batch, not per message),
/// so the consumer task only polls and copies; the `batch-preparer` thread decodes.
#[derive(Debug, Default)]
pub(super) struct RawBatch {
    pub(super) bytes: Vec<u8>,
    pub(super) messages: Vec<RawMessage>,
}

impl RawBatch {
    /// Arena bytes reserved per expected message, about a query event's size (product events
    /// are larger); the arena grows past this as needed.
    const RESERVED_BYTES_PER_MESSAGE: usize = 192;

    pub(super) fn with_capacity(messages: usize) -> Self {
        Self { bytes: Vec::with_capacity(messages * Self::RESERVED_BYTES_PER_MESSAGE), messages: Vec::with_capacity(messages) }
    }

    pub(super) fn push(&mut self, topic: SubscribedTopic, message: &BorrowedMessage<'_>) {
        let key = message.key().map(|key| self.copy_in(key));
        let payload = message.payload().map(|payload| self.copy_in(payload));
        self.messages.push(RawMessage { topic, partition: message.partition(), offset: message.offset(), key, payload });
    }

    pub(super) fn copy_in(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    pub(super) fn bytes_of(&self, range: &Option<Range<usize>>) -> Option<&[u8]> {
        range.as_ref().map(|range| &self.bytes[range.clone()])
    }
}

/// Turns [`RawBatch`]es into records on the `batch-preparer` thread.
#[derive(Debug, Clone)]
pub(super) struct BatchDecoder {
    /// The `products` and `query-events` topic names, shared by every record's position.
    pub(super) products_topic: Arc<str>,
    pub(super) query_events_topic: Arc<str>,
    pub(super) limits: crate::events::ValidationLimits,
}

impl BatchDecoder {
    pub(super) fn new(config: &Config) -> Self {
        Self {
            products_topic: config.kafka.topics.products.as_str().into(),
            query_events_topic: config.kafka.topics.query_events.as_str().into(),
            limits: config.validation.clone(),
        }
    }

    /// Decodes and validates every message, in order: one record each (a rejected message
    /// becomes a [`DecodedRecord::DeadLetter`] record), plus the rejected messages' bytes for
    /// the dead-letter topic.
    pub(super) fn decode(&self, raw: &RawBatch) -> (Vec<SourcedRecord>, Vec<RejectedMessage>) {
        let mut records = Vec::with_capacity(raw.messages.len());
        let mut rejected = Vec::new();
        for message in &raw.messages {
            let key = raw.bytes_of(&message.key);
            let payload = raw.bytes_of(&message.payload);
            let (decoded, topic) = match message.topic {
                SubscribedTopic::Products => {
                    (decode_product_event(key, payload, &self.limits).map(DecodedRecord::Product), &self.products_topic)
                }
                SubscribedTopic::QueryEvents => {
                    (decode_query_event(payload, &self.limits).map(DecodedRecord::Query), &self.query_events_topic)
                }
            };
            let topic = Arc::clone(topic);
            let position = SourcePosition { topic, partition: message.partition, offset: message.offset };
            match decoded {
                Ok(record) => records.push(SourcedRecord { position, record }),
                Err(invalid) => {
                    records.push(SourcedRecord { position: position.clone(), record: DecodedRecord::DeadLetter(invalid.reason) });
                    rejected.push(RejectedMessage { position, invalid, key: key.map(<[u8]>::to_vec), payload: payload.map(<[u8]>::to_vec) });
                }
            }
        }
        (records, rejected)
    }
}
