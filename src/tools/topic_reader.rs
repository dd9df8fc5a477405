//! Reading a whole topic (start to current end) with a throwaway consumer:
//! assigned partitions, no group membership, nothing committed. Used by the
//! dead-letter tools and by reconcile; never touches a live group.

use std::collections::BTreeMap;

use crate::kafka::QuietContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub use crate::kafka::TopicRecord;

/// Calls `each` for every record of `topic` from its start to its end at the
/// time of the call, in partition order within each partition. Blocking: run
/// it off the async runtime. `progress` is called every 100,000 records.
pub fn read_topic(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    mut each: impl FnMut(TopicRecord),
    progress: impl Fn(u64),
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer<QuietContext> = crate::kafka::base_config(kafka)
        .set("group.id", "idem-topic-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(QuietContext)?;
    let timeout = kafka.request_timeout;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| super::unanswered(kafka, &format!("reading topic {topic}"), e))?;
    let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
        anyhow::bail!("topic {topic} does not exist");
    };
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
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
        each(TopicRecord::from_message(&m));
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
