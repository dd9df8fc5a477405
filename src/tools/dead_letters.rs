//! Reading the dead-letter topic back: `idem dlq inspect` and `idem dlq redrive`.
//! Both read with their own consumer (assigned partitions, no group
//! commits), from the start of the topic up to its end at the time of the call.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;

use crate::dlq::header;
use crate::tools::topic_reader::{read_topic, TopicRecord};

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
pub fn read_all(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    each: impl FnMut(DlqRecord),
) -> anyhow::Result<u64> {
    read_topic(kafka, topic, each, |_| {})
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
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    examples_per_reason: usize,
) -> anyhow::Result<Inspection> {
    let mut out = Inspection {
        topic: topic.to_string(),
        ..Inspection::default()
    };
    out.records = read_all(kafka, topic, |r| {
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
    /// The dead letters ("partition:offset") whose copy Kafka acknowledged.
    acknowledged: std::sync::Mutex<Vec<String>>,
    /// Those whose copy was not delivered.
    failed: std::sync::Mutex<Vec<String>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = Box<String>;
    fn delivery(&self, result: &DeliveryResult<'_>, member: Box<String>) {
        let list = match result {
            Ok(_) => &self.acknowledged,
            Err((e, _)) => {
                tracing::warn!(error = %e, "redrive: a record was not delivered");
                &self.failed
            }
        };
        list.lock().unwrap_or_else(|e| e.into_inner()).push(*member);
    }
}

/// What `idem dlq redrive` did (or would do, on a dry run).
#[derive(Debug, Default, Serialize)]
pub struct Redrive {
    pub read: u64,
    /// Records re-published (or to be), per original topic.
    pub by_topic: BTreeMap<String, u64>,
    /// Not selected by --reason.
    pub skipped: u64,
    /// Re-published by an earlier `--execute` (remembered in Redis).
    pub already_redriven: u64,
    /// Still invalid for the current decoder, by its reason now: not
    /// re-published (they would come straight back).
    pub still_invalid: BTreeMap<String, u64>,
    /// Dead-lettered as references (too large for the dead-letter topic):
    /// the value is a prefix only; re-publish the original from its
    /// topic/partition/offset.
    pub references: u64,
    pub failed: u64,
}

/// Re-publishes dead letters to their original topics with their original
/// key, value and headers, so the guard decides again. Each dead letter is
/// re-checked with the current decoder first: one still invalid is not
/// re-published. With `execute`, the re-published ones are remembered in
/// Redis (`KeyLayout::redriven_key`), so a repeated run publishes each dead letter at
/// most once; without it nothing is written anywhere.
pub async fn redrive(
    config: &crate::config::Config,
    dlq_topic: &str,
    reason: Option<&str>,
    execute: bool,
    progress: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<Redrive> {
    use redis::AsyncCommands;
    let mut conn = crate::store::connect_or_explain(&config.redis).await?;
    let key = crate::store::KeyLayout::new(&config.redis.key_prefix).redriven_key(dlq_topic);
    let done: std::collections::HashSet<String> = conn.smembers(&key).await?;
    let (kafka, topic, event_cfg) = (
        config.kafka.clone(),
        dlq_topic.to_string(),
        config.event.clone(),
    );
    let reason = reason.map(str::to_string);
    let (out, acknowledged, error) = tokio::task::spawn_blocking(move || {
        redrive_blocking(
            &kafka,
            &topic,
            reason.as_deref(),
            &event_cfg,
            &done,
            execute,
            progress,
        )
    })
    .await??;
    // What Kafka acknowledged is remembered, also when the run stopped on an
    // error. A redrive killed before this line publishes those again next
    // time (the guard makes valid ones duplicates).
    for chunk in acknowledged.chunks(1000) {
        let _: i64 = conn.sadd(&key, chunk).await?;
    }
    match error {
        Some(e) => anyhow::bail!(
            "redrive stopped: {e} ({} acknowledged copies are remembered; run it again for the rest)",
            acknowledged.len()
        ),
        None => Ok(out),
    }
}

fn redrive_blocking(
    kafka: &crate::config::KafkaConfig,
    dlq_topic: &str,
    reason: Option<&str>,
    event_cfg: &crate::event::EventConfig,
    done: &std::collections::HashSet<String>,
    execute: bool,
    progress: impl Fn(u64),
) -> anyhow::Result<(Redrive, Vec<String>, Option<String>)> {
    let producer: ThreadedProducer<DeliveryCounter> = crate::kafka::base_config(kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "1000000000")
        .create_with_context(DeliveryCounter::default())?;
    let mut out = Redrive::default();
    let mut error = None;
    let read = read_all(kafka, dlq_topic, |r| {
        if error.is_some() || reason.is_some_and(|want| r.reason() != want) {
            out.skipped += 1;
            return;
        }
        let Some(target) = r.header(header::TOPIC).map(str::to_string) else {
            out.skipped += 1;
            return;
        };
        if r.header(header::FORM) == Some("reference") {
            out.references += 1;
            return;
        }
        let member = format!("{}:{}", r.partition, r.offset);
        if done.contains(&member) {
            out.already_redriven += 1;
            return;
        }
        let headers: Vec<(&str, &[u8])> = r
            .original_headers()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let (decoded, _) =
            crate::event::decode_keyed(r.key.as_deref(), r.value.as_deref(), &headers, event_cfg);
        if let Err(invalid) = decoded {
            *out.still_invalid
                .entry(invalid.code().to_string())
                .or_default() += 1;
            return;
        }
        *out.by_topic.entry(target.clone()).or_default() += 1;
        let sent: u64 = out.by_topic.values().sum();
        if sent % 10_000 == 0 {
            progress(sent);
        }
        if !execute {
            return;
        }
        if let Err(e) = republish(&producer, &target, member, &r) {
            error = Some(e);
        }
    });
    match read {
        Ok(n) => out.read = n,
        Err(e) => {
            error.get_or_insert(format!("reading {dlq_topic}: {e}"));
        }
    }
    if let Err(e) = producer.flush(Duration::from_secs(60)) {
        error.get_or_insert(format!("not every copy was acknowledged within 60 s: {e}"));
    }
    let ctx = producer.context();
    out.failed = ctx.failed.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
    let acknowledged =
        std::mem::take(&mut *ctx.acknowledged.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((out, acknowledged, error))
}

/// Sends a dead letter's original record (key, value, headers) back to
/// `target`, waiting while the producer's queue is full; `member` comes back
/// in the delivery report.
fn republish(
    producer: &ThreadedProducer<DeliveryCounter>,
    target: &str,
    member: String,
    r: &TopicRecord,
) -> Result<(), String> {
    let mut headers = OwnedHeaders::new();
    for (k, v) in r.original_headers() {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut record: BaseRecord<'_, [u8], [u8], Box<String>> =
        BaseRecord::with_opaque_to(target, Box::new(member)).headers(headers);
    if let Some(k) = r.key.as_deref() {
        record = record.key(k);
    }
    if let Some(v) = r.value.as_deref() {
        record = record.payload(v);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, back))
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
            {
                record = back;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e.to_string()),
        }
    }
}
