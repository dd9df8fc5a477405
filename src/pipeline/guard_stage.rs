//! The guard stage: takes decoded batches in order, runs the guard for them
//! (retrying until Redis answers), writes dead letters, records Redis's
//! progress, counts outcomes and reports each batch finished. Between
//! batches it checks Redis's progress records on a timer, so a Redis that
//! went back under an idle partition is noticed too.
//!
//! Guarantee: batches are applied strictly in the order they were fetched,
//! one at a time, and a batch is reported finished only after Redis answered
//! for all of its events and holds its progress record (the commit-after-
//! effect rule of docs/guarantees.md rests on this). The stage steers the
//! loop only through [`StageEvent`]s, in the order it decided them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument;

use super::batch::{Batch, Finished};
use super::recovery::{batch_ends, ProgressRecords, StateChanged};
use super::runs::Runs;
use super::shutdown::Shutdown;
use super::summary::Summary;
use super::timing::{unix_millis, Backoff};
use super::verdicts::{dead_letters, recount_retried, with_replayed};
use crate::config::Config;
use crate::consumed::LogView;
use crate::dlq::budget::DlqBudget;
use crate::dlq::{DeadLetter, DlqWriter};
use crate::guard::{Guard, GuardInput, Verdict};
use crate::metrics::{self, Health};
use crate::model::Outcome;
use crate::offsets::TopicPartition;
use crate::store::progress::Claim;

/// Consecutive failures after which the Redis connection is replaced.
const RECONNECT_AFTER: u32 = 3;

/// What the guard stage tells the loop: the only way it steers it.
#[derive(Debug)]
pub enum StageEvent {
    /// A batch is applied and its progress recorded: its offsets are done.
    Finished(Finished),
    /// The dead-letter budget is exceeded: fetch nothing more (the reason
    /// is what `/readyz` and the log show).
    StopConsuming(String),
    /// Redis lost or rolled back its state (a refused write, or the
    /// progress check): nothing more is written, consumption restarts from
    /// what Redis holds.
    Restart(StateChanged),
    /// A partition's log went back to an earlier offset without a new
    /// assignment (truncated, or deleted and created again): consumption
    /// restarts, so every partition resumes with the ids and records of the
    /// log as it is now.
    LogReplaced(String),
}

/// What the loop tells the guard stage besides batches: which partitions
/// it owns, so the progress check covers exactly those.
#[derive(Debug)]
pub enum Ownership {
    /// Assigned: each partition with the offset Redis's record was raised
    /// to at the assignment (the check expects at least that from then on),
    /// and what Redis says of its log (where its topic has an id).
    Taken {
        floors: Vec<(TopicPartition, i64)>,
        logs: Vec<(TopicPartition, LogView)>,
        /// Batches up to this `seq` were fetched before the assignment: a
        /// partition's run begins with the first batch after it.
        after_batch: u64,
    },
    /// Revoked or lost: no longer checked.
    Released(Vec<TopicPartition>),
}

pub struct GuardStage {
    config: Arc<Config>,
    guard: Guard,
    health: Health,
    shutdown: Shutdown,
    summary: Summary,
    dlq: DlqWriter,
    budget: DlqBudget,
    /// Where the stage reports to the loop.
    events: mpsc::UnboundedSender<StageEvent>,
    /// The partitions the loop owns, as it takes and releases them.
    ownership: mpsc::UnboundedReceiver<Ownership>,
    /// Redis's progress records: written after each batch, checked before
    /// each batch and on a timer while idle.
    progress: ProgressRecords,
    /// Consumption was stopped (dead-letter budget): said once.
    stopped: bool,
    /// Idle progress checks that failed in a row (the connection is
    /// replaced every `RECONNECT_AFTER`).
    idle_failures: u32,
    /// The runs of consumption of the owned partitions (offset marks).
    runs: Runs,
}

impl GuardStage {
    /// A stage for `guard` and Redis's progress records, reporting on
    /// `events` and told of the loop's partitions on `ownership`. Redis is
    /// reached only through `guard` and `progress`: a test gives them a
    /// connection through a fault-injecting proxy.
    pub fn new(
        config: &Arc<Config>,
        guard: Guard,
        progress: ProgressRecords,
        health: &Health,
        shutdown: &Shutdown,
        events: mpsc::UnboundedSender<StageEvent>,
        ownership: mpsc::UnboundedReceiver<Ownership>,
    ) -> Result<GuardStage, rdkafka::error::KafkaError> {
        Ok(GuardStage {
            config: config.clone(),
            guard,
            health: health.clone(),
            shutdown: shutdown.clone(),
            summary: Summary::new(),
            dlq: DlqWriter::new(config)?,
            budget: DlqBudget::new(config.dlq.ratio_window, config.dlq.max_ratio),
            events,
            ownership,
            progress,
            // A stop outlives a restart of consumption: only a restart of idem lifts it.
            stopped: health.stopped_reason().is_some(),
            idle_failures: 0,
            runs: Default::default(),
        })
    }

    /// Applies batches until the channel closes, shutdown fires while Redis
    /// fails, or Redis's state changed. With no batch for
    /// `redis.progress_check_interval`, checks Redis's progress records:
    /// here, so the check never reads between two of the stage's own writes.
    pub async fn run(mut self, mut batches: mpsc::Receiver<Batch>) {
        let idle = self.config.redis.progress_check_interval;
        loop {
            tokio::select! {
                // A batch first: it runs the same check before it writes.
                biased;
                batch = batches.recv() => {
                    let Some(batch) = batch else { break };
                    self.take_ownership();
                    // Every log line of the batch names its records.
                    let span = tracing::info_span!("batch", records = batch.len(), offsets = %batch.describe());
                    if !self.apply(batch).instrument(span).await {
                        break;
                    }
                    self.summary.maybe_log();
                }
                _ = tokio::time::sleep(idle) => {
                    self.take_ownership();
                    self.summary.maybe_log();
                    if !self.check_while_idle().await {
                        break;
                    }
                }
            }
        }
        self.summary.log();
    }

    /// Applies what the loop said about its partitions (all of it sent
    /// before the batch at hand, so a batch's partitions are known).
    fn take_ownership(&mut self) {
        while let Ok(change) = self.ownership.try_recv() {
            match change {
                Ownership::Taken {
                    floors,
                    logs,
                    after_batch,
                } => {
                    self.progress.watch(floors);
                    self.runs.take(logs, after_batch);
                }
                Ownership::Released(tps) => {
                    self.progress.release(&tps);
                    self.runs.release(&tps);
                }
            }
        }
    }

    /// The check while no batch runs. False when Redis's state changed (the
    /// loop was told to restart). A Redis that does not answer is logged
    /// and tried again at the next turn; nothing is written meanwhile.
    async fn check_while_idle(&mut self) -> bool {
        match self.progress.check().await {
            Ok(None) => {
                self.idle_failures = 0;
                self.health.set_redis_ok();
                true
            }
            Ok(Some(changed)) => {
                self.restart_for(changed).await;
                false
            }
            Err(e) => {
                self.progress.suspect();
                self.health
                    .set_redis_failing(&self.config.redis.url, &e, e.is_auth_refusal());
                self.idle_failures += 1;
                tracing::warn!(
                    error = %e,
                    retry_in = ?self.config.redis.progress_check_interval,
                    "cannot check Redis's progress records while idle; is Redis up?"
                );
                if self.idle_failures % RECONNECT_AFTER == 0 {
                    self.reconnect(self.idle_failures).await;
                }
                true
            }
        }
    }

    async fn apply(&mut self, batch: Batch) -> bool {
        let started = Instant::now();
        let jumped = self.runs.jumped_back(&batch);
        if !jumped.is_empty() {
            self.log_replaced(&jumped);
            return false;
        }
        let placed = self.runs.place(&batch);
        self.count_invalid(&batch, &placed.decided);
        // Records in a decided range are replayed without asking Redis.
        let inputs: Vec<GuardInput<'_>> = batch
            .items
            .iter()
            .zip(&placed.decided)
            .filter(|(_, decided)| !**decided)
            .filter_map(|(it, _)| {
                it.decoded.as_ref().ok().map(|event| GuardInput {
                    event,
                    window: batch.windows[it.partition_index],
                    effects: &it.effects,
                    place: placed.place(it),
                })
            })
            .collect();
        if !self.wait_for_the_relay().await {
            return false;
        }
        self.guard.begin_batch();
        let Some(mut verdicts) = self.guard_with_retry(&inputs).await else {
            return false;
        };
        recount_retried(&inputs, &mut verdicts);
        drop(inputs);
        let verdicts = with_replayed(&batch, &placed.decided, verdicts);
        let letters = dead_letters(&batch, &verdicts, &placed.decided);
        if !letters.is_empty() && !self.dead_letter_with_retry(&letters).await {
            return false;
        }
        let claims = self.runs.claims(&batch);
        if !self.record_batch_progress(&batch, &claims).await {
            return false;
        }
        self.runs.claimed(&claims);
        // Count before marking done: whoever sees the commit sees the counts.
        self.record(&batch, &verdicts);
        let _ = self.events.send(StageEvent::Finished(batch.finished()));
        self.check_budget(&batch, &letters);
        metrics::record_batch(batch.len(), started.elapsed());
        true
    }

    /// Writes dead letters until Kafka acknowledges all of them. Returns
    /// false if shutdown fired first: the batch then stays unfinished.
    async fn dead_letter_with_retry(&mut self, letters: &[DeadLetter<'_>]) -> bool {
        let mut backoff = Backoff::new(&self.config);
        let mut delivered = vec![false; letters.len()];
        loop {
            match self.dlq.send_all(letters, &mut delivered).await {
                Ok(()) => {
                    self.health.set_waiting_on(None);
                    for l in letters {
                        metrics::record_dead_letter(&l.source.topic, l.reason);
                    }
                    return true;
                }
                Err(e) => {
                    self.health.set_waiting_on(Some("dead_letter"));
                    metrics::record_retry("dead_letter");
                    let wait = backoff.next();
                    tracing::warn!(
                        error = %e,
                        hint = e.hint(),
                        records = letters.len(),
                        dlq_topic = %self.config.dlq.topic_for(&letters[0].source.topic),
                        retry_in = ?wait,
                        "cannot write to the dead-letter topic; the batch waits and nothing past it is committed"
                    );
                    tokio::select! {
                        _ = self.shutdown.wait() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn check_budget(&mut self, batch: &Batch, letters: &[DeadLetter<'_>]) {
        let dead = letters.len();
        for i in 0..batch.len() {
            self.budget.record(i < dead);
        }
        if self.budget.is_exceeded() && !self.stopped {
            let reason = format!(
                "dead-letter ratio {:.2} over the last {} records exceeds dlq.max_ratio = {}",
                self.budget.ratio(),
                self.config.dlq.ratio_window,
                self.config.dlq.max_ratio
            );
            tracing::error!(
                ratio = self.budget.ratio(),
                max_ratio = self.config.dlq.max_ratio,
                "{reason}: consumption stopped. Look at the dead letters with `idem dlq inspect`, fix the producer (or raise dlq.max_ratio), restart idem, then `idem dlq redrive` what should be applied"
            );
            self.stopped = true;
            let _ = self.events.send(StageEvent::StopConsuming(reason));
        }
    }

    /// Invalid records are counted (and logged) here, once per batch; one
    /// in a decided range was dead-lettered when first decided, and is the
    /// re-read it is (`replayed`).
    fn count_invalid(&mut self, batch: &Batch, decided: &[bool]) {
        for (it, decided) in batch.items.iter().zip(decided) {
            let Err(invalid) = &it.decoded else {
                continue;
            };
            let tp = &batch.partitions[it.partition_index];
            if *decided {
                metrics::record_outcome(&tp.topic, Outcome::Replayed, 1);
                self.summary.add(Outcome::Replayed, 1);
                continue;
            }
            tracing::warn!(
                topic = %tp.topic,
                partition = tp.partition,
                offset = it.offset,
                reason = invalid.code(),
                error = %invalid,
                "invalid record dead-lettered (not applied; `idem dlq inspect` shows it)"
            );
            metrics::record_outcome(&tp.topic, Outcome::Invalid, 1);
            self.summary.add(Outcome::Invalid, 1);
        }
    }

    fn record(&mut self, batch: &Batch, verdicts: &[Verdict]) {
        // Duplicate ages, conflict logs and outcome counts.
        let mut counts: HashMap<(usize, Outcome), u64> = HashMap::new();
        let mut verdicts = verdicts.iter();
        for it in &batch.items {
            let Ok(event) = &it.decoded else {
                continue; // invalid records were counted when decoded
            };
            let v = verdicts.next().expect("one verdict per decoded event");
            *counts.entry((it.partition_index, v.outcome)).or_default() += 1;
            if v.dense_seqs_closed > 0 {
                let tp = &batch.partitions[it.partition_index];
                metrics::record_dense_seqs_closed(&tp.topic, v.dense_seqs_closed);
                tracing::warn!(
                    topic = %tp.topic,
                    partition = tp.partition,
                    entity = %event.entity,
                    seqs = v.dense_seqs_closed,
                    "dense seqs closed without their events: more than 32 later seqs waited above the gap; a late event in it will be dead-lettered (seq_gap_closed)"
                );
            }
            match v.outcome {
                Outcome::Duplicate => {
                    if let Some(age) = v.duplicate_age {
                        metrics::record_duplicate_age(age);
                    }
                }
                Outcome::Conflict if v.rejection.is_some() => {
                    let tp = &batch.partitions[it.partition_index];
                    let (reason, message) = v.rejection.as_ref().expect("checked");
                    tracing::warn!(
                        topic = %tp.topic,
                        partition = tp.partition,
                        offset = it.offset,
                        id = %event.id,
                        seq = event.seq,
                        reason = %reason,
                        "conflict: {message}; not applied"
                    );
                }
                Outcome::Conflict => {
                    let tp = &batch.partitions[it.partition_index];
                    tracing::warn!(
                        topic = %tp.topic,
                        partition = tp.partition,
                        offset = it.offset,
                        id = %event.id,
                        fingerprint = %format!("{:016x}", event.fingerprint),
                        remembered = %format!("{:016x}", v.remembered_fingerprint.unwrap_or(0)),
                        "conflict: id reused with a different payload; not applied"
                    );
                }
                _ => {}
            }
        }
        for ((partition, outcome), n) in counts {
            metrics::record_outcome(&batch.partitions[partition].topic, outcome, n);
            self.summary.add(outcome, n);
        }
        let now_ms = unix_millis();
        metrics::record_event_latencies(
            batch
                .items
                .iter()
                .filter_map(|it| Some((now_ms - it.timestamp_ms?).max(0) as f64 / 1000.0)),
        );
    }
}

impl GuardStage {
    /// After repeated failures, a fresh connection for the guard and the
    /// progress records: it can recover where a long-lived client stays
    /// stuck (a failover that moved the address, a cluster topology change).
    async fn reconnect(&mut self, failures: u32) {
        match crate::store::connect(&self.config.redis).await {
            Ok(conn) => {
                tracing::warn!(failures, "redis keeps failing: replaced the connection");
                self.progress.replace_connection(conn.clone());
                self.guard.replace_connection(conn);
            }
            Err(e) => tracing::warn!(error = %e, "redis reconnect failed"),
        }
    }

    /// With the changelog on: while the deepest outbox the last batch wrote
    /// to holds `changelog.max_outbox` entries or more (the relay cannot
    /// publish), waits before the next batch, so Redis does not grow
    /// without limit; the loop pauses fetching meanwhile. False if shutdown
    /// fired first.
    async fn wait_for_the_relay(&mut self) -> bool {
        let max = self.config.changelog.max_outbox as u64;
        let (slot, mut depth) = self.guard.deepest_outbox();
        if self.config.changelog.topics.is_empty() || depth < max {
            // Also after a restarted stage, whose new guard measured nothing yet.
            self.health.set_changelog_full(None);
            return true;
        }
        let where_ = slot.map_or("the outbox".to_string(), |s| {
            format!("the outbox of slot {s}")
        });
        let reason = format!(
            "{where_} holds {depth} changes, changelog.max_outbox = {max}: consumption waits for the relay to publish them (is the changelog topic there? see idem_changelog_publish_errors_total, docs/change-stream.md)"
        );
        tracing::warn!("{reason}");
        self.health.set_changelog_full(Some(reason));
        while depth >= max {
            tokio::select! {
                _ = self.shutdown.wait() => return false,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match self.guard.measure_outbox(slot).await {
                Ok(d) => depth = d,
                Err(e) => tracing::warn!(error = %e, "cannot measure the outbox; waiting on"),
            }
        }
        self.health.set_changelog_full(None);
        tracing::info!(
            depth,
            "the outbox is below changelog.max_outbox again: consumption goes on"
        );
        true
    }

    /// Runs the guard until Redis answers; `None` if shutdown fired first.
    async fn guard_with_retry(&mut self, inputs: &[GuardInput<'_>]) -> Option<Vec<Verdict>> {
        let mut backoff = Backoff::new(&self.config);
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            // After a failure, nothing is written before the check says
            // Redis still holds what idem recorded.
            let attempt = match self.progress.check().await {
                Ok(Some(changed)) => {
                    self.restart_for(changed).await;
                    return None;
                }
                Ok(None) => self.guard.apply(inputs).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(verdicts) => {
                    metrics::record_round_trip(started.elapsed());
                    self.health.set_redis_ok();
                    self.health.set_waiting_on(None);
                    return Some(verdicts);
                }
                Err(e) => {
                    if let Some(changed) = StateChanged::from_refusal(&e) {
                        self.restart_for(changed).await;
                        return None;
                    }
                    self.progress.suspect();
                    self.health
                        .set_redis_failing(&self.config.redis.url, &e, e.is_auth_refusal());
                    self.health.set_waiting_on(Some("redis"));
                    metrics::record_retry(e.cause());
                    failures += 1;
                    if failures % RECONNECT_AFTER == 0 {
                        self.reconnect(failures).await;
                    }
                    let wait: Duration = backoff.next();
                    tracing::warn!(
                        error = %e,
                        retryable = e.is_retryable(),
                        events = inputs.len(),
                        retry_in = ?wait,
                        "redis guard call failed; nothing past this batch is committed until it succeeds"
                    );
                    tokio::select! {
                        _ = self.shutdown.wait() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Partitions whose offsets go back without a new assignment: their
    /// log was read again from an earlier offset (librdkafka's reset after
    /// a truncation, or a topic deleted and created again). Consumption
    /// restarts, so every partition resumes with the topic ids and records
    /// of the log as it is now; nothing of the batch is decided.
    fn log_replaced(&mut self, jumped: &[TopicPartition]) {
        let detail = jumped
            .iter()
            .map(|tp| format!("{}/{}", tp.topic, tp.partition))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::error!(partitions = %detail, "a partition's log went back to an earlier offset without a new assignment (the topic was truncated or created again, or its cluster changed): consumption restarts with the log as it is now");
        let _ = self.events.send(StageEvent::LogReplaced(format!(
            "{detail} went back to an earlier offset"
        )));
    }

    /// Logs and counts a change of Redis's state and tells the loop to
    /// restart consumption from what Redis holds. The batch at hand stays
    /// unfinished (nothing of it is committed).
    async fn restart_for(&mut self, changed: StateChanged) {
        if changed.cause == super::recovery::Change::RolledBack {
            self.progress.renew_epoch().await;
        }
        metrics::record_redis_state_change(changed.cause.as_str());
        tracing::error!(
            cause = changed.cause.as_str(),
            detail = %changed.detail,
            "Redis lost or rolled back its state: nothing more is written; consumption restarts from the offsets Redis's state reflects"
        );
        let _ = self.events.send(StageEvent::Restart(changed));
    }

    /// Records the batch's progress and its runs' claims in Redis, retrying
    /// until it answers. False if shutdown fired first or Redis's state
    /// changed (then the batch stays unfinished).
    async fn record_batch_progress(&mut self, batch: &Batch, claims: &[Claim]) -> bool {
        let ends = batch_ends(batch.positions());
        let mut backoff = Backoff::new(&self.config);
        loop {
            let attempt = match self.progress.check().await {
                Ok(Some(changed)) => {
                    self.restart_for(changed).await;
                    return false;
                }
                Ok(None) => self.progress.record(&ends, claims).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(()) => return true,
                Err(e) => {
                    if let Some(changed) = StateChanged::from_refusal(&e) {
                        self.restart_for(changed).await;
                        return false;
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

#[cfg(test)]
mod tests;
