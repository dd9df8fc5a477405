//! The processing loop: the one owner of [`OwnedPartitions`]. It takes what the
//! consumer thread reports (records, rebalances) and what the guard stage
//! reports ([`StageEvent`]), batches records, hands batches and ownership
//! changes over in the order it decided them (one queue, `super::link`),
//! and stores each partition's contiguous commit point. Messages alone
//! drive it: shutdown, a stage's event or a rebalance; why it ended is what
//! [`EventLoop::run`] returns. What it does with fetched records is its
//! [`Mode`]; `Health` is what it publishes, never what it reads.
//!
//! Guarantee: the commit-after-effect rule of docs/guarantees.md, kept by
//! storing only [`OwnedPartitions`]'s contiguous commit points; a revoke is
//! answered only after the revoked partitions' in-flight batches finished,
//! or `kafka.revoke_timeout` passed.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::batch::{Batch, Finished};
use super::blocked::BlockedWatch;
use super::consumer::{Committed, Consumer, FatalError, Fetched, KafkaEvent, KafkaNote};
use super::link::{Ownership, Room, StageEvent, StageSender};
use super::owned::OwnedPartitions;
use super::recovery::{resume_points, ResumeContext, ResumeError, Resumed};
use super::shutdown::Shutdown;
use crate::config::{Config, Policies};
use crate::kafka;
use crate::metrics::{self, Health};
use crate::offsets::TopicPartition;
use crate::store::progress::ProgressStore;
pub use end::{LoopEnd, Restart};
pub(super) use mode::Mode;

pub struct EventLoop<R = RedisSide> {
    config: Arc<Config>,
    /// The consumed topics' policies, resolved once for the round.
    policies: Policies,
    consumer: Arc<Consumer>,
    health: Health,
    owned: OwnedPartitions,
    events: mpsc::Receiver<KafkaEvent>,
    notes: mpsc::UnboundedReceiver<KafkaNote>,
    /// What the guard stage reports, in the order it decided it.
    stage: mpsc::UnboundedReceiver<StageEvent>,
    /// Batches and ownership changes for the guard stage, in order.
    queue: StageSender,
    /// Fetched records not yet handed over, in fetch order.
    pending: Vec<Fetched>,
    /// When the pending records must be handed over even if few.
    linger_until: Option<Instant>,
    /// What the loop does with fetched records.
    mode: Mode,
    blocked: BlockedWatch,
    /// What the guard stage said it retries (`StageEvent::Retrying`).
    stage_retrying: Option<&'static str>,
    /// Holds back repeated consumer errors (one per poll with the brokers down).
    quiet: crate::kafka::quiet::LogLimiter,
    /// When to warn that the group has not admitted this consumer yet
    /// (once; cleared by the join, put off by each error the consumer reports).
    join_warning_at: Option<Instant>,
    /// Where assigned partitions start: Redis's progress records.
    starts: R,
    /// The commit metadata naming the epoch of the Redis this run writes to.
    metadata: String,
    /// Rewound partitions and the committed offset they were rewound from.
    rewinding: std::collections::HashMap<TopicPartition, i64>,
    /// Bootstrapped partitions whose commit is not yet written again with
    /// the metadata, and when that was last tried.
    untied: ties::Untied,
}

/// Where newly assigned partitions resume. The loop asks it at every
/// assignment; production reads Redis's progress records ([`RedisSide`]),
/// the loop's unit tests answer from a table.
pub trait Starts {
    /// The epoch of the Redis this run writes to (named in the commit metadata).
    fn epoch(&self) -> &str;

    /// Where each of `assigned` starts; every one's record is at least its floor afterwards.
    fn decide(
        &mut self,
        consumer: &Arc<Consumer>,
        assigned: &[Committed],
    ) -> impl std::future::Future<Output = Result<Resumed, ResumeError>> + Send;
}

/// What the loop reads Redis's progress with.
pub struct RedisSide {
    pub store: ProgressStore,
    pub epoch: String,
    pub group: String,
    /// `idem run --accept-commits`, until the first assignment took it:
    /// one start's decision, not a setting that outlives it.
    pub accept_commits: Arc<std::sync::atomic::AtomicBool>,
}

impl Starts for RedisSide {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn decide(
        &mut self,
        consumer: &Arc<Consumer>,
        assigned: &[Committed],
    ) -> Result<Resumed, ResumeError> {
        use std::sync::atomic::Ordering;
        let accept = self.accept_commits.load(Ordering::Relaxed);
        let context = ResumeContext {
            epoch: &self.epoch,
            group: &self.group,
            accept_commits: accept,
        };
        let resumed = resume_points(&mut self.store, &context, consumer, assigned).await;
        if accept && resumed.is_ok() {
            self.accept_commits.store(false, Ordering::Relaxed);
        }
        resumed
    }
}

/// The loop's ends of its links with the guard stage.
pub struct StageLink {
    pub events: mpsc::UnboundedReceiver<StageEvent>,
    pub queue: StageSender,
}

impl<R: Starts> EventLoop<R> {
    pub fn new(
        config: Arc<Config>,
        consumer: Arc<Consumer>,
        health: Health,
        events: mpsc::Receiver<KafkaEvent>,
        notes: mpsc::UnboundedReceiver<KafkaNote>,
        stage: StageLink,
        starts: R,
    ) -> EventLoop<R> {
        EventLoop {
            metadata: crate::resume::commit_metadata(starts.epoch()),
            starts,
            rewinding: Default::default(),
            untied: Default::default(),
            policies: Policies::of(Arc::clone(&config)),
            config,
            consumer,
            health,
            owned: OwnedPartitions::default(),
            events,
            notes,
            stage: stage.events,
            queue: stage.queue,
            pending: Vec::new(),
            linger_until: None,
            mode: Mode::Consuming,
            blocked: BlockedWatch::default(),
            stage_retrying: None,
            quiet: Default::default(),
            join_warning_at: Some(Instant::now() + crate::kafka::NOT_ADMITTED_AFTER),
        }
    }

    /// Runs until `shutdown` fires, the guard stage ends or reports a
    /// change of Redis's state, or an assignment cannot start safely; says which.
    pub async fn run(&mut self, shutdown: &mut Shutdown) -> LoopEnd {
        let max = self.config.pipeline.batch_max_events.get();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Records of partitions lost or revoked during a pause are
            // dropped: with none left to hand over, resume here, or nothing
            // ever would.
            if matches!(self.mode, Mode::Paused { .. }) && self.pending.is_empty() {
                self.shift(Mode::resume_fetching);
            }
            let ready = !self.mode.is_stopped()
                && !self.queue.is_closed()
                && !self.pending.is_empty()
                && (self.pending.len() >= max
                    || self.linger_until.is_some_and(|t| t <= Instant::now()));
            if ready && matches!(self.mode, Mode::Consuming) {
                self.mode = Mode::Waiting {
                    since: Instant::now(),
                };
            }
            let take_events = self.pending.len() < max || self.mode.paused().is_some();
            let wake_at = self.mode.wake_at(ready, self.linger_until);
            tokio::select! {
                // Shutdown first: once asked to stop, take no new work. Then
                // the stage's reports: a finished batch frees commits, a
                // restart must not wait behind new records.
                biased;
                _ = shutdown.wait() => return LoopEnd::Shutdown,
                event = self.stage.recv() => match event {
                    Some(event) => if let Some(end) = self.on_stage_event(event) {
                        return end;
                    },
                    // The stage ended without a word: shutdown while it retried.
                    None => return LoopEnd::Shutdown,
                },
                room = self.queue.room(), if ready => self.hand_over(room, max),
                Some(event) = self.events.recv(), if take_events => if let Some(end) = self.on_event(event).await {
                    return end;
                },
                Some(note) = self.notes.recv() => self.on_note(note),
                _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {
                    if ready {
                        self.shift(Mode::pause_if_waited);
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    /// Acts on what the guard stage reports; `Some` when the loop must end.
    fn on_stage_event(&mut self, event: StageEvent) -> Option<LoopEnd> {
        match event {
            StageEvent::Finished(done) => self.on_finished(done),
            StageEvent::StopConsuming(reason) => {
                // Fetch nothing more, but keep serving rebalances and
                // committing what finishes.
                self.health.stop_consuming(reason.clone());
                self.pending.clear();
                self.linger_until = None;
                self.shift(|mode, consumer| mode.stop(reason, consumer));
            }
            StageEvent::Restart(changed) => {
                return Some(LoopEnd::Restart(Restart::StateChanged(changed)))
            }
            StageEvent::LogReplaced(detail) => {
                return Some(LoopEnd::Restart(Restart::LogReplaced(detail)))
            }
            StageEvent::Retrying(what) => self.stage_retrying = what,
        }
        None
    }

    /// Moves the loop to the mode `transition` returns.
    fn shift(&mut self, transition: impl FnOnce(Mode, &Consumer) -> Mode) {
        let mode = std::mem::replace(&mut self.mode, Mode::Consuming);
        self.mode = transition(mode, &self.consumer);
    }

    /// Consumption was stopped in an earlier round (the dead-letter
    /// budget, `reason`): this round fetches nothing either. Only a restart
    /// of idem lifts a stop; the pipeline holds it between rounds.
    pub fn stopped_before(mut self, reason: Option<String>) -> Self {
        if let Some(reason) = reason {
            let paused = TopicPartitionList::new();
            self.mode = Mode::Stopped { paused, reason };
        }
        self
    }

    /// Nothing more for the guard stage: it ends once it applied what is queued.
    pub fn close_queue(&mut self) {
        self.queue.close();
    }

    /// Why consumption was stopped, if it was: the pipeline carries it into
    /// the next round.
    pub fn stopped(&self) -> Option<String> {
        match &self.mode {
            Mode::Stopped { reason, .. } => Some(reason.clone()),
            _ => None,
        }
    }

    /// Decodes up to `max` pending records and hands them to the guard
    /// stage. A stage that ended meanwhile takes nothing more: the round
    /// ends as its last report, read next, says (a restart, not a shutdown).
    fn hand_over(&mut self, room: Room, max: usize) {
        let take = self.pending.len().min(max);
        let records: Vec<Fetched> = self.pending.drain(..take).collect();
        let linger = self.config.pipeline.batch_linger;
        self.linger_until = (!self.pending.is_empty()).then(|| Instant::now() + linger);
        self.shift(Mode::resume_fetching);
        let batch = Batch::decode(records, &self.policies, &self.config.event);
        self.owned.begin(batch.positions());
        metrics::set_in_flight_events(self.owned.in_flight());
        if self.queue.batch(room, batch).is_err() {
            self.queue.close();
        }
    }

    fn on_finished(&mut self, done: Finished) {
        self.owned.mark_done(done.positions());
        metrics::set_in_flight_events(self.owned.in_flight());
        self.store_commits();
    }

    /// Stores each owned partition's new commit point for librdkafka's next commit.
    fn store_commits(&mut self) {
        for (tp, next) in self.owned.take_owned_commits() {
            if kafka::store_offset(&*self.consumer, &tp, next, &self.metadata) {
                self.owned.note_stored(&tp, next);
            }
            if self.rewinding.get(&tp).is_some_and(|c| next >= *c) {
                self.rewinding.remove(&tp);
                tracing::info!(topic = %tp.topic, partition = tp.partition, next, "rewound partition is back at its committed offset");
                self.note_rewinding();
            }
        }
    }

    fn note_rewinding(&self) {
        self.health
            .set_rewinding((!self.rewinding.is_empty()).then(|| {
                format!(
                    "re-reading {} partition(s) after Redis lost or rolled back its state",
                    self.rewinding.len()
                )
            }));
    }

    /// Acts on what the consumer thread reports; `Some` when the loop must end.
    async fn on_event(&mut self, event: KafkaEvent) -> Option<LoopEnd> {
        match event {
            KafkaEvent::Record(record) => {
                // Records of partitions revoked meanwhile belong to their new
                // owner; while stopped, records are dropped unprocessed (never
                // begun, so never committed).
                if self.owned.is_assigned(&record.tp) && !self.mode.is_stopped() {
                    if self.pending.is_empty() {
                        self.linger_until =
                            Some(Instant::now() + self.config.pipeline.batch_linger);
                    }
                    self.pending.push(record);
                }
            }
            KafkaEvent::Error(e) => {
                // The error says why the group is not joined: no second word.
                if let Some(at) = &mut self.join_warning_at {
                    *at = Instant::now() + crate::kafka::NOT_ADMITTED_AFTER;
                }
                self.quiet.consumer_error(&e)
            }
            KafkaEvent::Fatal(fatal) => return Some(self.on_fatal(fatal)),
            KafkaEvent::Assigned { partitions, answer } => {
                let (starts, end) = match self.on_assigned(&partitions).await {
                    Ok(starts) => (starts, None),
                    Err(end) => (Vec::new(), Some(end)),
                };
                // The consumer thread assigns them from these offsets.
                let _ = answer.send(starts);
                self.untied.tie(&self.consumer, &self.metadata);
                return end;
            }
            KafkaEvent::Lost(tps) => {
                metrics::record_rebalance("lost");
                tracing::warn!(
                    partitions = %crate::offsets::describe_partitions(&tps),
                    count = tps.len(),
                    "partitions lost; their in-flight work is not committed"
                );
                self.drop_partitions(&tps);
            }
            KafkaEvent::Revoked { partitions, answer } => {
                let (commits, end) = self.on_revoked(&partitions).await;
                // The consumer thread stores and commits them before the rebalance goes on.
                let _ = answer.send(commits);
                return end;
            }
        }
        None
    }

    /// The consumer is dead: nothing it holds can be committed any more
    /// (the effects are in Redis; a redelivery is a duplicate). A new
    /// consumer takes over after the restart's backoff; until it joins,
    /// `/readyz` names the error.
    fn on_fatal(&mut self, fatal: FatalError) -> LoopEnd {
        let code = metrics::record_kafka_fatal(fatal.code);
        let owned: Vec<TopicPartition> = self.owned.assigned().cloned().collect();
        self.drop_partitions(&owned);
        let hint = match fatal.code {
            RDKafkaErrorCode::UnreleasedInstanceId | RDKafkaErrorCode::FencedInstanceId => {
                format!(
                    "; another member holds group.instance.id {:?} until it leaves or its session expires",
                    self.config.kafka.group_instance_id.as_deref().unwrap_or("")
                )
            }
            _ => String::new(),
        };
        let why = format!(
            "the Kafka consumer failed fatally ({code}: {}){hint}",
            fatal.reason
        );
        self.health
            .set_kafka_failed(Some(format!("{why}; restarting the consumer")));
        LoopEnd::Restart(Restart::KafkaFatal(why))
    }

    /// Takes newly assigned partitions and returns where those must start
    /// that Redis's progress records put before their commit; or how the
    /// loop ends when that cannot be decided safely.
    async fn on_assigned(
        &mut self,
        assigned: &[Committed],
    ) -> Result<Vec<(TopicPartition, i64)>, LoopEnd> {
        let tps: Vec<TopicPartition> = assigned.iter().map(|c| c.tp.clone()).collect();
        self.take_partitions(&tps);
        if let Some(c) = assigned.iter().find(|c| !c.known) {
            return Err(LoopEnd::Restart(Restart::CommitUnknown(c.tp.clone())));
        }
        match self.starts.decide(&self.consumer, assigned).await {
            Ok(Resumed {
                floors,
                rewinds,
                logs,
                bootstraps,
            }) => {
                self.untied.add(bootstraps);
                // Ready, and counted as owned, only now that every start is
                // decided: an instance reading Redis's records serves nothing
                // yet. Any assignment, even an empty one (a standby), means
                // the group has us.
                self.joined();
                self.note_assignment();
                // Queued after every batch fetched before the assignment and
                // before any batch of it: the stage checks them from now on.
                let _ = self.queue.ownership(Ownership::Taken { floors, logs });
                let starts = rewinds.iter().map(|r| (r.tp.clone(), r.to)).collect();
                for r in rewinds {
                    self.rewinding.insert(r.tp, r.committed);
                }
                self.note_rewinding();
                Ok(starts)
            }
            Err(ResumeError::Unrecoverable(unrecoverable)) => {
                Err(LoopEnd::Unrecoverable(unrecoverable))
            }
            Err(ResumeError::Unreadable(e)) => {
                Err(LoopEnd::Restart(Restart::ProgressUnreadable(e.to_string())))
            }
        }
    }

    fn take_partitions(&mut self, tps: &[TopicPartition]) {
        metrics::record_rebalance("assign");
        self.owned.assign(tps);
        for tp in tps {
            metrics::init_partition(&tp.topic, tp.partition);
        }
        tracing::info!(
            partitions = %crate::offsets::describe_partitions(tps),
            count = tps.len(),
            "partitions assigned"
        );
        if let Some(paused) = self.mode.paused_mut() {
            // A partition assigned during the pause (or after consumption
            // was stopped) would fetch: pause it too. The consumer thread
            // assigns it only once the loop answered, so the assignment does
            // not hold it yet: count it as paused now (a resume then resumes
            // it too) and pause it at the next tick, once assigned.
            for tp in tps {
                if paused.find_partition(&tp.topic, tp.partition).is_none() {
                    paused.add_partition(&tp.topic, tp.partition);
                }
            }
            metrics::set_paused(true);
        }
    }

    /// Stops taking records of `tps`, waits (bounded by `kafka.revoke_timeout`)
    /// until their in-flight batches finished, and returns their commit
    /// points; and how the loop ends if the guard stage said so meanwhile.
    async fn on_revoked(
        &mut self,
        tps: &[TopicPartition],
    ) -> (Vec<(TopicPartition, i64)>, Option<LoopEnd>) {
        metrics::record_rebalance("revoke");
        self.owned.unassign(tps);
        self.pending.retain(|r| !tps.contains(&r.tp));
        let timeout = self.config.kafka.revoke_timeout;
        let deadline = Instant::now() + timeout;
        let mut end = None;
        while !self.owned.is_idle(tps) {
            match tokio::time::timeout_at(deadline, self.stage.recv()).await {
                Ok(Some(event)) => {
                    // A restart: the stage stopped, nothing more finishes.
                    end = self.on_stage_event(event);
                    if end.is_some() {
                        break;
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(
                        ?timeout,
                        "revoked partitions still had work in flight; committing only what is done"
                    );
                    break;
                }
            }
        }
        let commits = self.owned.take_commits(|tp| tps.contains(tp));
        self.drop_partitions(tps);
        (commits, end)
    }

    /// Forgets `tps`: their pending records and progress go, nothing of them is committed.
    fn drop_partitions(&mut self, tps: &[TopicPartition]) {
        // Queued after the partitions' batches: the stage applies those first.
        let _ = self.queue.ownership(Ownership::Released(tps.to_vec()));
        self.pending.retain(|r| !tps.contains(&r.tp));
        self.owned.forget(tps);
        self.rewinding.retain(|tp, _| !tps.contains(tp));
        self.untied.release(tps);
        self.note_rewinding();
        self.note_assignment();
    }

    fn note_assignment(&self) {
        let n = self.owned.assigned_count();
        metrics::set_assigned_partitions(n);
        self.health.set_owned(self.owned.assigned());
    }

    fn on_note(&mut self, note: KafkaNote) {
        match note {
            KafkaNote::Committed(offsets) => {
                for (tp, offset) in offsets {
                    self.untied.acknowledged(&tp, offset);
                    if let Some(lag) = self.owned.note_committed(&tp, offset) {
                        metrics::record_commit_lag(lag);
                    }
                }
            }
            KafkaNote::Stats { joined, rows } => {
                if joined || kafka::group_generation(&self.consumer) > 0 {
                    self.joined();
                }
                let mut uncommitted = 0i64;
                for (tp, lag, stored, committed) in rows {
                    if !self.owned.is_assigned(&tp) {
                        continue;
                    }
                    if lag >= 0 {
                        metrics::set_consumer_lag(&tp.topic, tp.partition, lag);
                    }
                    if stored >= 0 && committed >= 0 {
                        uncommitted += (stored - committed).max(0);
                    }
                }
                metrics::set_uncommitted_events(uncommitted);
            }
        }
    }

    /// The group has this consumer: ready, and no warning that it has not.
    fn joined(&mut self) {
        self.join_warning_at = None;
        self.health.set_joined();
    }

    fn on_tick(&mut self) {
        if self.join_warning_at.is_some_and(|t| t <= Instant::now()) {
            self.join_warning_at = None;
            crate::kafka::warn_not_admitted(&self.config.kafka);
        }
        self.blocked.check(
            &self.owned,
            &self.health,
            self.config.pipeline.stall_timeout,
            self.stage_retrying,
        );
        self.mode.keep_paused(&self.consumer);
        if self.untied.due() {
            self.untied.tie(&self.consumer, &self.metadata);
        }
    }

    /// Events fetched and not yet done.
    pub fn in_flight(&self) -> usize {
        self.owned.in_flight()
    }

    /// The consumer and the event receiver, for the final commit and close.
    pub fn into_parts(self) -> (Arc<Consumer>, mpsc::Receiver<KafkaEvent>) {
        (self.consumer, self.events)
    }

    /// After the guard stage ended: marks what it finished and stores the
    /// final commit points.
    pub fn finish(&mut self) {
        while let Ok(event) = self.stage.try_recv() {
            if let StageEvent::Finished(done) = event {
                self.owned.mark_done(done.positions());
            }
        }
        self.store_commits();
    }
}

mod end;
mod mode;
#[cfg(test)]
mod tests;
mod ties;
