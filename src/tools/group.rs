//! A consumer group's members, assignment, committed offsets and lag, read
//! through Kafka's APIs without joining the group, under either group
//! protocol (`kafka::groups`).

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
    /// The commit's metadata (idem's names Redis's epoch: `resume`).
    #[serde(skip)]
    pub metadata: String,
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
    /// The group's protocol: `classic`, `consumer` (KIP-848), or `unknown`
    /// for a group the coordinator does not know.
    pub protocol: String,
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
    use crate::kafka::groups::{describe_group, GroupError};
    let described = describe_group(consumer.client(), group, timeout).map_err(|e| match e {
        GroupError::Timeout { .. } => anyhow::anyhow!(
            "describing group {group}: no answer from the brokers at {} within {timeout:?}; is kafka.brokers right and the broker up? (--timeout waits longer)",
            kafka.brokers
        ),
        other => anyhow::anyhow!("{other}"),
    })?;
    let members: Vec<Member> = described
        .members
        .into_iter()
        .map(|m| Member {
            member_id: m.member_id,
            client_id: m.client_id,
            host: m.host,
            assignment: by_topic(&m.assignment),
        })
        .collect();
    let (state, protocol) = (described.state, described.protocol);

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
        let found = committed.find_partition(e.topic(), e.partition());
        let metadata = found
            .as_ref()
            .map_or(String::new(), |c| c.metadata().to_string());
        let committed = match found.map(|c| c.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let from = committed.unwrap_or(low).max(low);
        partitions.push(PartitionLag {
            topic: e.topic().to_string(),
            partition: e.partition(),
            committed,
            metadata,
            log_start: low,
            end: high,
            lag: (high - from).max(0),
        });
    }
    let total_lag = partitions.iter().map(|p| p.lag).sum();
    Ok(GroupStatus {
        group: group.to_string(),
        state,
        protocol,
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

/// (topic, partition) pairs grouped by topic, in first-seen order, each
/// topic's partitions sorted.
fn by_topic(pairs: &[(String, i32)]) -> Vec<TopicAssignment> {
    let mut out: Vec<TopicAssignment> = Vec::new();
    for (topic, partition) in pairs {
        match out.iter_mut().find(|a| &a.topic == topic) {
            Some(a) => a.partitions.push(*partition),
            None => out.push(TopicAssignment {
                topic: topic.clone(),
                partitions: vec![*partition],
            }),
        }
    }
    for a in &mut out {
        a.partitions.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_group_by_topic() {
        let pairs = [
            ("b".to_string(), 3),
            ("a".to_string(), 1),
            ("b".to_string(), 0),
        ];
        assert_eq!(
            by_topic(&pairs),
            vec![
                TopicAssignment {
                    topic: "b".into(),
                    partitions: vec![0, 3]
                },
                TopicAssignment {
                    topic: "a".into(),
                    partitions: vec![1]
                },
            ]
        );
        assert!(by_topic(&[]).is_empty());
    }
}
