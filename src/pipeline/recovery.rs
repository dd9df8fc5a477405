//! Keeping Redis's own progress records and acting on them: recording how
//! far each partition is applied after every batch, checking them before
//! every batch and on a timer while idle, and choosing where newly assigned
//! partitions resume (`resume::decide`).
//!
//! Guarantee: a batch's offsets are marked done only after its progress
//! record is in Redis, so a record is never behind what Kafka may commit
//! with this epoch; nothing is written until the records show that Redis
//! still holds what idem recorded; and an owned partition's records are
//! checked at least every `redis.progress_check_interval`, batch or not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::consumer::{Committed, Consumer};
use crate::consumed::{LogView, TopicId};
use crate::metrics;
use crate::offsets::TopicPartition;
use crate::resume::{decide, RedisHolds, Start};
use crate::store::progress::{Claim, MasterRecord, ProgressStore};
use crate::store::StoreError;

/// The guard stage's side: the records it wrote and their check.
pub struct ProgressRecords {
    store: ProgressStore,
    epoch: String,
    /// Per owned partition, the highest next offset this instance recorded
    /// (at the assignment, or after a batch): Redis must hold at least that.
    recorded: HashMap<TopicPartition, i64>,
    /// A Redis call failed since the last check: Redis may have restarted.
    suspect: bool,
}

/// Redis no longer holds what idem recorded: consumption must restart from
/// what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChanged {
    pub cause: Change,
    pub detail: String,
}

/// How Redis's state changed under a running idem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The epoch marker is gone or was renewed (Redis lost its state, or
    /// another instance found a rollback and renewed it).
    Epoch,
    /// A progress record is below what this instance recorded.
    RolledBack,
}

impl Change {
    /// The `cause` label of `idem_redis_state_changes_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Epoch => "epoch",
            Change::RolledBack => "rolled_back",
        }
    }
}

impl StateChanged {
    /// The change a refused Redis call reports (`IDEMEPOCH`, `IDEMROLLBACK`).
    pub fn from_refusal(e: &StoreError) -> Option<StateChanged> {
        match e {
            StoreError::EpochChanged { expected, found } => Some(StateChanged {
                cause: Change::Epoch,
                detail: format!("epoch marker {found}, idem knows {expected}"),
            }),
            StoreError::RolledBack(detail) => Some(StateChanged {
                cause: Change::RolledBack,
                detail: detail.clone(),
            }),
            _ => None,
        }
    }
}

impl ProgressRecords {
    pub fn new(store: ProgressStore, epoch: String) -> Self {
        ProgressRecords {
            store,
            epoch,
            recorded: HashMap::new(),
            suspect: false,
        }
    }

    /// Records that every record of `positions` before the given next
    /// offsets is applied.
    /// Refused (`RolledBack`) where a record is below what this instance
    /// wrote there: then Redis went back after this instance's last check.
    pub async fn record(
        &mut self,
        positions: &[(TopicPartition, i64)],
        claims: &[Claim],
    ) -> Result<(), StoreError> {
        let with_expected: Vec<(TopicPartition, i64, Option<i64>)> = positions
            .iter()
            .map(|(tp, next)| (tp.clone(), *next, self.recorded.get(tp).copied()))
            .collect();
        self.store
            .record(&self.epoch, &with_expected, claims)
            .await?;
        for (tp, next) in positions {
            // A partition released meanwhile is no longer this instance's to check.
            if let Some(e) = self.recorded.get_mut(tp) {
                *e = (*e).max(*next);
            }
        }
        Ok(())
    }

    /// Partitions assigned, each with the offset its record was raised to
    /// at the assignment: checked from now on.
    pub fn watch(&mut self, starts: Vec<(TopicPartition, i64)>) {
        self.recorded.extend(starts);
    }

    /// Partitions revoked or lost: no longer checked.
    pub fn release(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.recorded.remove(tp);
        }
    }

    /// After the guard replaced its connection: the same for the records.
    pub fn replace_connection(&mut self, conn: crate::store::RedisConn) {
        self.store.set_connection(conn);
    }

    /// Notes a failed Redis call (for the log of the next check).
    pub fn suspect(&mut self) {
        self.suspect = true;
    }

    /// After a rollback: renews the epoch so that every other instance's
    /// next write is refused too and each reads the records again (one that
    /// has written nothing since its assignment would not notice otherwise).
    pub async fn renew_epoch(&mut self) {
        match self.store.renew_epoch(&self.epoch).await {
            Ok(epoch) => {
                tracing::info!(epoch = %epoch, "renewed Redis's epoch marker so every instance re-reads the records")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not renew Redis's epoch marker; other instances notice at their own next check")
            }
        }
    }

    /// Whether Redis still holds the marker and, for every owned partition,
    /// at least the record this instance wrote or found at the assignment (a
    /// restart without persistence loses both; a restored snapshot or a
    /// promoted replica, the last records). Runs before every batch and on
    /// a timer while idle (a reconnect can be silent: redis-rs resends, a
    /// proxy keeps the client's connection through a failover); `suspect`
    /// only says a failure happened since. No owned partition: nothing to check.
    pub async fn check(&mut self) -> Result<Option<StateChanged>, StoreError> {
        let tps: Vec<TopicPartition> = self.recorded.keys().cloned().collect();
        if tps.is_empty() {
            return Ok(None);
        }
        let views = self.store.read(&tps).await?;
        self.suspect = false;
        for (tp, servers) in tps.iter().zip(views) {
            let mine = self.recorded[tp];
            for s in servers {
                let at = s
                    .node
                    .as_ref()
                    .map_or("redis".into(), |(h, p)| format!("{h}:{p}"));
                if s.marker.as_deref() != Some(self.epoch.as_str()) {
                    return Ok(Some(StateChanged {
                        cause: Change::Epoch,
                        detail: format!(
                            "{at}: epoch marker {:?}, idem knows {}",
                            s.marker, self.epoch
                        ),
                    }));
                }
                if s.next.is_none_or(|n| n < mine) {
                    return Ok(Some(StateChanged {
                        cause: Change::RolledBack,
                        detail: format!(
                            "{at}: progress of {}/{} is {:?}, idem recorded {mine}",
                            tp.topic, tp.partition, s.next
                        ),
                    }));
                }
            }
        }
        Ok(None)
    }
}

/// Per partition, each the next offset of the last record of the batch.
pub fn batch_ends<'a>(
    positions: impl Iterator<Item = (&'a TopicPartition, i64)>,
) -> Vec<(TopicPartition, i64)> {
    let mut ends: HashMap<&TopicPartition, i64> = HashMap::new();
    for (tp, offset) in positions {
        let e = ends.entry(tp).or_insert(offset + 1);
        *e = (*e).max(offset + 1);
    }
    ends.into_iter().map(|(tp, n)| (tp.clone(), n)).collect()
}

/// Redis lost effects that the log no longer holds: idem must not run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unrecoverable(pub String);

/// Where an assignment's partitions resume.
pub struct Resumed {
    /// Every assigned partition with the offset its progress record now
    /// holds at least (its start): what the guard stage checks from then on.
    pub floors: Vec<(TopicPartition, i64)>,
    /// The partitions that start before their committed offset.
    pub rewinds: Vec<Rewind>,
    /// What Redis says of each assigned partition's log, where its topic
    /// has an id (brokers before Kafka 2.8 give none: no offset marks).
    pub logs: Vec<(TopicPartition, LogView)>,
    /// The partitions whose commit idem did not write, with that commit:
    /// their records now reach it, and the loop commits it again with the
    /// metadata, so a loss from now on is seen like any other.
    pub bootstraps: Vec<(TopicPartition, i64)>,
}

/// Why an assignment's resume points could not be settled.
#[derive(Debug)]
pub enum ResumeError {
    /// Redis or the brokers did not answer: consumption restarts and asks again.
    Unreadable(StoreError),
    /// Redis lost effects the log no longer holds: idem must not run.
    Unrecoverable(Unrecoverable),
}

/// A partition that resumes before its committed offset.
pub struct Rewind {
    pub tp: TopicPartition,
    pub to: i64,
    pub committed: i64,
}

/// Who resumes, and how far the operator let it.
pub struct ResumeContext<'a> {
    pub epoch: &'a str,
    pub group: &'a str,
    /// `idem run --accept-commits`: an ambiguous start takes the commits.
    pub accept_commits: bool,
}

/// Where each newly assigned partition resumes. Reads Redis's records,
/// decides (`resume::decide`), raises the records to the start positions
/// (the bootstrap of a deployment that had none) and says so loudly for
/// every rewind.
pub async fn resume_points(
    store: &mut ProgressStore,
    context: &ResumeContext<'_>,
    consumer: &Arc<Consumer>,
    assigned: &[Committed],
) -> Result<Resumed, ResumeError> {
    let (epoch, group) = (context.epoch, context.group);
    let tps: Vec<TopicPartition> = assigned.iter().map(|c| c.tp.clone()).collect();
    let ids = learn_topic_ids(store, consumer, &tps).await?;
    let views = store.read(&tps).await.map_err(ResumeError::Unreadable)?;
    let mut rewinds = Vec::new();
    let mut bootstraps = Vec::new();
    let mut starts = Vec::new();
    let mut held: HashMap<TopicPartition, i64> = HashMap::new();
    // Asked once, and only for a bootstrap (a SCAN).
    let mut holds_entities: Option<bool> = None;
    for (c, servers) in assigned.iter().zip(views) {
        if let Some(h) = held_by_every_server(&servers) {
            held.insert(c.tp.clone(), h);
        }
        let start = start_of(store, context, consumer, c, &servers, &mut holds_entities).await?;
        match start {
            // Every assigned partition gets a record at once (0 where
            // nothing is committed: trivially true), so a snapshot taken
            // from now on has one, and a restore of it shows as behind.
            Start::Committed => {
                starts.push((c.tp.clone(), c.offset.unwrap_or(0), None));
            }
            Start::Bootstrap => {
                let committed = c.offset.unwrap_or(0);
                tracing::info!(topic = %c.tp.topic, partition = c.tp.partition, committed, "a commit idem did not write (an older version, or a plain Kafka client): taken as it is, Redis's records raised to it and the offset committed again with idem's metadata");
                starts.push((c.tp.clone(), committed, None));
                bootstraps.push((c.tp.clone(), committed));
            }
            Start::Rewind {
                to,
                committed,
                cause,
            } => {
                note_rewind(&c.tp, to, committed, cause);
                starts.push((c.tp.clone(), to, None));
                rewinds.push(Rewind {
                    tp: c.tp.clone(),
                    to,
                    committed,
                });
            }
            refused @ (Start::Refuse { .. } | Start::Ambiguous { .. }) => {
                let why = refusal(&refused, store.prefix(), group, &c.tp);
                return Err(ResumeError::Unrecoverable(Unrecoverable(why)));
            }
        }
    }
    store
        .record(epoch, &starts, &[])
        .await
        .map_err(ResumeError::Unreadable)?;
    let logs = log_views(store, &ids, &tps).await?;
    Ok(Resumed {
        floors: starts
            .into_iter()
            .map(|(tp, to, _)| (tp.clone(), held.get(&tp).map_or(to, |h| to.max(*h))))
            .collect(),
        rewinds,
        logs,
        bootstraps,
    })
}

/// Where one assigned partition starts: `resume::decide`, a bootstrap
/// judged by what Redis holds (`holds_entities` is asked once per
/// assignment, and only here), a rewind held to the log's start.
async fn start_of(
    store: &mut ProgressStore,
    context: &ResumeContext<'_>,
    consumer: &Arc<Consumer>,
    c: &Committed,
    servers: &[MasterRecord],
    holds_entities: &mut Option<bool>,
) -> Result<Start, ResumeError> {
    let committed = c.offset.map(|o| (o, c.metadata.as_str()));
    let mut start = judged_start(
        store,
        committed,
        servers,
        context.accept_commits,
        holds_entities,
    )
    .await
    .map_err(ResumeError::Unreadable)?;
    if let Start::Rewind { .. } = start {
        // Only a rewind needs the log: does it still hold the records?
        let log_start = low_watermark(consumer, &c.tp).await.ok_or_else(|| {
            ResumeError::Unreadable(StoreError::Protocol(format!(
                "the brokers did not say where {}/{} starts",
                c.tp.topic, c.tp.partition
            )))
        })?;
        start = start.within_log(log_start);
    }
    Ok(start)
}

/// A partition's start from its commit and what Redis holds
/// (`resume::decide`, a bootstrap then `Start::judged`): the decision of
/// `idem run`, and what `idem replay` checks before it moves a commit.
/// `holds_entities` keeps the answer of the one SCAN across a call's
/// partitions; it is asked only for a bootstrap where no server has records.
pub async fn judged_start(
    store: &mut ProgressStore,
    committed: Option<(i64, &str)>,
    servers: &[MasterRecord],
    accept_commits: bool,
    holds_entities: &mut Option<bool>,
) -> Result<Start, StoreError> {
    let start = decide(committed, servers);
    let records = servers.iter().any(|s| s.has_records);
    if start != Start::Bootstrap || records {
        return Ok(start);
    }
    let entities = match *holds_entities {
        Some(e) => e,
        None => *holds_entities.insert(store.holds_entities().await?),
    };
    let holds = RedisHolds { records, entities };
    Ok(start.judged(committed.map(|(o, _)| o), holds, accept_commits))
}

/// Why idem must not run, for a refused or ambiguous start: what happened
/// and what to run.
fn refusal(start: &Start, prefix: &str, group: &str, tp: &TopicPartition) -> String {
    match start {
        Start::Refuse {
            needed,
            log_start,
            cause,
            ..
        } => format!(
            "Redis {} for {}/{}: its state needs the records from offset {needed}, but the log now starts at {log_start} (retention deleted the rest); the effects of offsets {needed}..{} are gone from Redis and from Kafka. Restore Redis from a backup that holds them, or accept the loss and re-apply what the log still holds: `idem replay --group {group} --topic {} --to-earliest --execute` (replay ties its commit to Redis's state, and the next run reads from the log's start)",
            cause.describe(),
            tp.topic,
            tp.partition,
            log_start - 1,
            tp.topic,
        ),
        Start::Ambiguous { committed } => ambiguous_start(prefix, group, tp, *committed),
        other => format!("{}/{}: no refusal for {other:?}", tp.topic, tp.partition),
    }
}

/// The refusal of an ambiguous start: both readings and what to run for each.
fn ambiguous_start(prefix: &str, group: &str, tp: &TopicPartition, committed: i64) -> String {
    format!(
        "Redis holds no progress records and no entity under prefix {prefix:?}, and group {group}'s commit of {topic}/{partition} (offset {committed}) was not written by idem (a plain Kafka client such as kafka-consumer-groups, or an idem before progress records). \
         It reads two ways, and idem cannot tell which: \
         (1) this Redis is new and meant to start at the group's commits: start idem once with --accept-commits (IDEM_ACCEPT_COMMITS=true); the records before the commits are never applied to this Redis; \
         (2) Redis lost its state while idem was down: re-apply the log with `idem replay --group {group} --topic {topic} --to-earliest --execute`, then start idem (docs/runbook.md, \"An ambiguous start\")",
        topic = tp.topic,
        partition = tp.partition,
    )
}

/// The offset every server's record of a partition reaches (none where a
/// server has no record): Redis must keep holding at least that, so a later
/// restore from an older snapshot shows as a rollback even when the
/// partition starts lower (an operator's replay). Only the incarnation's
/// own records count: a plain record older versions wrote may count the
/// offsets of a topic since deleted and created again, which the new one's
/// records would never reach (a rollback found where there is none).
///
/// | records                     | held |
/// |-----------------------------|------|
/// | 500, 800                    | 500  |
/// | 500, none                   | none |
/// | 500, 800 (plain, not own)   | none |
/// | (no servers)                | none |
fn held_by_every_server(servers: &[MasterRecord]) -> Option<i64> {
    servers
        .iter()
        .map(|s| s.next.filter(|_| s.of_incarnation))
        .collect::<Option<Vec<i64>>>()?
        .into_iter()
        .min()
}

/// Says loudly that `tp` re-reads from `to`, before its commit.
fn note_rewind(tp: &TopicPartition, to: i64, committed: i64, cause: crate::resume::Cause) {
    tracing::warn!(
        topic = %tp.topic,
        partition = tp.partition,
        from = to,
        committed,
        records = committed - to,
        cause = cause.as_str(),
        "Redis's state stops before the committed offset (it {}): reading those records again; the guard turns what Redis still holds into duplicates",
        cause.describe()
    );
    metrics::record_rewind(&tp.topic, cause.as_str(), committed - to);
}

/// The partitions' topics' ids, asked of the brokers now so that a topic
/// created again shows its new one, and told to the store: its records are
/// read and written per incarnation from now on.
async fn learn_topic_ids(
    store: &ProgressStore,
    consumer: &Arc<Consumer>,
    tps: &[TopicPartition],
) -> Result<std::collections::BTreeMap<String, TopicId>, ResumeError> {
    let mut topics: Vec<String> = tps.iter().map(|tp| tp.topic.clone()).collect();
    topics.sort();
    topics.dedup();
    if topics.is_empty() {
        return Ok(Default::default());
    }
    let consumer = consumer.clone();
    let ids = tokio::task::spawn_blocking(move || {
        crate::kafka::topic_ids::topic_ids(consumer.client(), &topics, Duration::from_secs(10))
    })
    .await
    .map_err(|e| StoreError::Protocol(format!("the topic-id lookup panicked: {e}")))
    .and_then(|ids| {
        ids.map_err(|e| StoreError::Protocol(format!("cannot read the topics' ids: {e}")))
    })
    .map_err(ResumeError::Unreadable)?;
    store.learn_incarnations(&ids);
    Ok(ids)
}

/// Each partition's topic id and the ranges Redis says were decided in it.
async fn log_views(
    store: &mut ProgressStore,
    ids: &std::collections::BTreeMap<String, TopicId>,
    tps: &[TopicPartition],
) -> Result<Vec<(TopicPartition, LogView)>, ResumeError> {
    let with_ids: Vec<(TopicPartition, TopicId)> = tps
        .iter()
        .filter_map(|tp| Some((tp.clone(), ids.get(&tp.topic)?.clone())))
        .collect();
    let decided = store
        .read_decided(&with_ids)
        .await
        .map_err(ResumeError::Unreadable)?;
    Ok(with_ids
        .into_iter()
        .zip(decided)
        .map(|((tp, topic_id), decided)| (tp, LogView { topic_id, decided }))
        .collect())
}

/// The partition's first offset now (`None` if the brokers do not answer:
/// then nothing is assumed, and consumption restarts).
async fn low_watermark(consumer: &Arc<Consumer>, tp: &TopicPartition) -> Option<i64> {
    let consumer = consumer.clone();
    let tp = tp.clone();
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10))
            .ok()
            .map(|(low, _)| low)
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(next: Option<i64>) -> MasterRecord {
        MasterRecord {
            node: None,
            marker: Some("E".into()),
            next,
            has_records: next.is_some(),
            of_incarnation: true,
        }
    }

    /// The table of `held_by_every_server`.
    #[test]
    fn what_every_server_holds_by_table() {
        assert_eq!(
            held_by_every_server(&[server(Some(500)), server(Some(800))]),
            Some(500)
        );
        assert_eq!(
            held_by_every_server(&[server(Some(500)), server(None)]),
            None
        );
        let plain = MasterRecord {
            of_incarnation: false,
            ..server(Some(800))
        };
        assert_eq!(held_by_every_server(&[server(Some(500)), plain]), None);
        assert_eq!(held_by_every_server(&[]), None);
    }
}
