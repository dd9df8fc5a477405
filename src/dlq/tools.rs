//! Reading the dead-letter topic back: `idem dlq inspect` and `idem dlq redrive`.
//! Both read with their own consumer (assigned partitions, no group
//! commits), from the start of the topic up to its end at the time of the call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;

use super::header;
use crate::topic_reader::{read_topic, TopicRecord};

/// A dead-letter record as read back.
pub type DlqRecord = TopicRecord;

impl DlqRecord {
    pub fn reason(&self) -> &str {
        self.header(header::REASON).unwrap_or("unknown")
    }

    /// The record's own headers, without the ones idem added.
    pub fn original_headers(&self) -> impl Iterator<Item = &(String, Vec<u8>)> {
        self.headers
            .iter()
            .filter(|(k, _)| !k.starts_with(header::PREFIX))
    }
}

/// Calls `each` for every record of the dead-letter `topic`. Blocking.
pub fn read_all(brokers: &str, topic: &str, each: impl FnMut(DlqRecord)) -> anyhow::Result<u64> {
    read_topic(brokers, topic, each, |_| {})
}

/// What `idem dlq inspect` reports.
#[derive(Debug, Default, Serialize)]
pub struct Inspection {
    pub topic: String,
    pub records: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub examples: Vec<Example>,
}

/// One example record of a reason.
#[derive(Debug, Serialize)]
pub struct Example {
    pub reason: String,
    pub message: String,
    pub original: String,
    pub dlq_offset: String,
    pub value_preview: String,
}

pub fn inspect(
    brokers: &str,
    topic: &str,
    examples_per_reason: usize,
) -> anyhow::Result<Inspection> {
    let mut out = Inspection {
        topic: topic.to_string(),
        ..Inspection::default()
    };
    out.records = read_all(brokers, topic, |r| {
        let reason = r.reason().to_string();
        let n = out.by_reason.entry(reason.clone()).or_default();
        *n += 1;
        if *n as usize <= examples_per_reason {
            let preview = r
                .value
                .as_deref()
                .map(|v| String::from_utf8_lossy(&v[..v.len().min(160)]).into_owned())
                .unwrap_or_else(|| "(no value)".into());
            out.examples.push(Example {
                reason,
                message: r.header(header::MESSAGE).unwrap_or("").to_string(),
                original: format!(
                    "{}[{}]@{}",
                    r.header(header::TOPIC).unwrap_or("?"),
                    r.header(header::PARTITION).unwrap_or("?"),
                    r.header(header::OFFSET).unwrap_or("?")
                ),
                dlq_offset: format!("[{}]@{}", r.partition, r.offset),
                value_preview: preview,
            });
        }
    })?;
    Ok(out)
}

#[derive(Default)]
struct DeliveryCounter {
    failed: AtomicU64,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "redrive: a record was not delivered");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What `idem dlq redrive` did (or would do, on a dry run).
#[derive(Debug, Default, Serialize)]
pub struct Redrive {
    pub read: u64,
    /// Records re-published (or to be), per original topic.
    pub by_topic: BTreeMap<String, u64>,
    pub skipped: u64,
    pub failed: u64,
}

/// Re-publishes dead letters to their original topics with their original
/// key, value and headers, so the guard decides again.
pub fn redrive(
    brokers: &str,
    dlq_topic: &str,
    reason: Option<&str>,
    dry_run: bool,
    progress: impl Fn(u64),
) -> anyhow::Result<Redrive> {
    let producer: ThreadedProducer<DeliveryCounter> = crate::kafka::client_config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create_with_context(DeliveryCounter::default())?;
    let mut out = Redrive::default();
    let mut error = None;
    out.read = read_all(brokers, dlq_topic, |r| {
        if error.is_some() || reason.is_some_and(|want| r.reason() != want) {
            out.skipped += 1;
            return;
        }
        let Some(target) = r.header(header::TOPIC).map(str::to_string) else {
            out.skipped += 1;
            return;
        };
        *out.by_topic.entry(target.clone()).or_default() += 1;
        let sent: u64 = out.by_topic.values().sum();
        if sent % 10_000 == 0 {
            progress(sent);
        }
        if dry_run {
            return;
        }
        let mut headers = OwnedHeaders::new();
        for (k, v) in r.original_headers() {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&target).headers(headers);
        if let Some(k) = r.key.as_deref() {
            record = record.key(k);
        }
        if let Some(v) = r.value.as_deref() {
            record = record.payload(v);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
    })?;
    if let Some(e) = error {
        anyhow::bail!("redrive stopped: {e}");
    }
    producer.flush(Duration::from_secs(60))?;
    out.failed = producer.context().failed.load(Ordering::Relaxed);
    Ok(out)
}
