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
//!
//! Three checks stand between a batch and a Redis that lost or rolled back
//! its state, each for what the others cannot see:
//! - the progress check before every guard attempt
//!   (`ProgressRecords::check`): the epoch marker, and for every owned
//!   partition a record at least what idem wrote. It alone sees a restored
//!   snapshot or a promoted replica, which keep the marker;
//! - the guard script's epoch check (`IDEMEPOCH`): a Redis that lost its
//!   state between that check and the script;
//! - the progress record's own checks (the epoch, and each of the batch's
//!   partitions not below idem's record: `IDEMROLLBACK`), atomic with its
//!   write: so no second progress check runs between the guard and it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument;

use super::batch::Batch;
use super::link::{Ownership, StageEvent, StageReceiver, ToStage};
use super::recovery::{batch_ends, ProgressRecords};
use super::runs::Runs;
use super::shutdown::Shutdown;
use super::summary::Summary;
use super::timing::unix_millis;
use super::verdicts::{awaits_guard, dead_letters, give_verdicts, mark_replayed, recount_retried};
use crate::config::Config;
use crate::dlq::budget::DlqBudget;
use crate::dlq::{DeadLetter, DlqWriter};
use crate::guard::{Guard, GuardInput};
use crate::metrics::{self, Health};
use crate::model::Outcome;
use crate::offsets::TopicPartition;
use retry::{restart_for, retry, Control, DeadLettering, Guarding, Io, Recording, Stop};

pub struct GuardStage {
    /// The guard, Redis's progress records (written after each batch,
    /// checked before each batch and on a timer while idle), the dead letters.
    io: Io,
    /// The settings, `/readyz`, shutdown, and where the stage reports to the loop.
    ctl: Control,
    summary: Summary,
    budget: DlqBudget,
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
    /// `events`. Redis is reached only through `guard` and `progress`: a
    /// test gives them a connection through a fault-injecting proxy.
    pub fn new(
        config: &Arc<Config>,
        guard: Guard,
        progress: ProgressRecords,
        health: &Health,
        shutdown: &Shutdown,
        events: mpsc::UnboundedSender<StageEvent>,
    ) -> Result<GuardStage, rdkafka::error::KafkaError> {
        Ok(GuardStage {
            io: Io {
                guard,
                progress,
                dlq: DlqWriter::new(config)?,
            },
            ctl: Control {
                config: config.clone(),
                health: health.clone(),
                shutdown: shutdown.clone(),
                events,
            },
            summary: Summary::new(),
            budget: DlqBudget::new(config.dlq.ratio_window, config.dlq.max_ratio),
            stopped: false,
            idle_failures: 0,
            runs: Default::default(),
        })
    }

    /// Consumption was stopped in an earlier round (the pipeline holds the
    /// stop): the budget's verdict is not said again.
    pub fn already_stopped(mut self, stopped: bool) -> Self {
        self.stopped = stopped;
        self
    }

    /// Takes batches and ownership changes in order until the loop drops
    /// its end of the queue, shutdown fires while a write waits, or Redis's
    /// state changed. With nothing queued for `redis.progress_check_interval`,
    /// checks Redis's progress records: here, so the check never reads
    /// between two of the stage's own writes.
    pub async fn run(mut self, mut queue: StageReceiver) {
        let idle = self.ctl.config.redis.progress_check_interval;
        loop {
            let next = tokio::select! {
                // What is queued first: a batch runs the same check before it writes.
                biased;
                next = queue.recv() => next,
                _ = tokio::time::sleep(idle) => {
                    self.summary.maybe_log();
                    if self.check_while_idle().await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            match next {
                None => break,
                Some(ToStage::Ownership(change)) => self.take(change),
                Some(ToStage::Batch(batch)) => {
                    // Every log line of the batch names its records.
                    let span = tracing::info_span!("batch", records = batch.len(), offsets = %batch.describe());
                    if self.apply(batch).instrument(span).await.is_err() {
                        break;
                    }
                    self.summary.maybe_log();
                }
            }
        }
        self.summary.log();
    }

    /// Applies what the loop said about its partitions: every batch handed
    /// before it was applied already (one ordered queue).
    fn take(&mut self, change: Ownership) {
        match change {
            Ownership::Taken { floors, logs } => {
                self.io.progress.watch(floors);
                self.runs.take(logs);
            }
            Ownership::Released(tps) => {
                self.io.progress.release(&tps);
                self.runs.release(&tps);
            }
        }
    }

    /// The check while no batch runs. A Redis that does not answer is
    /// logged and tried again at the next turn; nothing is written meanwhile.
    async fn check_while_idle(&mut self) -> Result<(), Stop> {
        match self.io.progress.check().await {
            Ok(None) => {
                self.idle_failures = 0;
                self.ctl.health.set_redis_ok();
            }
            Ok(Some(changed)) => return Err(restart_for(&mut self.io, &self.ctl, changed).await),
            Err(e) => {
                self.idle_failures += 1;
                tracing::warn!(
                    error = %e,
                    retry_in = ?self.ctl.config.redis.progress_check_interval,
                    "cannot check Redis's progress records while idle; is Redis up?"
                );
                self.io
                    .redis_failed(&self.ctl, &e, self.idle_failures)
                    .await;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, mut batch: Batch) -> Result<(), Stop> {
        let started = Instant::now();
        let jumped = self.runs.jumped_back(&batch);
        if !jumped.is_empty() {
            return Err(self.log_replaced(&jumped));
        }
        let placed = self.runs.place(&batch);
        // Records in a decided range are replayed without asking Redis.
        mark_replayed(&mut batch, &placed.decided);
        self.count_invalid(&batch);
        self.wait_for_the_relay().await?;
        self.io.guard.begin_batch();
        let inputs: Vec<GuardInput<'_>> = batch
            .items
            .iter()
            .filter(|it| awaits_guard(it))
            .filter_map(|it| {
                Some(GuardInput {
                    event: it.decoded.as_ref().ok()?,
                    policy: &batch.policies[it.partition_index],
                    effects: &it.effects,
                    place: placed.place(it),
                })
            })
            .collect();
        let mut verdicts = retry(&mut self.io, &mut self.ctl, Guarding(&inputs)).await?;
        recount_retried(&inputs, &mut verdicts);
        drop(inputs);
        give_verdicts(&mut batch, verdicts);
        let letters = dead_letters(&batch);
        if !letters.is_empty() {
            retry(&mut self.io, &mut self.ctl, DeadLettering::new(&letters)).await?;
        }
        let claims = self.runs.claims(&batch);
        let ends = batch_ends(batch.positions());
        retry(
            &mut self.io,
            &mut self.ctl,
            Recording {
                ends,
                claims: &claims,
            },
        )
        .await?;
        self.runs.claimed(&claims);
        // Count before marking done: whoever sees the commit sees the counts.
        self.record(&batch);
        let _ = self.ctl.events.send(StageEvent::Finished(batch.finished()));
        self.check_budget(&batch, &letters);
        metrics::record_batch(batch.len(), started.elapsed());
        Ok(())
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
                self.ctl.config.dlq.ratio_window,
                self.ctl.config.dlq.max_ratio
            );
            tracing::error!(
                ratio = self.budget.ratio(),
                max_ratio = self.ctl.config.dlq.max_ratio,
                "{reason}: consumption stopped. Look at the dead letters with `idem dlq inspect`, fix the producer (or raise dlq.max_ratio), restart idem, then `idem dlq redrive` what should be applied"
            );
            self.stopped = true;
            let _ = self.ctl.events.send(StageEvent::StopConsuming(reason));
        }
    }

    /// Invalid records are counted (and logged) here, once per batch; one
    /// in a decided range was dead-lettered when first decided, and is the
    /// re-read it is (`replayed`).
    fn count_invalid(&mut self, batch: &Batch) {
        for it in &batch.items {
            let Err(invalid) = &it.decoded else {
                continue;
            };
            let tp = &batch.partitions[it.partition_index];
            if it.verdict.is_some() {
                metrics::record_outcome(&tp.topic, Outcome::Replayed, 1);
                self.summary.add(Outcome::Replayed, 1);
                continue;
            }
            tracing::warn!(
                topic = %tp.topic,
                partition = tp.partition,
                offset = it.offset,
                reason = %invalid.code(),
                error = %invalid,
                "invalid record dead-lettered (not applied; `idem dlq inspect` shows it)"
            );
            metrics::record_outcome(&tp.topic, Outcome::Invalid, 1);
            self.summary.add(Outcome::Invalid, 1);
        }
    }

    fn record(&mut self, batch: &Batch) {
        // Duplicate ages, conflict logs and outcome counts.
        let mut counts: HashMap<(usize, Outcome), u64> = HashMap::new();
        for it in &batch.items {
            // Invalid records were counted when the batch was placed.
            let (Ok(event), Some(v)) = (&it.decoded, &it.verdict) else {
                continue;
            };
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
                    let Some(rejection) = &v.rejection else {
                        continue;
                    };
                    tracing::warn!(
                        topic = %tp.topic,
                        partition = tp.partition,
                        offset = it.offset,
                        id = %event.id,
                        seq = event.seq,
                        reason = %rejection.reason,
                        "conflict: {}; not applied",
                        rejection.message
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
    /// With the changelog on: while the deepest outbox the last batch wrote
    /// to holds `changelog.max_outbox` entries or more (the relay cannot
    /// publish), waits before the next batch, so Redis does not grow
    /// without limit; the loop pauses fetching meanwhile.
    async fn wait_for_the_relay(&mut self) -> Result<(), Stop> {
        let max = self.ctl.config.changelog.max_outbox as u64;
        let (slot, mut depth) = self.io.guard.deepest_outbox();
        if self.ctl.config.changelog.topics.is_empty() || depth < max {
            // Also after a restarted stage, whose new guard measured nothing yet.
            self.ctl.health.set_changelog_full(None);
            return Ok(());
        }
        let where_ = slot.map_or("the outbox".to_string(), |s| {
            format!("the outbox of slot {s}")
        });
        let reason = format!(
            "{where_} holds {depth} changes, changelog.max_outbox = {max}: consumption waits for the relay to publish them (is the changelog topic there? see idem_changelog_publish_errors_total, docs/change-stream.md)"
        );
        tracing::warn!("{reason}");
        self.ctl.health.set_changelog_full(Some(reason));
        while depth >= max {
            tokio::select! {
                _ = self.ctl.shutdown.wait() => return Err(Stop::Shutdown),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match self.io.guard.measure_outbox(slot).await {
                Ok(d) => depth = d,
                Err(e) => tracing::warn!(error = %e, "cannot measure the outbox; waiting on"),
            }
        }
        self.ctl.health.set_changelog_full(None);
        tracing::info!(
            depth,
            "the outbox is below changelog.max_outbox again: consumption goes on"
        );
        Ok(())
    }

    /// Partitions whose offsets go back without a new assignment: their
    /// log was read again from an earlier offset (librdkafka's reset after
    /// a truncation, or a topic deleted and created again). Consumption
    /// restarts, so every partition resumes with the topic ids and records
    /// of the log as it is now; nothing of the batch is decided.
    fn log_replaced(&mut self, jumped: &[TopicPartition]) -> Stop {
        let detail = jumped
            .iter()
            .map(|tp| format!("{}/{}", tp.topic, tp.partition))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::error!(partitions = %detail, "a partition's log went back to an earlier offset without a new assignment (the topic was truncated or created again, or its cluster changed): consumption restarts with the log as it is now");
        let _ = self.ctl.events.send(StageEvent::LogReplaced(format!(
            "{detail} went back to an earlier offset"
        )));
        Stop::LogReplaced
    }
}

mod retry;
#[cfg(test)]
mod tests;
