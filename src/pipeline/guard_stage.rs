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
use super::shutdown::Shutdown;
use super::summary::Summary;
use super::timing::{unix_millis, Backoff};
use crate::config::Config;
use crate::dlq::budget::DlqBudget;
use crate::dlq::{DeadLetter, DlqWriter};
use crate::guard::{Guard, GuardInput, Verdict};
use crate::metrics::{self, Health};
use crate::model::Outcome;
use crate::offsets::TopicPartition;

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
}

/// What the loop tells the guard stage besides batches: which partitions
/// it owns, so the progress check covers exactly those.
#[derive(Debug)]
pub enum Ownership {
    /// Assigned, each with the offset Redis's record was raised to at the
    /// assignment: the check expects at least that from then on.
    Taken(Vec<(TopicPartition, i64)>),
    /// Revoked or lost: no longer checked.
    Released(Vec<TopicPartition>),
}

pub struct GuardStage {
    pub config: Arc<Config>,
    pub guard: Guard,
    pub health: Health,
    pub shutdown: Shutdown,
    pub summary: Summary,
    pub dlq: DlqWriter,
    pub budget: DlqBudget,
    /// Where the stage reports to the loop.
    pub events: mpsc::UnboundedSender<StageEvent>,
    /// The partitions the loop owns, as it takes and releases them.
    pub ownership: mpsc::UnboundedReceiver<Ownership>,
    /// Redis's progress records: written after each batch, checked before
    /// each batch and on a timer while idle.
    pub progress: ProgressRecords,
    /// Consumption was stopped (dead-letter budget): said once.
    pub stopped: bool,
    /// Idle progress checks that failed in a row (the connection is
    /// replaced every `RECONNECT_AFTER`).
    pub idle_failures: u32,
}

impl GuardStage {
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
                Ownership::Taken(starts) => self.progress.watch(starts),
                Ownership::Released(tps) => self.progress.release(&tps),
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
                self.health.set_redis_ok(true);
                true
            }
            Ok(Some(changed)) => {
                self.restart_for(changed).await;
                false
            }
            Err(e) => {
                self.progress.suspect();
                self.health.set_redis_ok(false);
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
        self.count_invalid(&batch);
        let inputs: Vec<GuardInput<'_>> = batch
            .items
            .iter()
            .filter_map(|it| {
                it.decoded.as_ref().ok().map(|event| GuardInput {
                    event,
                    window: batch.windows[it.partition_index],
                    effects: &it.effects,
                })
            })
            .collect();
        self.guard.begin_batch();
        let Some(mut verdicts) = self.guard_with_retry(&inputs).await else {
            return false;
        };
        recount_retried(&inputs, &mut verdicts);
        drop(inputs);
        let letters = dead_letters(&batch, &verdicts);
        if !letters.is_empty() && !self.dead_letter_with_retry(&letters).await {
            return false;
        }
        if !self.record_batch_progress(&batch).await {
            return false;
        }
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

    fn count_invalid(&mut self, batch: &Batch) {
        for it in &batch.items {
            if let Err(invalid) = &it.decoded {
                let tp = &batch.partitions[it.partition_index];
                tracing::warn!(
                    topic = %tp.topic,
                    partition = tp.partition,
                    offset = it.offset,
                    reason = invalid.code(),
                    error = %invalid,
                    "invalid record skipped"
                );
                metrics::record_outcome(&tp.topic, Outcome::Invalid, 1);
                self.summary.add(Outcome::Invalid, 1);
            }
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
            match v.outcome {
                Outcome::Duplicate => {
                    if let Some(age) = v.duplicate_age {
                        metrics::record_duplicate_age(age);
                    }
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

/// After a retried batch: an event that an earlier, failed attempt decided
/// (Redis ran the script, the reply was lost) comes back `duplicate`. The
/// guard says so (the id mark carries the batch's token and its decision),
/// and it is counted as what that attempt decided, applied or stale, for the
/// first occurrence of its id in the batch only (a second occurrence is a
/// real redelivery).
///
/// | verdict                         | first in batch | counted as          |
/// |---------------------------------|----------------|---------------------|
/// | duplicate, no earlier attempt   | any            | duplicate           |
/// | duplicate, earlier attempt: X   | yes            | X (applied, stale)  |
/// | duplicate, earlier attempt: X   | no             | duplicate           |
/// | anything else                   | any            | itself              |
fn recount_retried(inputs: &[GuardInput<'_>], verdicts: &mut [Verdict]) {
    let mut seen = std::collections::HashSet::new();
    for (input, v) in inputs.iter().zip(verdicts.iter_mut()) {
        let first_in_batch = seen.insert((input.event.entity.as_str(), input.event.id.as_str()));
        if let (Outcome::Duplicate, Some(decided), true) =
            (v.outcome, v.earlier_attempt, first_in_batch)
        {
            *v = Verdict {
                outcome: decided,
                duplicate_age: None,
                remembered_fingerprint: None,
                earlier_attempt: None,
                rejection: None,
            };
        }
    }
}

/// The batch's invalid records and conflicts, in batch order.
fn dead_letters<'a>(batch: &'a Batch, verdicts: &[Verdict]) -> Vec<DeadLetter<'a>> {
    let mut letters = Vec::new();
    let mut verdicts = verdicts.iter();
    for it in &batch.items {
        let (reason, message, fingerprints) = match &it.decoded {
            Err(invalid) => (invalid.code(), invalid.to_string(), None),
            Ok(event) => {
                let v = verdicts.next().expect("one verdict per decoded event");
                if let Some((reason, message)) = &v.rejection {
                    letters.push(letter(batch, it, reason, message.clone(), None));
                    continue;
                }
                if v.outcome != Outcome::Conflict {
                    continue;
                }
                let remembered = v.remembered_fingerprint.unwrap_or(0);
                (
                    "conflict",
                    format!(
                        "id {:?} was seen with another payload (fingerprint {remembered:016x}, this one {:016x})",
                        event.id, event.fingerprint
                    ),
                    Some((event.fingerprint, remembered)),
                )
            }
        };
        letters.push(letter(batch, it, reason, message, fingerprints));
    }
    letters
}

fn letter<'a>(
    batch: &'a Batch,
    it: &'a super::batch::Item,
    reason: &'static str,
    message: String,
    fingerprints: Option<(u64, u64)>,
) -> DeadLetter<'a> {
    DeadLetter {
        source: &batch.partitions[it.partition_index],
        offset: it.offset,
        timestamp_ms: it.timestamp_ms,
        key: it.key.as_deref(),
        value: it.value.as_deref(),
        headers: &it.headers,
        reason,
        message,
        fingerprints,
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
                    self.health.set_redis_ok(true);
                    self.health.set_waiting_on(None);
                    return Some(verdicts);
                }
                Err(e) => {
                    if let Some(changed) = StateChanged::from_refusal(&e) {
                        self.restart_for(changed).await;
                        return None;
                    }
                    self.progress.suspect();
                    self.health.set_redis_ok(false);
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

    /// Records the batch's progress in Redis, retrying until it answers.
    /// False if shutdown fired first or Redis's state changed (then the
    /// batch stays unfinished).
    async fn record_batch_progress(&mut self, batch: &Batch) -> bool {
        let ends = batch_ends(batch.positions());
        let mut backoff = Backoff::new(&self.config);
        loop {
            let attempt = match self.progress.check().await {
                Ok(Some(changed)) => {
                    self.restart_for(changed).await;
                    return false;
                }
                Ok(None) => self.progress.record(&ends).await,
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
mod tests {
    use super::*;
    use crate::event::{Event, Op};

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            entity: "e".into(),
            seq: 1,
            op: Op::Upsert,
            kind: None,
            set: Vec::new(),
            unset: Vec::new(),
            fingerprint: 0,
        }
    }

    fn verdict(outcome: Outcome, earlier_attempt: Option<Outcome>) -> Verdict {
        Verdict {
            outcome,
            duplicate_age: (outcome == Outcome::Duplicate).then(|| Duration::from_millis(3)),
            remembered_fingerprint: None,
            earlier_attempt,
            rejection: None,
        }
    }

    /// The truth table of `recount_retried`, row by row.
    #[test]
    fn retried_batches_count_what_their_lost_attempt_decided() {
        let events = [event("a"), event("b"), event("a"), event("c"), event("d")];
        let inputs: Vec<GuardInput<'_>> = events
            .iter()
            .map(|event| GuardInput {
                event,
                window: Duration::from_secs(60),
                effects: &crate::effects::MERGE,
            })
            .collect();
        use Outcome::*;
        // a: applied by the lost attempt; b: a real duplicate (an earlier
        // batch); a again: a redelivery inside the batch; c: applied now;
        // d: found stale by the lost attempt.
        let mut verdicts = vec![
            verdict(Duplicate, Some(Applied)),
            verdict(Duplicate, None),
            verdict(Duplicate, Some(Applied)),
            verdict(Applied, None),
            verdict(Duplicate, Some(Stale)),
        ];
        recount_retried(&inputs, &mut verdicts);
        let outcomes: Vec<Outcome> = verdicts.iter().map(|v| v.outcome).collect();
        assert_eq!(outcomes, [Applied, Duplicate, Duplicate, Applied, Stale]);
    }

    /// Invalid records and conflicts become letters, in batch order, each
    /// with its partition, offset, original bytes and reason; everything
    /// else does not.
    #[test]
    fn dead_letters_are_the_invalid_records_and_the_conflicts() {
        use crate::event::Invalid;
        use crate::offsets::TopicPartition;
        use crate::pipeline::batch::Item;
        let item = |partition_index, offset: i64, decoded| Item {
            partition_index,
            offset,
            timestamp_ms: Some(1000 + offset),
            key: Some(format!("k{offset}").into_bytes()),
            value: Some(format!("v{offset}").into_bytes()),
            headers: vec![("h".into(), b"x".to_vec())],
            decoded,
            effects: Default::default(),
        };
        let mut conflicting = event("c");
        conflicting.fingerprint = 0xab;
        let batch = Batch {
            partitions: vec![TopicPartition::new("t", 0), TopicPartition::new("t", 3)],
            windows: vec![Duration::from_secs(60); 2],
            items: vec![
                item(0, 10, Err(Invalid::NotJson("eof".into()))),
                item(1, 11, Ok(event("a"))),
                item(1, 12, Ok(conflicting)),
                item(0, 13, Ok(event("d"))),
                item(1, 14, Err(Invalid::EmptyValue)),
                item(0, 15, Ok(event("s"))),
                item(1, 16, Ok(event("r"))),
            ],
        };
        use Outcome::*;
        let mut conflict = verdict(Conflict, None);
        conflict.remembered_fingerprint = Some(0xcd);
        let verdicts = [
            verdict(Applied, None),
            conflict,
            verdict(Duplicate, None),
            verdict(Stale, None),
            Verdict {
                rejection: Some(("counter_overflow", "counter b would pass 38 digits".into())),
                ..verdict(Invalid, None)
            },
        ];
        let letters = dead_letters(&batch, &verdicts);
        let summary: Vec<(i32, i64, &str)> = letters
            .iter()
            .map(|l| (l.source.partition, l.offset, l.reason))
            .collect();
        assert_eq!(
            summary,
            [
                (0, 10, "not_json"),
                (3, 12, "conflict"),
                (3, 14, "empty_value"),
                (3, 16, "counter_overflow")
            ]
        );
        let c = &letters[1];
        assert_eq!(c.fingerprints, Some((0xab, 0xcd)));
        assert!(
            c.message.contains("00000000000000cd") && c.message.contains("00000000000000ab"),
            "{}",
            c.message
        );
        assert_eq!(
            (c.key, c.value, c.timestamp_ms),
            (Some(&b"k12"[..]), Some(&b"v12"[..]), Some(1012))
        );
        assert_eq!(c.headers, &[("h".to_string(), b"x".to_vec())][..]);
        assert_eq!(letters[0].message, "record value is not JSON: eof");
        assert_eq!(letters[0].fingerprints, None);
    }
}
