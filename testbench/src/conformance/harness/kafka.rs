//! Kafka helpers: topics, producing, committed and end offsets.

use super::*;
use rdkafka::types::RDKafkaErrorCode;

/// Creates `topic` and `topic.dlq`.
pub async fn create_topic(env: &Env, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let mut spec = TopicSpec::new(topic, partitions);
    spec.dead_letter = Some(format!("{topic}.dlq"));
    topics::apply(
        &idem::config::KafkaConfig::for_brokers(&env.brokers),
        &spec.with_companions(),
        true,
    )
    .await?;
    Ok(())
}

/// Sets one config of an existing topic (e.g. `max.message.bytes`).
pub async fn set_topic_config(
    env: &Env,
    topic: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()?;
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set(key, value);
    for r in admin.alter_configs([&change], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("setting {key} of {topic}: {e}"))?;
    }
    Ok(())
}

/// Deletes `topic`.
pub async fn delete_topic(env: &Env, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()?;
    for r in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("deleting {topic}: {e}"))?;
    }
    Ok(())
}

/// A raw record: key and value, either may be absent.
pub type RawRecord<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Produces records keyed by entity, waits for every acknowledgement, and
/// returns each record's (partition, offset).
pub async fn produce(
    env: &Env,
    topic: &str,
    records: &[SampleRecord],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let raw: Vec<RawRecord<'_>> = records
        .iter()
        .map(|r| (Some(r.key.as_bytes()), Some(r.value.as_slice())))
        .collect();
    produce_raw(env, topic, &raw).await
}

/// Produces raw key/value pairs in order, waits for every acknowledgement,
/// and returns each record's (partition, offset).
pub async fn produce_raw(
    env: &Env,
    topic: &str,
    records: &[RawRecord<'_>],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Scenarios produce records larger than librdkafka's default 1 MB.
        .set("message.max.bytes", "10000000")
        .create()?;
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let Some(v) = value {
                rec = rec.payload(v);
            }
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => anyhow::bail!("producing to {topic}: {e}"),
            }
        }
    }
    let mut out = Vec::with_capacity(pending.len());
    for f in pending {
        let d = f.await?.map_err(|(e, _)| e)?;
        out.push((d.partition, d.offset));
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(out)
}

pub(super) fn admin_consumer(env: &Env, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Committed offset per partition (-1 where none).
pub async fn committed(
    env: &Env,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    Ok(committed_metadata(env, group, topic, partitions)
        .await?
        .into_iter()
        .map(|(offset, _)| offset)
        .collect())
}

/// Committed offset (-1 where none) and its metadata, per partition.
pub async fn committed_metadata(
    env: &Env,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<(i64, String)>> {
    let (env, group, topic) = (env.clone(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c = admin_consumer(&env, &group)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        // A broker that just restarted (a fault the suite injects) answers
        // "not coordinator" or "loading" for a few seconds: ask again.
        let deadline = Instant::now() + COORDINATOR_SETTLE;
        let got = loop {
            match c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                Err(e) if is_coordinator_moving(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                got => break got?,
            }
        };
        Ok((0..partitions)
            .map(|p| match got.find_partition(&topic, p) {
                Some(e) => match e.offset() {
                    Offset::Offset(o) => (o, e.metadata().to_string()),
                    _ => (-1, String::new()),
                },
                None => (-1, String::new()),
            })
            .collect())
    })
    .await?
}

/// Commits `offsets` (partition i at offsets[i]; -1: left alone) for
/// `group` as any Kafka client does (`kafka-consumer-groups
/// --reset-offsets`): without idem's metadata.
pub async fn commit_plain(
    env: &Env,
    group: &str,
    topic: &str,
    offsets: &[i64],
) -> anyhow::Result<()> {
    let (env, group, topic, offsets) = (
        env.clone(),
        group.to_string(),
        topic.to_string(),
        offsets.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        let c = admin_consumer(&env, &group)?;
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets.iter().enumerate().filter(|(_, o)| **o >= 0) {
            tpl.add_partition_offset(&topic, p as i32, Offset::Offset(*o))?;
        }
        c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
        anyhow::Ok(())
    })
    .await?
}

/// How long a committed-offsets query waits for the group coordinator to settle.
const COORDINATOR_SETTLE: Duration = Duration::from_secs(30);

/// The coordinator is moving or loading its offsets: asking again helps.
pub(super) fn is_coordinator_moving(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(NotCoordinator | CoordinatorLoadInProgress | CoordinatorNotAvailable)
    )
}

pub async fn end_offsets(env: &Env, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let (env, topic) = (env.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c = admin_consumer(&env, "idem-conformance-watermarks")?;
        (0..partitions)
            .map(|p| Ok(c.fetch_watermarks(&topic, p, Duration::from_secs(10))?.1))
            .collect()
    })
    .await?
}

/// Waits until the group committed everything; returns how long it took.
pub async fn wait_caught_up(
    env: &Env,
    group: &str,
    topic: &str,
    partitions: i32,
    bound: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let end = end_offsets(env, topic, partitions).await?;
    loop {
        if is_caught_up(&committed(env, group, topic, partitions).await?, &end) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < bound,
            "I5: group {group} did not catch up within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether committed offsets (-1: none) reached the end offsets: a
/// partition that never got a record has nothing to commit.
pub fn is_caught_up(committed: &[i64], end: &[i64]) -> bool {
    committed
        .iter()
        .zip(end)
        .all(|(c, e)| c == e || (*e == 0 && *c < 0))
}
