//! A consumer group's members, assignment, committed offsets and lag, read
//! through Kafka's APIs without joining the group.

use crate::kafka::QuietContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

/// One member of the group and the partitions it holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    /// The partitions assigned to this member, by topic.
    pub assignment: Vec<TopicAssignment>,
}

/// Partitions of one topic held by one member.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopicAssignment {
    pub topic: String,
    pub partitions: Vec<i32>,
}

/// Committed vs end offset of one partition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The next offset the group will read; None when it never committed.
    pub committed: Option<i64>,
    pub log_start: i64,
    pub end: i64,
    /// Records between the commit point (or log start) and the end.
    pub lag: i64,
}

/// What `idem inspect group` shows.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub state: String,
    pub members: Vec<Member>,
    pub partitions: Vec<PartitionLag>,
    pub total_lag: i64,
}

impl GroupStatus {
    /// Kafka reports an unknown group as `Dead` (or not at all): no
    /// members and nothing committed means there is no such group.
    pub fn exists(&self) -> bool {
        let known = !matches!(self.state.as_str(), "Dead" | "Unknown");
        known || !self.members.is_empty() || self.partitions.iter().any(|p| p.committed.is_some())
    }
}

/// Reads the group's state for `topics`, or with none given for the topics
/// the group has committed offsets on or its members are assigned
/// (blocking: call from `spawn_blocking`).
pub fn group_status(
    kafka: &crate::config::KafkaConfig,
    group: &str,
    topics: &[String],
) -> anyhow::Result<GroupStatus> {
    let timeout = kafka.request_timeout;
    let consumer: BaseConsumer<QuietContext> = crate::kafka::base_config(kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create_with_context(QuietContext)?;
    let groups = consumer
        .fetch_group_list(Some(group), timeout)
        .map_err(|e| super::unanswered(kafka, &format!("describing group {group}"), e))?;
    let (state, members) = match groups.groups().first() {
        Some(g) => (
            g.state().to_string(),
            g.members()
                .iter()
                .map(|m| Member {
                    member_id: m.id().to_string(),
                    client_id: m.client_id().to_string(),
                    host: m.client_host().to_string(),
                    assignment: m.assignment().map(decode_assignment).unwrap_or_default(),
                })
                .collect(),
        ),
        None => ("Unknown".to_string(), Vec::new()),
    };

    let topics = if topics.is_empty() {
        group_topics(&consumer, &members, timeout)?
    } else {
        topics.to_vec()
    };
    let mut tpl = TopicPartitionList::new();
    for topic in &topics {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
            anyhow::bail!("topic {topic} does not exist");
        };
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl.clone(), timeout)?;
    let mut partitions = Vec::new();
    for e in tpl.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let committed = match committed
            .find_partition(e.topic(), e.partition())
            .map(|c| c.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let from = committed.unwrap_or(low).max(low);
        partitions.push(PartitionLag {
            topic: e.topic().to_string(),
            partition: e.partition(),
            committed,
            log_start: low,
            end: high,
            lag: (high - from).max(0),
        });
    }
    let total_lag = partitions.iter().map(|p| p.lag).sum();
    Ok(GroupStatus {
        group: group.to_string(),
        state,
        members,
        partitions,
        total_lag,
    })
}

/// The topics `members` are assigned and those the group has an offset
/// committed on: one OffsetFetch over every partition of every topic
/// (Kafka's internal `__` topics left out), as rust-rdkafka has no
/// ListConsumerGroupOffsets.
fn group_topics(
    consumer: &BaseConsumer<QuietContext>,
    members: &[Member],
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<String>> {
    let mut found: std::collections::BTreeSet<String> = members
        .iter()
        .flat_map(|m| m.assignment.iter().map(|a| a.topic.clone()))
        .collect();
    let md = consumer.fetch_metadata(None, timeout)?;
    let mut every = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| !t.name().starts_with("__")) {
        for p in t.partitions() {
            every.add_partition(t.name(), p.id());
        }
    }
    if every.count() > 0 {
        let committed = consumer.committed_offsets(every, timeout)?;
        found.extend(
            committed
                .elements()
                .iter()
                .filter(|e| matches!(e.offset(), Offset::Offset(_)))
                .map(|e| e.topic().to_string()),
        );
    }
    Ok(found.into_iter().collect())
}

/// Decodes Kafka's ConsumerProtocolAssignment: version (i16), then
/// [topic (i16-length string), [partition (i32)]], then user data.
/// Anything malformed yields what was decoded so far.
pub fn decode_assignment(bytes: &[u8]) -> Vec<TopicAssignment> {
    let mut r = Reader { bytes, pos: 0 };
    let mut out = Vec::new();
    let decoded = (|| {
        r.i16()?;
        let topics = r.i32()?;
        for _ in 0..topics.max(0) {
            let len = r.i16()?;
            let name = String::from_utf8_lossy(r.take(len.max(0) as usize)?).into_owned();
            let n = r.i32()?;
            let mut parts = Vec::new();
            for _ in 0..n.max(0) {
                parts.push(r.i32()?);
            }
            out.push(TopicAssignment {
                topic: name,
                partitions: parts,
            });
        }
        Some(())
    })();
    let _ = decoded;
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_decodes_and_survives_truncation() {
        let mut b = vec![0, 1, 0, 0, 0, 1, 0, 3];
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 9, 0, 0, 0, 0]);
        assert_eq!(
            decode_assignment(&b),
            vec![TopicAssignment {
                topic: "abc".to_string(),
                partitions: vec![4, 9]
            }]
        );
        for cut in 0..b.len() {
            let _ = decode_assignment(&b[..cut]);
        }
    }
}
