//! `idem dlq redrive`: re-publishes dead letters to their original topics,
//! once each, and only those the current config would apply: each is
//! decoded again, its effects planned again, and its id looked up in the
//! dedupe window (a conflict stays one while the other payload is
//! remembered). Without `--execute` nothing is written anywhere.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;

use crate::config::Config;
use crate::dlq::header;
use crate::event::{id_hash, Event};
use crate::store::{KeyLayout, RedisConn};
use crate::tools::dead_letters::{read_all, DlqRecord};

/// What `idem dlq redrive` did (or would do, on a dry run).
#[derive(Debug, Default, Serialize)]
pub struct Redrive {
    pub read: u64,
    /// Records re-published (or to be), per original topic.
    pub by_topic: BTreeMap<String, u64>,
    /// Not selected by --reason.
    pub skipped: u64,
    /// Re-published by an earlier `--execute` (remembered in Redis), this
    /// dead letter or another copy of its source record.
    pub already_redriven: u64,
    /// Further copies of a source record met earlier in this run (the same
    /// record dead-lettered again on a re-read): published once at most.
    pub copies: u64,
    /// Would be rejected again, by the reason they would get now (the
    /// decoder, the effect planning, or `conflict` while the id is
    /// remembered with another payload): not re-published, they would come
    /// straight back.
    pub still_invalid: BTreeMap<String, u64>,
    /// Conflicts whose id is now remembered with this very payload: the
    /// guard would call them duplicates, so they are not re-published.
    pub already_applied: u64,
    /// Dead-lettered as references (too large for the dead-letter topic):
    /// the value is a prefix only; re-publish the original from its
    /// topic/partition/offset.
    pub references: u64,
    pub failed: u64,
}

impl Redrive {
    /// Counts what becomes of one dead letter; the topic to publish it to
    /// if it is published.
    fn count(&mut self, fate: Fate) -> Option<String> {
        match fate {
            Fate::Publish(target) => {
                *self.by_topic.entry(target.clone()).or_default() += 1;
                return Some(target);
            }
            Fate::Skipped => self.skipped += 1,
            Fate::Reference => self.references += 1,
            Fate::AlreadyRedriven => self.already_redriven += 1,
            Fate::Copy => self.copies += 1,
            Fate::AlreadyApplied => self.already_applied += 1,
            Fate::StillInvalid(code) => *self.still_invalid.entry(code).or_default() += 1,
        }
        None
    }
}

/// The Redis set members a published copy is remembered by: the dead
/// letter's own place (`partition:offset`, what every version reads) and its
/// source record (`source:<topic>[<partition>]@<offset>`).
type Members = (String, Option<String>);

#[derive(Default)]
struct DeliveryCounter {
    /// The dead letters whose copy Kafka acknowledged.
    acknowledged: std::sync::Mutex<Vec<Members>>,
    /// Those whose copy was not delivered.
    failed: std::sync::Mutex<Vec<Members>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = Box<Members>;
    fn delivery(&self, result: &DeliveryResult<'_>, members: Box<Members>) {
        let list = match result {
            Ok(_) => &self.acknowledged,
            Err((e, _)) => {
                tracing::warn!(error = %e, "redrive: a record was not delivered");
                &self.failed
            }
        };
        list.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(*members);
    }
}

/// Re-publishes dead letters to their original topics with their original
/// key, value and headers, so the guard decides again. With `execute`, the
/// re-published ones are remembered in Redis (`KeyLayout::redriven_key`),
/// so a repeated run publishes each source record at most once.
pub async fn redrive(
    config: &Config,
    dlq_topic: &str,
    reason: Option<&str>,
    execute: bool,
    progress: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<Redrive> {
    use redis::AsyncCommands;
    let mut conn = crate::store::connect_or_explain(&config.redis).await?;
    let key = KeyLayout::new(&config.redis.key_prefix).redriven_key(dlq_topic);
    let done: HashSet<String> = conn.smembers(&key).await?;
    let shared = Arc::new(config.clone());
    let run = Run {
        policies: crate::config::Policies::of(Arc::clone(&shared)),
        config: shared,
        dlq_topic: dlq_topic.to_string(),
        reason: reason.map(str::to_string),
        done,
        execute,
        runtime: tokio::runtime::Handle::current(),
        conn: conn.clone(),
        layout: KeyLayout::new(&config.redis.key_prefix),
    };
    let (out, acknowledged, error) =
        tokio::task::spawn_blocking(move || run.blocking(progress)).await??;
    // What Kafka acknowledged is remembered, also when the run stopped on an
    // error. A redrive killed before this line publishes those again next
    // time (the guard makes valid ones duplicates).
    let members: Vec<String> = acknowledged
        .iter()
        .flat_map(|(own, source)| std::iter::once(own.clone()).chain(source.clone()))
        .collect();
    for chunk in members.chunks(1000) {
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

/// One redrive, on a blocking thread (the dead-letter topic is read with a
/// blocking consumer; the window lookups go back to the runtime).
struct Run {
    config: Arc<Config>,
    /// The target topics' policies, resolved once each.
    policies: crate::config::Policies,
    dlq_topic: String,
    reason: Option<String>,
    done: HashSet<String>,
    execute: bool,
    runtime: tokio::runtime::Handle,
    conn: RedisConn,
    /// Where the dedupe window's ids are.
    layout: KeyLayout,
}

/// What becomes of one dead letter.
enum Fate {
    Skipped,
    Reference,
    AlreadyRedriven,
    Copy,
    StillInvalid(String),
    AlreadyApplied,
    Publish(String),
}

impl Run {
    fn blocking(
        mut self,
        progress: impl Fn(u64),
    ) -> anyhow::Result<(Redrive, Vec<Members>, Option<String>)> {
        let producer: ThreadedProducer<DeliveryCounter> =
            crate::kafka::base_config(&self.config.kafka)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.max.bytes", "1000000000")
                .create_with_context(DeliveryCounter::default())?;
        let mut out = Redrive::default();
        let mut error = None;
        let mut seen: HashSet<String> = HashSet::new();
        let (kafka, dlq_topic) = (self.config.kafka.clone(), self.dlq_topic.clone());
        let read = read_all(&kafka, &dlq_topic, |r| {
            if error.is_some() {
                out.skipped += 1;
                return;
            }
            let source = r.source().map(|s| format!("source:{s}"));
            let fate = self.fate(&r, source.as_deref(), &mut seen);
            let Some(target) = out.count(fate) else {
                return;
            };
            let sent: u64 = out.by_topic.values().sum();
            if sent % 10_000 == 0 {
                progress(sent);
            }
            if self.execute {
                let members = (format!("{}:{}", r.partition, r.offset), source);
                if let Err(e) = republish(&producer, &target, members, &r) {
                    error = Some(e);
                }
            }
        });
        match read {
            Ok(n) => out.read = n,
            Err(e) => {
                error.get_or_insert(format!("reading {}: {e}", self.dlq_topic));
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

    /// Decides what becomes of `r`, checking what the current config and
    /// Redis's dedupe window would say of it, without writing.
    fn fate(&mut self, r: &DlqRecord, source: Option<&str>, seen: &mut HashSet<String>) -> Fate {
        if self
            .reason
            .as_deref()
            .is_some_and(|want| r.reason() != want)
        {
            return Fate::Skipped;
        }
        let Some(target) = r.header(header::TOPIC).map(str::to_string) else {
            return Fate::Skipped;
        };
        if r.header(header::FORM) == Some("reference") {
            return Fate::Reference;
        }
        let own = format!("{}:{}", r.partition, r.offset);
        if self.done.contains(&own) || source.is_some_and(|s| self.done.contains(s)) {
            return Fate::AlreadyRedriven;
        }
        if let Some(s) = source {
            if !seen.insert(s.to_string()) {
                return Fate::Copy;
            }
        }
        let headers: Vec<(&str, &[u8])> = r
            .original_headers()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let (decoded, _) = crate::event::decode_keyed(
            r.key.as_deref(),
            r.value.as_deref(),
            &headers,
            &self.config.event,
        );
        let event = match decoded {
            Ok(event) => event,
            Err(invalid) => return Fate::StillInvalid(invalid.code().to_string()),
        };
        let policy = self.policies.get(&target);
        if let Err(invalid) = policy.plan(&event) {
            return Fate::StillInvalid(invalid.code().to_string());
        }
        let window = policy.window;
        let remembered = self.runtime.block_on(remembered_fingerprint(
            &mut self.conn,
            &self.layout,
            &event,
            window,
        ));
        match remembered {
            Ok(Some(fp)) if fp == event.fingerprint => Fate::AlreadyApplied,
            Ok(Some(_)) => Fate::StillInvalid("conflict".into()),
            Ok(None) => Fate::Publish(target),
            Err(e) => {
                tracing::warn!(error = %e, id = %event.id, "redrive: cannot look the id up in the dedupe window; re-publishing it (the guard decides)");
                Fate::Publish(target)
            }
        }
    }
}

/// The fingerprint the dedupe window remembers for `event`'s id, if any:
/// the current and the previous generation, as the guard looks it up.
async fn remembered_fingerprint(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    event: &Event,
    window: Duration,
) -> Result<Option<u64>, redis::RedisError> {
    let keys = layout.entity(&event.entity);
    let ids = crate::guard::id_generations(crate::pipeline::unix_millis() as u64, window);
    let field = id_hash(&event.id).to_be_bytes();
    let (current, previous): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::pipe()
        .hget(keys.ids(ids.current), &field[..])
        .hget(keys.ids(ids.previous), &field[..])
        .query_async(conn)
        .await?;
    Ok(current.or(previous).and_then(|mark| {
        let fp: [u8; 8] = mark.get(..8)?.try_into().ok()?;
        Some(u64::from_be_bytes(fp))
    }))
}

/// Sends a dead letter's original record (key, value, headers) back to
/// `target`, waiting while the producer's queue is full; `members` come back
/// in the delivery report.
fn republish(
    producer: &ThreadedProducer<DeliveryCounter>,
    target: &str,
    members: Members,
    r: &DlqRecord,
) -> Result<(), String> {
    let mut headers = OwnedHeaders::new();
    for (k, v) in r.original_headers() {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut record: BaseRecord<'_, [u8], [u8], Box<Members>> =
        BaseRecord::with_opaque_to(target, Box::new(members)).headers(headers);
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
