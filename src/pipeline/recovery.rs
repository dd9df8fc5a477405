//! Keeping Redis's own progress records and acting on them: recording how
//! far each partition is applied after every batch, checking them after any
//! Redis failure before the next write, and choosing where newly assigned
//! partitions resume (`resume::decide`).
//!
//! Guarantee: a batch's offsets are marked done only after its progress
//! record is in Redis, so a record is never behind what Kafka may commit
//! with this epoch; and after a failed Redis call nothing is written again
//! until the records show that Redis still holds what idem recorded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::consumer::{Committed, Consumer};
use crate::metrics;
use crate::offsets::TopicPartition;
use crate::resume::{decide, Start};
use crate::store::progress::ProgressStore;
use crate::store::StoreError;

/// The guard stage's side: the records it wrote and the check after a failure.
pub struct RedisProgress {
    store: ProgressStore,
    epoch: String,
    /// Per partition, the highest next offset this instance recorded.
    recorded: HashMap<TopicPartition, i64>,
    /// A Redis call failed since the last check: Redis may have restarted.
    suspect: bool,
}

/// Redis no longer holds what idem recorded: consumption must restart from
/// what it holds.
#[derive(Debug, Clone)]
pub struct StateChanged {
    pub cause: &'static str,
    pub detail: String,
}

impl StateChanged {
    /// The change a refused Redis call reports (`IDEMEPOCH`, `IDEMROLLBACK`).
    pub fn from_refusal(e: &StoreError) -> Option<StateChanged> {
        match e {
            StoreError::EpochChanged { expected, found } => Some(StateChanged {
                cause: "epoch",
                detail: format!("epoch marker {found}, idem knows {expected}"),
            }),
            StoreError::RolledBack(detail) => Some(StateChanged {
                cause: "rolled_back",
                detail: detail.clone(),
            }),
            _ => None,
        }
    }
}

impl RedisProgress {
    pub fn new(store: ProgressStore, epoch: String) -> Self {
        RedisProgress {
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
    pub async fn record(&mut self, positions: &[(TopicPartition, i64)]) -> Result<(), StoreError> {
        let with_expected: Vec<(TopicPartition, i64, Option<i64>)> = positions
            .iter()
            .map(|(tp, next)| (tp.clone(), *next, self.recorded.get(tp).copied()))
            .collect();
        self.store.record(&self.epoch, &with_expected).await?;
        for (tp, next) in positions {
            let e = self.recorded.entry(tp.clone()).or_insert(*next);
            *e = (*e).max(*next);
        }
        Ok(())
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

    /// After a failure: whether Redis still holds the marker and at least
    /// the records this instance wrote (a restart without persistence
    /// loses both; a restored snapshot or a promoted replica, the last records).
    /// Runs before every batch (a reconnect can be silent: redis-rs
    /// resends, a proxy keeps the client's connection through a failover);
    /// `suspect` only says a failure happened since.
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
                        cause: "epoch",
                        detail: format!(
                            "{at}: epoch marker {:?}, idem knows {}",
                            s.marker, self.epoch
                        ),
                    }));
                }
                if s.next.is_none_or(|n| n < mine) {
                    return Ok(Some(StateChanged {
                        cause: "rolled_back",
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

impl super::apply::GuardStage {
    /// Logs and counts a change of Redis's state and asks the loop to
    /// restart consumption from what Redis holds. Returns `None`: the batch
    /// is not finished (nothing of it is committed).
    pub(super) async fn restart_for<T>(&mut self, changed: StateChanged) -> Option<T> {
        if changed.cause == "rolled_back" {
            self.progress.renew_epoch().await;
        }
        metrics::record_redis_state_change(changed.cause);
        tracing::error!(
            cause = changed.cause,
            detail = %changed.detail,
            "Redis lost or rolled back its state: nothing more is written; consumption restarts from the offsets Redis's state reflects"
        );
        self.restart.trigger();
        None
    }

    /// Records the batch's progress in Redis, retrying until it answers.
    /// False if shutdown fired first or Redis's state changed (then the
    /// batch stays unfinished).
    pub(super) async fn record_progress(&mut self, batch: &super::batch::Batch) -> bool {
        let ends = batch_ends(batch.positions());
        let mut backoff = super::Backoff::new(&self.config);
        loop {
            let attempt = match self.progress.check().await {
                Ok(Some(changed)) => return self.restart_for::<()>(changed).await.is_some(),
                Ok(None) => self.progress.record(&ends).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(()) => return true,
                Err(e) => {
                    if let Some(changed) = StateChanged::from_refusal(&e) {
                        return self.restart_for::<()>(changed).await.is_some();
                    }
                    self.progress.suspect();
                    metrics::record_retry(e.cause());
                    let wait = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot record the batch's progress in Redis; the batch waits and nothing past it is committed");
                    tokio::select! {
                        _ = self.shutdown.wait() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
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

/// A partition that resumes before its committed offset.
pub struct Rewind {
    pub tp: TopicPartition,
    pub to: i64,
    pub committed: i64,
}

/// Where each newly assigned partition resumes. Reads Redis's records,
/// decides (`resume::decide`), raises the records to the start positions
/// (the bootstrap of a deployment that had none) and says so loudly for
/// every rewind.
pub async fn resume_points(
    store: &mut ProgressStore,
    epoch: &str,
    consumer: &Arc<Consumer>,
    assigned: &[Committed],
    group: &str,
) -> Result<Result<Vec<Rewind>, Unrecoverable>, StoreError> {
    let tps: Vec<TopicPartition> = assigned.iter().map(|c| c.tp.clone()).collect();
    let views = store.read(&tps).await?;
    let mut rewinds = Vec::new();
    let mut starts = Vec::new();
    for (c, servers) in assigned.iter().zip(views) {
        let committed = c.offset.map(|o| (o, c.metadata.as_str()));
        let log_start = match decide(committed, &servers, i64::MAX) {
            Start::Refuse { .. } => low_watermark(consumer, &c.tp).await.ok_or_else(|| {
                StoreError::Protocol(format!(
                    "the brokers did not say where {}/{} starts",
                    c.tp.topic, c.tp.partition
                ))
            })?,
            _ => 0,
        };
        match decide(committed, &servers, log_start) {
            // Every assigned partition gets a record at once (0 where
            // nothing is committed: trivially true), so a snapshot taken
            // from now on has one, and a restore of it shows as behind.
            Start::Committed | Start::Bootstrap => {
                starts.push((c.tp.clone(), c.offset.unwrap_or(0), None));
            }
            Start::Rewind {
                to,
                committed,
                cause,
            } => {
                tracing::warn!(
                    topic = %c.tp.topic,
                    partition = c.tp.partition,
                    from = to,
                    committed,
                    records = committed - to,
                    cause = cause.as_str(),
                    "Redis's state stops before the committed offset (it {}): reading those records again; the guard turns what Redis still holds into duplicates",
                    cause.describe()
                );
                metrics::record_rewind(&c.tp.topic, cause.as_str(), committed - to);
                starts.push((c.tp.clone(), to, None));
                rewinds.push(Rewind {
                    tp: c.tp.clone(),
                    to,
                    committed,
                });
            }
            Start::Refuse {
                needed,
                log_start,
                cause,
                ..
            } => {
                return Ok(Err(Unrecoverable(format!(
                    "Redis {} for {}/{}: its state needs the records from offset {needed}, but the log now starts at {log_start} (retention deleted the rest); the effects of offsets {needed}..{} are gone from Redis and from Kafka. Restore Redis from a backup that holds them, or accept the loss and re-apply what the log still holds: `idem replay --group {group} --topic {} --to-earliest --execute` (a commit written by replay is taken as it is)",
                    cause.describe(),
                    c.tp.topic,
                    c.tp.partition,
                    log_start - 1,
                    c.tp.topic,
                ))));
            }
        }
    }
    store.record(epoch, &starts).await?;
    Ok(Ok(rewinds))
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
