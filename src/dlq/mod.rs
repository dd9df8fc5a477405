//! The dead-letter topic: invalid records and conflicts, kept with their
//! original key, value and headers plus idem's headers saying why.
//!
//! Guarantee: a record's offset is marked done only after its dead-letter
//! copy was acknowledged by Kafka (idempotent producer, `acks=all`). While
//! the dead-letter topic cannot be written, the batch waits and retries: the
//! record is never dropped and its offset is never committed.

pub mod budget;

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;
use crate::event::Reason;
use crate::kafka::QuietContext;
use crate::offsets::TopicPartition;

/// Header names idem adds to a dead-letter record.
pub mod header {
    pub const REASON: &str = "idem.reason";
    pub const MESSAGE: &str = "idem.message";
    pub const TOPIC: &str = "idem.original.topic";
    pub const PARTITION: &str = "idem.original.partition";
    pub const OFFSET: &str = "idem.original.offset";
    pub const TIMESTAMP: &str = "idem.original.timestamp";
    pub const GROUP: &str = "idem.consumer.group";
    pub const VERSION: &str = "idem.version";
    pub const FINGERPRINT: &str = "idem.fingerprint";
    pub const REMEMBERED_FINGERPRINT: &str = "idem.remembered.fingerprint";
    /// "reference" when the record was too large for the dead-letter topic:
    /// the value is only a prefix; see the original at topic/partition/offset.
    pub const FORM: &str = "idem.form";
    pub const ORIGINAL_SIZE: &str = "idem.original.size";
    /// `fnv1a64:<hex>` of the whole original value.
    pub const ORIGINAL_DIGEST: &str = "idem.original.digest";
    pub const ORIGINAL_HEADERS_BYTES: &str = "idem.original.headers_bytes";
    /// Every header idem adds starts with this; redrive strips them.
    pub const PREFIX: &str = "idem.";
}

/// One record to dead-letter.
pub struct DeadLetter<'a> {
    pub source: &'a TopicPartition,
    /// Where it goes: its source topic's dead-letter topic (`TopicPolicy`).
    pub topic: &'a str,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
    pub reason: Reason,
    pub message: String,
    /// For conflicts: (this record's fingerprint, the remembered one).
    pub fingerprints: Option<(u64, u64)>,
}

/// Room for the headers (the record's own and idem's) and the key beside a
/// value of `event.max_bytes`.
pub const HEADROOM_BYTES: usize = 256 * 1024;

/// Characters of `idem.message` kept (it may quote a key or an entity).
pub const MESSAGE_MAX_CHARS: usize = 1024;

/// Bytes of the value a reference dead letter keeps.
pub const REFERENCE_PREFIX_BYTES: usize = 16 * 1024;

/// The dead-letter producer's `message.max.bytes`: every record idem accepts
/// as valid-sized fits, with its headers (librdkafka's default is 1,000,000,
/// below Kafka's default record limit of 1,048,588).
pub fn producer_max_bytes(event_max_bytes: usize) -> usize {
    (event_max_bytes + HEADROOM_BYTES).clamp(1_000_000, 1_000_000_000)
}

/// Writes dead letters and waits for Kafka's acknowledgement.
pub struct DlqWriter {
    producer: FutureProducer<QuietContext>,
    group: String,
}

/// Why dead letters could not be written. Every kind is retried by the
/// pipeline (the batch waits, nothing past it is committed); the kind picks
/// the advice in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Larger than the producer or the topic accepts (whole, the letter is
    /// then sent as a reference; this is returned only if even that fails).
    #[error("too large for the dead-letter topic: {0}")]
    TooLarge(String),
    /// The dead-letter topic does not exist (and the brokers do not create it).
    #[error("the dead-letter topic does not exist: {0}")]
    UnknownTopic(String),
    #[error("{0}")]
    Other(String),
}

impl SendError {
    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            SendError::UnknownTopic(_) => {
                "the dead-letter topic does not exist: create it (topics/, `idem topics apply`)"
            }
            SendError::TooLarge(_) => {
                "even the reference is too large: raise the dead-letter topic's max.message.bytes"
            }
            SendError::Other(_) => "Kafka did not accept the dead letters; see the error",
        }
    }
}

impl DlqWriter {
    pub fn new(config: &Config) -> Result<DlqWriter, rdkafka::error::KafkaError> {
        let producer = crate::kafka::base_config(&config.kafka)
            // A dead letter must be durable before its source offset is committed.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.dlq.send_timeout.as_millis().to_string(),
            )
            .set(
                "message.max.bytes",
                producer_max_bytes(config.event.max_bytes).to_string(),
            )
            .set("linger.ms", "5")
            .create_with_context(QuietContext)?;
        Ok(DlqWriter {
            producer,
            group: config.kafka.group_id.clone(),
        })
    }

    /// Sends every letter not yet `delivered` and returns once all are
    /// acknowledged, or the first error. `delivered` (one flag per letter)
    /// survives a failed call, so a retry does not write a letter twice. A
    /// letter too large for the producer or the topic is sent as a
    /// reference instead (see [`reference`]): size never blocks a partition.
    pub async fn send_all(
        &self,
        letters: &[DeadLetter<'_>],
        delivered: &mut [bool],
    ) -> Result<(), SendError> {
        let mut pending = Vec::with_capacity(letters.len());
        for (i, l) in letters.iter().enumerate() {
            if !delivered[i] {
                pending.push((i, self.enqueue(l, false).await));
            }
        }
        let mut first_error = None;
        for (i, sent) in pending {
            let mut result = match sent {
                Ok(delivery) => Self::delivered(delivery).await,
                Err(e) => Err(e),
            };
            if let Err(SendError::TooLarge(e)) = &result {
                let l = &letters[i];
                tracing::warn!(
                    error = %e,
                    topic = %l.source.topic,
                    partition = l.source.partition,
                    offset = l.offset,
                    value_bytes = l.value.map_or(0, <[u8]>::len),
                    "dead letter too large for the dead-letter topic: sent as a reference (headers, provenance, size, digest and the first {REFERENCE_PREFIX_BYTES} bytes); raise the topic's max.message.bytes to keep whole records"
                );
                result = match self.enqueue(l, true).await {
                    Ok(delivery) => Self::delivered(delivery).await,
                    Err(e) => Err(e),
                };
            }
            match result {
                Ok(()) => delivered[i] = true,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn delivered(delivery: rdkafka::producer::DeliveryFuture) -> Result<(), SendError> {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(classify(&e)),
            Err(_) => Err(SendError::Other("the producer was dropped".into())),
        }
    }

    /// Enqueues one letter (whole, or as a reference), waiting while the
    /// producer's queue is full.
    async fn enqueue(
        &self,
        l: &DeadLetter<'_>,
        as_reference: bool,
    ) -> Result<rdkafka::producer::DeliveryFuture, SendError> {
        let topic = l.topic;
        let mut headers = OwnedHeaders::new_with_capacity(l.headers.len() + 14);
        let own_headers_bytes: usize = l.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        // A reference keeps the record's headers unless they are what is too large.
        if !as_reference || own_headers_bytes <= REFERENCE_PREFIX_BYTES {
            for (k, v) in l.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
        }
        let idem_headers = self.idem_headers(l, as_reference, own_headers_bytes);
        for (k, v) in &idem_headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = l
            .key
            .filter(|k| !as_reference || k.len() <= REFERENCE_PREFIX_BYTES)
        {
            record = record.key(k);
        }
        if let Some(v) = l.value {
            record = record.payload(if as_reference {
                &v[..v.len().min(REFERENCE_PREFIX_BYTES)]
            } else {
                v
            });
        }
        if let Some(ts) = l.timestamp_ms {
            record = record.timestamp(ts);
        }
        // Enqueue now (send_result is synchronous); the deliveries progress together.
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }

    /// idem's own headers of a dead letter: why, where from, which group and
    /// version; for a reference also the original's size, digest and
    /// header bytes.
    fn idem_headers(
        &self,
        l: &DeadLetter<'_>,
        as_reference: bool,
        own_headers_bytes: usize,
    ) -> Vec<(&'static str, String)> {
        let mut idem_headers = vec![
            (header::REASON, l.reason.to_string()),
            // Bounded: a message may quote a key or an entity of any size.
            (
                header::MESSAGE,
                l.message.chars().take(MESSAGE_MAX_CHARS).collect(),
            ),
            (header::TOPIC, l.source.topic.clone()),
            (header::PARTITION, l.source.partition.to_string()),
            (header::OFFSET, l.offset.to_string()),
            (
                header::TIMESTAMP,
                l.timestamp_ms.map(|t| t.to_string()).unwrap_or_default(),
            ),
            (header::GROUP, self.group.clone()),
            (header::VERSION, crate::version::VERSION.to_string()),
        ];
        if let Some((fp, remembered)) = l.fingerprints {
            idem_headers.push((header::FINGERPRINT, format!("{fp:016x}")));
            idem_headers.push((header::REMEMBERED_FINGERPRINT, format!("{remembered:016x}")));
        }
        if as_reference {
            let mut digest = crate::event::Fnv64::default();
            digest.update(l.value.unwrap_or_default());
            idem_headers.push((header::FORM, "reference".to_string()));
            idem_headers.push((
                header::ORIGINAL_SIZE,
                l.value.map_or(0, <[u8]>::len).to_string(),
            ));
            idem_headers.push((
                header::ORIGINAL_DIGEST,
                format!("fnv1a64:{:016x}", digest.finish()),
            ));
            idem_headers.push((
                header::ORIGINAL_HEADERS_BYTES,
                own_headers_bytes.to_string(),
            ));
        }
        idem_headers
    }
}

fn classify(e: &rdkafka::error::KafkaError) -> SendError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => SendError::TooLarge(e.to_string()),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            SendError::UnknownTopic(e.to_string())
        }
        _ => SendError::Other(e.to_string()),
    }
}

/// What the broker says about a dead-letter topic at start.
#[derive(Debug, PartialEq)]
pub enum TopicState {
    /// It exists; the largest record it accepts (`max.message.bytes`), if said.
    Exists(Option<usize>),
    Missing,
}

/// Describes the dead-letter topic `topic`.
pub async fn describe_topic(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
) -> Result<TopicState, rdkafka::error::KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<QuietContext> =
        crate::kafka::base_config(kafka).create_with_context(QuietContext)?;
    let opts = AdminOptions::new().request_timeout(Some(kafka.request_timeout));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await?;
    match described.into_iter().next() {
        Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)) => {
            Ok(TopicState::Missing)
        }
        Some(Err(code)) => Err(rdkafka::error::KafkaError::AdminOp(code)),
        // Some brokers answer an unknown topic with no entries at all; a
        // real topic always lists its settings (defaults included).
        Some(Ok(resource)) if resource.entries.is_empty() => Ok(TopicState::Missing),
        Some(Ok(resource)) => Ok(TopicState::Exists(
            resource
                .get("max.message.bytes")
                .and_then(|e| e.value.as_deref()?.parse().ok()),
        )),
        None => Ok(TopicState::Exists(None)),
    }
}

/// At start: an error for each dead-letter topic that does not exist (the
/// first invalid record would block its partition until it is created, so
/// say it now), a warning for each that accepts less than the producer may
/// send (such records are dead-lettered as references).
pub async fn check_topics(config: &Config) {
    let wanted = producer_max_bytes(config.event.max_bytes);
    for source in &config.kafka.topics {
        let topic = config.dlq.topic_for(source);
        match describe_topic(&config.kafka, &topic).await {
            Ok(TopicState::Missing) => tracing::error!(
                dlq_topic = %topic,
                source_topic = %source,
                "the dead-letter topic does not exist: the first invalid record of {source} will block its partition (nothing is lost or committed past it) until it is created. Create it (idem topics apply, see topics/) or set dlq.topic"
            ),
            Ok(TopicState::Exists(Some(limit))) if limit < wanted => tracing::warn!(
                dlq_topic = %topic,
                max_message_bytes = limit,
                event_max_bytes = config.event.max_bytes,
                "the dead-letter topic accepts records up to {limit} bytes, less than event.max_bytes plus {HEADROOM_BYTES} bytes of headers ({wanted}): larger invalid records are dead-lettered as references (headers, provenance, size, digest, first {REFERENCE_PREFIX_BYTES} bytes). Set the topic's max.message.bytes to {wanted} (topics/) to keep them whole"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(dlq_topic = %topic, error = %e, "could not describe the dead-letter topic")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_accepts_every_valid_sized_record_with_headers() {
        assert_eq!(producer_max_bytes(1_048_576), 1_048_576 + HEADROOM_BYTES);
        assert_eq!(producer_max_bytes(10), 1_000_000);
        assert_eq!(producer_max_bytes(usize::MAX / 2), 1_000_000_000);
    }

    #[test]
    fn send_errors_are_classified_by_code_not_text() {
        use rdkafka::error::KafkaError;
        let table = [
            (
                RDKafkaErrorCode::MessageSizeTooLarge,
                "too large for the dead-letter topic",
            ),
            (RDKafkaErrorCode::UnknownTopicOrPartition, "does not exist"),
            (RDKafkaErrorCode::UnknownTopic, "does not exist"),
            (RDKafkaErrorCode::MessageTimedOut, "Message timed out"),
        ];
        for (code, text) in table {
            let e = classify(&KafkaError::MessageProduction(code));
            assert!(e.to_string().contains(text), "{code:?}: {e}");
        }
        let unknown = classify(&KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
        assert!(unknown.hint().contains("create it"), "{}", unknown.hint());
        assert_ne!(
            unknown.hint(),
            SendError::Other(String::new()).hint(),
            "each kind has its own advice"
        );
    }
}
