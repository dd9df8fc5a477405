//! A batch of fetched records, decoded and owned, so it can move from the
//! fetch loop to the guard stage.

use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::config::Config;
use crate::event::{self, Event, Invalid};
use crate::offsets::TopicPartition;

/// One record of a batch.
pub struct Item {
    /// Index into `Batch::partitions`.
    pub partition: usize,
    pub offset: i64,
    /// The record's Kafka timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The original bytes, kept for the dead-letter topic (invalid records
    /// and conflicts go there unchanged).
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub decoded: Result<Event, Invalid>,
}

/// Records in fetch order, with the partitions they came from.
pub struct Batch {
    pub partitions: Vec<TopicPartition>,
    /// The dedupe window of each partition's topic.
    pub windows: Vec<Duration>,
    pub items: Vec<Item>,
}

impl Batch {
    /// Decodes `messages` in order.
    pub fn decode(messages: &[BorrowedMessage<'_>], config: &Config) -> Batch {
        let mut batch = Batch {
            partitions: Vec::new(),
            windows: Vec::new(),
            items: Vec::with_capacity(messages.len()),
        };
        let mut header_refs: Vec<(&str, &[u8])> = Vec::new();
        for m in messages {
            let partition = batch.partition_index(m.topic(), m.partition(), config);
            header_refs.clear();
            if let Some(h) = m.headers() {
                header_refs.extend(h.iter().map(|h| (h.key, h.value.unwrap_or_default())));
            }
            let (decoded, key_mismatch) =
                event::decode_keyed(m.key(), m.payload(), &header_refs, &config.event);
            if key_mismatch {
                note_key_mismatch(m.topic(), m.partition(), m.offset(), m.key());
            }
            batch.items.push(Item {
                partition,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: header_refs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect(),
                decoded,
            });
        }
        batch
    }

    fn partition_index(&mut self, topic: &str, partition: i32, config: &Config) -> usize {
        // Batches hold few partitions: a linear search beats hashing here.
        if let Some(i) = self
            .partitions
            .iter()
            .position(|tp| tp.partition == partition && tp.topic == topic)
        {
            return i;
        }
        self.partitions.push(TopicPartition::new(topic, partition));
        self.windows.push(config.dedupe.window_for(topic));
        self.partitions.len() - 1
    }

    /// (partition, offset) of every record.
    pub fn positions(&self) -> impl Iterator<Item = (&TopicPartition, i64)> + '_ {
        self.items
            .iter()
            .map(|it| (&self.partitions[it.partition], it.offset))
    }

    /// Drops the records of partitions `keep` rejects (revoked meanwhile).
    pub fn retain_partitions(&mut self, keep: impl Fn(&TopicPartition) -> bool) {
        let keep: Vec<bool> = self.partitions.iter().map(keep).collect();
        self.items.retain(|it| keep[it.partition]);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Counts a record whose key is not its entity, and logs one such record a
/// minute at most (a producer that keys by something else sends many).
fn note_key_mismatch(topic: &str, partition: i32, offset: i64, key: Option<&[u8]>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_S: AtomicU64 = AtomicU64::new(0);
    crate::metrics::record_key_mismatch(topic);
    let now_s = (super::unix_millis() / 1000) as u64;
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
