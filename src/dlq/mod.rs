//! The dead-letter topic: invalid records and conflicts, kept with their
//! original key, value and headers plus idem's headers saying why.
//!
//! Guarantee: a record's offset is marked done only after its dead-letter
//! copy was acknowledged by Kafka (idempotent producer, `acks=all`). While
//! the dead-letter topic cannot be written, the batch waits and retries: the
//! record is never dropped and its offset is never committed.

pub mod budget;
pub mod tools;

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{Config, DlqConfig};
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
    /// Every header idem adds starts with this; redrive strips them.
    pub const PREFIX: &str = "idem.";
}

/// The closed list of reason codes: the decoder's codes and `conflict`.
pub const REASONS: [&str; 12] = [
    "empty_value",
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "empty_field",
    "wrong_type",
    "seq_out_of_range",
    "bad_timestamp",
    "bad_entity",
    "conflict",
];

/// One record to dead-letter.
pub struct DeadLetter<'a> {
    pub source: &'a TopicPartition,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
    pub reason: &'static str,
    pub message: String,
    /// For conflicts: (this record's fingerprint, the remembered one).
    pub fingerprints: Option<(u64, u64)>,
}

/// Writes dead letters and waits for Kafka's acknowledgement.
pub struct DlqWriter {
    producer: FutureProducer,
    group: String,
    config: DlqConfig,
}

impl DlqWriter {
    pub fn new(config: &Config) -> anyhow::Result<DlqWriter> {
        let producer = crate::kafka::base_config(&config.kafka)
            // A dead letter must be durable before its source offset is committed.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.dlq.send_timeout.as_millis().to_string(),
            )
            .set("linger.ms", "5")
            .create()?;
        Ok(DlqWriter {
            producer,
            group: config.kafka.group_id.clone(),
            config: config.dlq.clone(),
        })
    }

    /// Sends every letter and returns once all are acknowledged, or the first error.
    pub async fn send_all(&self, letters: &[DeadLetter<'_>]) -> Result<(), String> {
        let mut pending = Vec::with_capacity(letters.len());
        for l in letters {
            let topic = self.config.topic_for(&l.source.topic);
            let mut headers = OwnedHeaders::new_with_capacity(l.headers.len() + 10);
            for (k, v) in l.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let partition = l.source.partition.to_string();
            let offset = l.offset.to_string();
            let timestamp = l.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
            let mut idem_headers = vec![
                (header::REASON, l.reason.to_string()),
                (header::MESSAGE, l.message.clone()),
                (header::TOPIC, l.source.topic.clone()),
                (header::PARTITION, partition),
                (header::OFFSET, offset),
                (header::TIMESTAMP, timestamp),
                (header::GROUP, self.group.clone()),
                (header::VERSION, env!("CARGO_PKG_VERSION").to_string()),
            ];
            if let Some((fp, remembered)) = l.fingerprints {
                idem_headers.push((header::FINGERPRINT, format!("{fp:016x}")));
                idem_headers.push((header::REMEMBERED_FINGERPRINT, format!("{remembered:016x}")));
            }
            for (k, v) in &idem_headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&topic).headers(headers);
            if let Some(k) = l.key {
                record = record.key(k);
            }
            if let Some(v) = l.value {
                record = record.payload(v);
            }
            if let Some(ts) = l.timestamp_ms {
                record = record.timestamp(ts);
            }
            // Enqueue now (send_result is synchronous); the deliveries progress together.
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((e, back)) => {
                        if e.rdkafka_error_code()
                            != Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        {
                            return Err(e.to_string());
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e.to_string()),
                Err(_) => return Err("the producer was dropped".into()),
            }
        }
        Ok(())
    }
}
