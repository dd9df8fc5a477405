//! Reading a whole topic (start to current end) with a throwaway consumer:
//! assigned partitions, no group membership, nothing committed. Used by the
//! dead-letter tools and by reconcile; never touches a live group.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(15);

/// One record as read back.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TopicRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Headers as borrowed pairs, the form the decoder takes.
    pub fn header_refs(&self) -> Vec<(&str, &[u8])> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    }
}

/// Calls `each` for every record of `topic` from its start to its end at the
/// time of the call, in partition order within each partition. Blocking: run
/// it off the async runtime. `progress` is called every 100,000 records.
pub fn read_topic(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    mut each: impl FnMut(TopicRecord),
    progress: impl Fn(u64),
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = crate::kafka::base_config(kafka)
        .set("group.id", "idem-topic-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
        anyhow::bail!("topic {topic} does not exist");
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
            anyhow::bail!(
                "no record from {topic} within {TIMEOUT:?} though {} partitions are not read to their end",
                ends.len()
            );
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
        each(TopicRecord {
            partition,
            offset,
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        });
        read += 1;
        if read % 100_000 == 0 {
            progress(read);
        }
        if ends.get(&partition).is_some_and(|end| offset + 1 >= *end) {
            ends.remove(&partition);
        }
    }
    Ok(read)
}
