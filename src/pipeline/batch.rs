//! A batch of fetched records, decoded and owned, so it can move from the
//! fetch loop to the guard stage.

use std::sync::Arc;

use super::consumer::Fetched;
use crate::config::{EventConfig, Policies, TopicPolicy};
use crate::effects::Effects;
use crate::event::{self, Event, Invalid};
use crate::guard::Verdict;
use crate::offsets::TopicPartition;

/// One record of a batch.
pub struct Item {
    /// Index into `Batch::partitions`.
    pub partition_index: usize,
    pub offset: i64,
    /// The record's Kafka timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The original bytes, kept for the dead-letter topic (invalid records
    /// and conflicts go there unchanged).
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub decoded: Result<Event, Invalid>,
    /// The decoded event's planned effects (its topic's and type's rule).
    pub effects: Effects,
    /// What the guard stage decided of it; `None` until then, and for an
    /// invalid record outside a decided range (it has no verdict: its
    /// reason is `decoded`'s error).
    pub verdict: Option<Verdict>,
}

/// A decoded event's effects under its topic's rules; an event whose
/// effects cannot be planned becomes invalid (dead-lettered with the reason).
pub fn plan_effects(
    decoded: Result<Event, Invalid>,
    policy: &TopicPolicy,
) -> (Result<Event, Invalid>, Effects) {
    let Ok(event) = decoded else {
        return (decoded, Effects::default());
    };
    match policy.plan(&event) {
        Ok(planned) => (Ok(event), planned),
        Err(invalid) => (Err(invalid), Effects::default()),
    }
}

/// Records in fetch order, with the partitions they came from.
pub struct Batch {
    pub partitions: Vec<TopicPartition>,
    /// The policy of each partition's topic.
    pub policies: Vec<Arc<TopicPolicy>>,
    pub items: Vec<Item>,
}

impl Batch {
    /// Decodes `records` in order, each under its topic's policy.
    pub fn decode(records: Vec<Fetched>, policies: &Policies, format: &EventConfig) -> Batch {
        let mut batch = Batch {
            partitions: Vec::new(),
            policies: Vec::new(),
            items: Vec::with_capacity(records.len()),
        };
        for Fetched { tp, record: r } in records {
            let partition_index = batch.partition_index(&tp, policies);
            let header_refs = r.header_refs();
            let (decoded, key_mismatch) =
                event::decode_keyed(r.key.as_deref(), r.value.as_deref(), &header_refs, format);
            if key_mismatch {
                note_key_mismatch(&tp.topic, tp.partition, r.offset, r.key.as_deref());
            }
            drop(header_refs);
            let (decoded, effects) = plan_effects(decoded, &batch.policies[partition_index]);
            batch.items.push(Item {
                partition_index,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                key: r.key,
                value: r.value,
                headers: r.headers,
                decoded,
                effects,
                verdict: None,
            });
        }
        batch
    }

    fn partition_index(&mut self, tp: &TopicPartition, policies: &Policies) -> usize {
        // Batches hold few partitions: a linear search beats hashing here.
        if let Some(i) = self.partitions.iter().position(|p| p == tp) {
            return i;
        }
        self.partitions.push(tp.clone());
        self.policies.push(policies.get(&tp.topic));
        self.partitions.len() - 1
    }

    /// (partition, offset) of every record.
    pub fn positions(&self) -> impl Iterator<Item = (&TopicPartition, i64)> + '_ {
        self.items
            .iter()
            .map(|it| (&self.partitions[it.partition_index], it.offset))
    }

    /// What the loop needs back once the batch is applied.
    pub fn finished(&self) -> Finished {
        Finished {
            partitions: self.partitions.clone(),
            positions: self
                .items
                .iter()
                .map(|it| (it.partition_index, it.offset))
                .collect(),
        }
    }

    /// Each partition's first and last offset, e.g. `orders/0:10-19 orders/3:7-7`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, tp) in self.partitions.iter().enumerate() {
            let mut offsets = self
                .items
                .iter()
                .filter(|it| it.partition_index == i)
                .map(|it| it.offset);
            let first = offsets.next().unwrap_or(-1);
            let last = offsets.next_back().unwrap_or(first);
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&format!("{}/{}:{first}-{last}", tp.topic, tp.partition));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
}

/// A batch whose outcomes are durable: its offsets are done.
#[derive(Debug)]
pub struct Finished {
    partitions: Vec<TopicPartition>,
    positions: Vec<(usize, i64)>,
}

impl Finished {
    pub fn positions(&self) -> impl Iterator<Item = (&TopicPartition, i64)> + '_ {
        self.positions
            .iter()
            .map(|(p, offset)| (&self.partitions[*p], *offset))
    }
}

/// Counts a record whose key is not its entity, and logs one such record a
/// minute at most (a producer that keys by something else sends many).
fn note_key_mismatch(topic: &str, partition: i32, offset: i64, key: Option<&[u8]>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_S: AtomicU64 = AtomicU64::new(0);
    crate::metrics::record_key_mismatch(topic);
    let now_s = (super::timing::unix_millis() / 1000) as u64;
    let last = LAST_LOG_S.load(Ordering::Relaxed);
    if now_s >= last + 60
        && LAST_LOG_S
            .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            topic,
            partition,
            offset,
            key = %key.map(String::from_utf8_lossy).unwrap_or("(none)".into()),
            "record key is not the entity: an entity whose events spread over partitions loses their order, and a merge can keep an older field (docs/guarantees.md); key records by entity, or set event.key_mismatch = \"dead_letter\". Counted in idem_key_mismatch_total; logged once a minute"
        );
    }
}
