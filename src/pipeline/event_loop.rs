//! The processing loop: the one owner of [`Progress`]. It takes what the
//! consumer thread reports (records, rebalances) and what the guard stage
//! finished, batches records, hands batches over in fetch order, and stores
//! each partition's contiguous commit point.
//!
//! Guarantee (commit after effect): an offset is stored for commit only when
//! it and every offset fetched before it in its partition has its outcome
//! durable in Redis. A revoke is answered only after the revoked partitions'
//! in-flight batches finished, or `kafka.revoke_timeout` passed.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::batch::{Batch, Finished};
use super::blocked::BlockedWatch;
use super::consumer::{Committed, Consumer, Fetched, KafkaEvent, KafkaNote};
use super::progress::Progress;
use super::recovery::{resume_points, Unrecoverable};
use super::Shutdown;
use crate::config::Config;
use crate::kafka;
use crate::metrics::{self, Health};
use crate::offsets::TopicPartition;
use crate::store::progress::ProgressStore;

/// How long the loop waits for the guard stage with a full batch before it
/// pauses fetching (instead of buffering) while it keeps serving rebalances.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

pub struct EventLoop {
    config: Arc<Config>,
    consumer: Arc<Consumer>,
    health: Health,
    progress: Progress,
    events: mpsc::Receiver<KafkaEvent>,
    notes: mpsc::UnboundedReceiver<KafkaNote>,
    finished: mpsc::UnboundedReceiver<Finished>,
    /// Fetched records not yet handed over, in fetch order.
    pending: Vec<Fetched>,
    /// When the pending records must be handed over even if few.
    linger_until: Option<Instant>,
    /// Since when a batch is ready and the guard stage has no room.
    stage_full_since: Option<Instant>,
    /// What was paused (Redis behind, or consumption stopped).
    paused: Option<TopicPartitionList>,
    blocked: BlockedWatch,
    /// Consumption was stopped (dead-letter budget); read once per turn of the loop.
    stopped: bool,
    /// Holds back repeated consumer errors (one per poll with the brokers down).
    quiet: crate::kafka::quiet::LogLimiter,
    /// Redis's progress records, read when partitions are assigned.
    redis: ProgressStore,
    /// The epoch of the Redis this run writes to, and the commit metadata naming it.
    epoch: String,
    metadata: String,
    /// Rewound partitions and the committed offset they were rewound from.
    rewinding: std::collections::HashMap<TopicPartition, i64>,
    /// Why the loop must end before taking more work, if it must.
    end: Option<LoopEnd>,
}

/// Why the loop ended.
#[derive(Debug)]
pub enum LoopEnd {
    Shutdown,
    /// Consumption restarts from what Redis holds (its state changed, or
    /// the progress check of an assignment could not be made).
    Restart(String),
    /// Redis lost effects the log no longer holds.
    Unrecoverable(Unrecoverable),
}

/// What the loop reads Redis's progress with.
pub struct RedisSide {
    pub store: ProgressStore,
    pub epoch: String,
}

impl EventLoop {
    pub fn new(
        config: Arc<Config>,
        consumer: Arc<Consumer>,
        health: Health,
        events: mpsc::Receiver<KafkaEvent>,
        notes: mpsc::UnboundedReceiver<KafkaNote>,
        finished: mpsc::UnboundedReceiver<Finished>,
        redis: RedisSide,
    ) -> EventLoop {
        EventLoop {
            metadata: crate::resume::commit_metadata(&redis.epoch),
            epoch: redis.epoch,
            redis: redis.store,
            rewinding: Default::default(),
            end: None,
            config,
            consumer,
            health,
            progress: Progress::default(),
            events,
            notes,
            finished,
            pending: Vec::new(),
            linger_until: None,
            stage_full_since: None,
            paused: None,
            blocked: BlockedWatch::default(),
            stopped: false,
            quiet: Default::default(),
        }
    }

    /// Runs until `shutdown` fires, the guard stage ends or asks for a
    /// restart (`restart`), or an assignment cannot start safely.
    pub async fn run(
        &mut self,
        batches: &mpsc::Sender<Batch>,
        shutdown: &mut Shutdown,
        restart: &mut Shutdown,
    ) -> LoopEnd {
        let max = self.config.pipeline.batch_max_events.get();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            if let Some(end) = self.end.take() {
                return end;
            }
            self.stopped = self.health.stopped_reason().is_some();
            let stopped = self.stopped;
            if stopped && self.paused.is_none() {
                // Consumption was stopped (dead-letter budget): fetch nothing
                // more, but keep serving rebalances and committing what finishes.
                self.pending.clear();
                self.pause();
            }
            let ready = !stopped
                && !self.pending.is_empty()
                && (self.pending.len() >= max
                    || self.linger_until.is_some_and(|t| t <= Instant::now()));
            if ready {
                self.stage_full_since.get_or_insert_with(Instant::now);
            }
            let take_events = self.pending.len() < max || self.paused.is_some();
            let wake_at = self.wake_at(ready);
            tokio::select! {
                // Shutdown first: once asked to stop, take no new work.
                biased;
                _ = shutdown.wait() => break,
                _ = restart.wait() => return LoopEnd::Restart("the guard stage found Redis's state changed".into()),
                Some(done) = self.finished.recv() => self.on_finished(done),
                permit = batches.reserve(), if ready => match permit {
                    Ok(permit) => self.hand_over(permit, max),
                    Err(_) => break, // the guard stage ended (shutdown while Redis failed)
                },
                Some(event) = self.events.recv(), if take_events => self.on_event(event).await,
                Some(note) = self.notes.recv() => self.on_note(note),
                _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {
                    if ready && self.paused.is_none() && self.stage_full_since.is_some_and(|t| t.elapsed() >= PAUSE_AFTER) {
                        self.pause();
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        LoopEnd::Shutdown
    }

    /// The next moment the loop must look again without any message: the
    /// linger deadline, or when a waiting batch should pause fetching.
    fn wake_at(&self, ready: bool) -> Option<Instant> {
        if ready {
            (self.paused.is_none())
                .then(|| self.stage_full_since.map(|t| t + PAUSE_AFTER))
                .flatten()
        } else {
            self.linger_until
        }
    }

    /// Decodes up to `max` pending records and hands them to the guard stage.
    fn hand_over(&mut self, permit: mpsc::Permit<'_, Batch>, max: usize) {
        let take = self.pending.len().min(max);
        let records: Vec<Fetched> = self.pending.drain(..take).collect();
        self.linger_until = if self.pending.is_empty() {
            None
        } else {
            Some(Instant::now() + self.config.pipeline.batch_linger)
        };
        self.stage_full_since = None;
        if self.paused.is_some() && !self.stopped {
            self.resume();
        }
        let batch = Batch::decode(records, &self.config);
        self.progress.begin(batch.positions());
        metrics::set_in_flight_events(self.progress.in_flight());
        permit.send(batch);
    }

    fn on_finished(&mut self, done: Finished) {
        self.progress.mark_done(done.positions());
        metrics::set_in_flight_events(self.progress.in_flight());
        self.store_commits();
    }

    /// Stores each owned partition's new commit point for librdkafka's next commit.
    fn store_commits(&mut self) {
        for (tp, next) in self.progress.take_owned_commits() {
            if kafka::store_offset(&*self.consumer, &tp, next, &self.metadata) {
                self.progress.note_stored(&tp, next);
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

    async fn on_event(&mut self, event: KafkaEvent) {
        match event {
            KafkaEvent::Record(record) => {
                // Records of partitions revoked meanwhile belong to their new
                // owner; while stopped, records are dropped unprocessed (never
                // begun, so never committed).
                if self.progress.is_assigned(&record.tp) && !self.stopped {
                    if self.pending.is_empty() {
                        self.linger_until =
                            Some(Instant::now() + self.config.pipeline.batch_linger);
                    }
                    self.pending.push(record);
                }
            }
            KafkaEvent::Error(e) => self.quiet.consumer_error(&e),
            KafkaEvent::Assigned { partitions, answer } => {
                let starts = self.on_assigned(&partitions).await;
                // The consumer thread assigns them from these offsets.
                let _ = answer.send(starts);
            }
            KafkaEvent::Lost(tps) => {
                metrics::record_rebalance("lost");
                tracing::warn!(
                    partitions = tps.len(),
                    "partitions lost; their in-flight work is not committed"
                );
                self.drop_partitions(&tps);
            }
            KafkaEvent::Revoked { partitions, answer } => {
                let commits = self.on_revoked(&partitions).await;
                // The consumer thread stores and commits them before the rebalance goes on.
                let _ = answer.send(commits);
            }
        }
    }

    /// Takes newly assigned partitions and answers where those must start
    /// that Redis's progress records put before their commit.
    async fn on_assigned(&mut self, assigned: &[Committed]) -> Vec<(TopicPartition, i64)> {
        let tps: Vec<TopicPartition> = assigned.iter().map(|c| c.tp.clone()).collect();
        self.take_partitions(&tps);
        if let Some(c) = assigned.iter().find(|c| !c.known) {
            self.end = Some(LoopEnd::Restart(format!(
                "could not read the committed offset of {}/{}",
                c.tp.topic, c.tp.partition
            )));
            return Vec::new();
        }
        let group = self.config.kafka.group_id.clone();
        let checked = resume_points(
            &mut self.redis,
            &self.epoch,
            &self.consumer,
            assigned,
            &group,
        )
        .await;
        match checked {
            Ok(Ok(rewinds)) => {
                let starts = rewinds.iter().map(|r| (r.tp.clone(), r.to)).collect();
                for r in rewinds {
                    self.rewinding.insert(r.tp, r.committed);
                }
                self.note_rewinding();
                starts
            }
            Ok(Err(unrecoverable)) => {
                self.end = Some(LoopEnd::Unrecoverable(unrecoverable));
                Vec::new()
            }
            Err(e) => {
                self.end = Some(LoopEnd::Restart(format!(
                    "could not read Redis's progress records for the assigned partitions: {e}"
                )));
                Vec::new()
            }
        }
    }

    fn take_partitions(&mut self, tps: &[TopicPartition]) {
        metrics::record_rebalance("assign");
        // Any assignment, even an empty one (a standby), means the group has us.
        self.health.set_joined();
        self.progress.assign(tps);
        for tp in tps {
            metrics::init_partition(&tp.topic, tp.partition);
        }
        tracing::info!(partitions = tps.len(), "partitions assigned");
        self.note_assignment();
        if self.paused.is_some() {
            // A partition assigned during the pause would fetch: pause it too.
            self.pause();
        }
    }

    /// Stops taking records of `tps`, waits (bounded by `kafka.revoke_timeout`)
    /// until their in-flight batches finished, and returns their commit points.
    async fn on_revoked(&mut self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        metrics::record_rebalance("revoke");
        self.progress.unassign(tps);
        self.pending.retain(|r| !tps.contains(&r.tp));
        let timeout = self.config.kafka.revoke_timeout;
        let deadline = Instant::now() + timeout;
        while !self.progress.is_idle(tps) {
            match tokio::time::timeout_at(deadline, self.finished.recv()).await {
                Ok(Some(done)) => self.on_finished(done),
                Ok(None) | Err(_) => {
                    tracing::warn!(
                        ?timeout,
                        "revoked partitions still had work in flight; committing only what is done"
                    );
                    break;
                }
            }
        }
        let commits = self.progress.take_commits(|tp| tps.contains(tp));
        self.drop_partitions(tps);
        commits
    }

    /// Forgets `tps`: their pending records and progress go, nothing of them is committed.
    fn drop_partitions(&mut self, tps: &[TopicPartition]) {
        self.pending.retain(|r| !tps.contains(&r.tp));
        self.progress.forget(tps);
        self.rewinding.retain(|tp, _| !tps.contains(tp));
        self.note_rewinding();
        self.note_assignment();
    }

    fn note_assignment(&self) {
        let n = self.progress.assigned_count();
        metrics::set_assigned_partitions(n);
        self.health.set_owned(self.progress.assigned());
    }

    fn on_note(&mut self, note: KafkaNote) {
        match note {
            KafkaNote::Committed(offsets) => {
                for (tp, offset) in offsets {
                    if let Some(lag) = self.progress.note_committed(&tp, offset) {
                        metrics::record_commit_lag(lag);
                    }
                }
            }
            KafkaNote::Stats { joined, rows } => {
                if joined {
                    self.health.set_joined();
                }
                let mut uncommitted = 0i64;
                for (tp, lag, stored, committed) in rows {
                    if !self.progress.is_assigned(&tp) {
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

    fn on_tick(&mut self) {
        self.blocked.check(
            &self.progress,
            &self.health,
            self.config.pipeline.stall_timeout,
        );
    }

    /// Pauses fetching for every assigned partition.
    fn pause(&mut self) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                return tracing::warn!(error = %e, "could not read the assignment to pause it")
            }
        };
        match self.consumer.pause(&assignment) {
            Ok(()) => {
                metrics::set_paused(true);
                tracing::debug!(partitions = assignment.count(), "fetching paused");
                self.paused = Some(assignment);
            }
            Err(e) => tracing::warn!(error = %e, "could not pause fetching"),
        }
    }

    fn resume(&mut self) {
        let Some(paused) = self.paused.take() else {
            return;
        };
        // Partitions revoked meanwhile cannot be resumed; the rest can.
        let owned = self.consumer.assignment().unwrap_or_default();
        let mut resume = TopicPartitionList::new();
        for e in paused.elements() {
            if owned.find_partition(e.topic(), e.partition()).is_some() {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        if let Err(e) = self.consumer.resume(&resume) {
            tracing::warn!(error = %e, "could not resume fetching");
        }
        metrics::set_paused(false);
    }

    /// Events fetched and not yet done.
    pub fn in_flight(&self) -> usize {
        self.progress.in_flight()
    }

    /// The consumer and the event receiver, for the final commit and close.
    pub fn into_parts(self) -> (Arc<Consumer>, mpsc::Receiver<KafkaEvent>) {
        (self.consumer, self.events)
    }

    /// After the guard stage ended: marks what it finished and stores the
    /// final commit points.
    pub fn finish(&mut self) {
        while let Ok(done) = self.finished.try_recv() {
            self.progress.mark_done(done.positions());
        }
        self.store_commits();
    }
}
