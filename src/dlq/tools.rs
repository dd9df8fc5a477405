//! Reading the dead-letter topic back: `idem dlq inspect` and `idem dlq redrive`.
//! Both read with their own consumer (assigned partitions, no group
//! commits), from the start of the topic up to its end at the time of the call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::header;

const TIMEOUT: Duration = Duration::from_secs(15);

/// A dead-letter record as read back.
#[derive(Debug, Clone)]
pub struct DlqRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl DlqRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

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

/// Calls `each` for every record of `topic` from its start to its current end.
/// Blocking: run it off the async runtime.
pub fn read_all(
    brokers: &str,
    topic: &str,
    mut each: impl FnMut(DlqRecord),
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "idem-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
        anyhow::bail!("dead-letter topic {topic} does not exist");
    };
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), TIMEOUT)?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
        }
    }
    consumer.assign(&tpl)?;
    let mut read = 0u64;
    while !ends.is_empty() {
        let Some(m) = consumer.poll(TIMEOUT) else {
            anyhow::bail!("no record from {topic} within {TIMEOUT:?} though {} partitions are not read to their end", ends.len());
        };
        let m = m?;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let (partition, offset) = (m.partition(), m.offset());
        each(DlqRecord {
            partition,
            offset,
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        });
        read += 1;
        if ends.get(&partition).is_some_and(|end| offset + 1 >= *end) {
            ends.remove(&partition);
        }
    }
    Ok(read)
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
    let producer: ThreadedProducer<DeliveryCounter> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
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
