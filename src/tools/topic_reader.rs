//! Reading a whole topic (start to current end) with a throwaway consumer:
//! assigned partitions, no group membership, nothing committed. Used by the
//! dead-letter tools and by reconcile; never touches a live group.

use std::collections::BTreeMap;

use crate::kafka::QuietContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub use crate::kafka::TopicRecord;

/// The topic to read does not exist; a tool that chose the name itself
/// says which flag or key would name another.
#[derive(Debug, thiserror::Error)]
#[error("topic {0} does not exist")]
pub struct MissingTopic(pub String);

/// Calls `each` for every record of `topic` from its start to its end at the
/// time of the call, in partition order within each partition. Blocking: run
/// it off the async runtime. `progress` is called every 100,000 records.
pub fn read_topic(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    each: impl FnMut(TopicRecord),
    progress: impl Fn(u64),
) -> anyhow::Result<u64> {
    let consumer = reader(kafka)?;
    let timeout = kafka.request_timeout;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| super::unanswered(kafka, &format!("reading topic {topic}"), e))?;
    let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
        return Err(MissingTopic(topic.to_string()).into());
    };
    let mut ranges = BTreeMap::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        ranges.insert(p.id(), (low, high));
    }
    read_assigned(&consumer, kafka, topic, &ranges, each, progress)
}

/// Calls `each` for the records of `topic` in `ranges` (per partition,
/// offsets `[start, end)`), in offset order within each partition.
/// Blocking, like [`read_topic`].
pub fn read_ranges(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    each: impl FnMut(TopicRecord),
) -> anyhow::Result<u64> {
    read_assigned(&reader(kafka)?, kafka, topic, ranges, each, |_| {})
}

fn reader(kafka: &crate::config::KafkaConfig) -> anyhow::Result<BaseConsumer<QuietContext>> {
    Ok(crate::kafka::base_config(kafka)
        .set("group.id", "idem-topic-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(QuietContext)?)
}

fn read_assigned(
    consumer: &BaseConsumer<QuietContext>,
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    mut each: impl FnMut(TopicRecord),
    progress: impl Fn(u64),
) -> anyhow::Result<u64> {
    let timeout = kafka.request_timeout;
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (&partition, &(start, end)) in ranges {
        if end > start {
            ends.insert(partition, end);
            tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        }
    }
    consumer.assign(&tpl)?;
    let mut read = 0u64;
    while !ends.is_empty() {
        let Some(m) = consumer.poll(timeout) else {
            anyhow::bail!(
                "no record from {topic} within {timeout:?} though {} partitions are not read to their end",
                ends.len()
            );
        };
        let m = m?;
        let (partition, offset) = (m.partition(), m.offset());
        let Some(&end) = ends.get(&partition) else {
            continue; // past its range: fetched ahead
        };
        if offset < end {
            each(TopicRecord::from_message(&m));
            read += 1;
            if read % 100_000 == 0 {
                progress(read);
            }
        }
        if offset + 1 >= end {
            ends.remove(&partition);
        }
    }
    Ok(read)
}
