//! The loop fed with messages, as quickwit tests its Kafka source: a real
//! librdkafka consumer that never reaches a broker (partitions assigned by
//! hand, so offsets can be stored), a table in place of Redis's progress
//! records, and the test in the place of the consumer thread and the guard
//! stage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;

use super::mode::PAUSE_AFTER;
use super::*;
use crate::kafka::TopicRecord;
use crate::pipeline::consumer::Forwarder;
use crate::pipeline::link::{StageReceiver, ToStage};
use crate::pipeline::recovery::{Change, Rewind, StateChanged, Unrecoverable};
use crate::pipeline::shutdown::ShutdownTrigger;

/// Where partitions resume: rewinds by partition, or a failure for all.
struct Table {
    rewinds: HashMap<TopicPartition, i64>,
    unrecoverable: bool,
}

impl Starts for Table {
    fn epoch(&self) -> &str {
        "E"
    }

    async fn decide(
        &mut self,
        _consumer: &Arc<Consumer>,
        assigned: &[Committed],
    ) -> Result<Resumed, ResumeError> {
        if self.unrecoverable {
            return Err(ResumeError::Unrecoverable(Unrecoverable("gone".into())));
        }
        let mut floors = Vec::new();
        let mut rewinds = Vec::new();
        for c in assigned {
            let committed = c.offset.unwrap_or(0);
            let start = self.rewinds.get(&c.tp).copied().unwrap_or(committed);
            floors.push((c.tp.clone(), start));
            if start < committed {
                rewinds.push(Rewind {
                    tp: c.tp.clone(),
                    to: start,
                    committed,
                });
            }
        }
        Ok(Resumed {
            floors,
            rewinds,
            logs: Vec::new(),
            bootstraps: Vec::new(),
        })
    }
}

/// The loop running on its own task, and the other ends of its channels.
struct Harness {
    consumer: Arc<Consumer>,
    kafka: mpsc::Sender<KafkaEvent>,
    stage: mpsc::UnboundedSender<StageEvent>,
    /// The stage's end of the queue: batches and ownership changes, in order.
    queue: StageReceiver,
    health: Health,
    shutdown: ShutdownTrigger,
    task: tokio::task::JoinHandle<(LoopEnd, EventLoop<Table>)>,
}

const WAIT: Duration = Duration::from_secs(5);

fn tp(partition: i32) -> TopicPartition {
    TopicPartition::new("t", partition)
}

fn start(table: Table) -> Harness {
    start_with(table, None)
}

/// The loop of a consumption round after one that stopped consumption
/// (`stopped`), or the first round.
fn start_with(table: Table, stopped: Option<String>) -> Harness {
    start_configured(table, stopped, Duration::from_secs(30))
}

/// The loop with `kafka.revoke_timeout` at `revoke_timeout`.
fn start_configured(table: Table, stopped: Option<String>, revoke_timeout: Duration) -> Harness {
    let health = Health::default();
    let mut config = Config::defaults();
    config.pipeline.batch_linger = Duration::from_millis(5);
    config.kafka.revoke_timeout = revoke_timeout;
    let (kafka_tx, kafka_rx) = mpsc::channel(64);
    let (note_tx, notes) = mpsc::unbounded_channel();
    let consumer: Arc<Consumer> = Arc::new(
        ClientConfig::new()
            // Nothing listens there: the consumer is never polled anyway.
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "event-loop-tests")
            .set("enable.auto.offset.store", "false")
            // Nothing to commit to: a close would wait for a coordinator.
            .set("enable.auto.commit", "false")
            .create_with_context(Forwarder::new(
                kafka_tx.clone(),
                note_tx,
                Duration::from_secs(1),
                String::new(),
                crate::config::OffsetReset::Earliest,
            ))
            .expect("a consumer without a broker"),
    );
    let (stage_tx, stage_rx) = mpsc::unbounded_channel();
    let (queue_tx, queue_rx) = crate::pipeline::link::stage_queue(1);
    let (trigger, mut shutdown) = Shutdown::new();
    let mut event_loop = EventLoop::new(
        Arc::new(config),
        consumer.clone(),
        health.clone(),
        kafka_rx,
        notes,
        StageLink {
            events: stage_rx,
            queue: queue_tx,
        },
        table,
    )
    .stopped_before(stopped);
    let task = tokio::spawn(async move {
        let end = event_loop.run(&mut shutdown).await;
        (end, event_loop)
    });
    Harness {
        consumer,
        kafka: kafka_tx,
        stage: stage_tx,
        queue: queue_rx,
        health,
        shutdown: trigger,
        task,
    }
}

fn table() -> Table {
    Table {
        rewinds: HashMap::new(),
        unrecoverable: false,
    }
}

impl Harness {
    /// Assigns `(partition, committed)` as the consumer thread would, and
    /// returns the loop's answer: where partitions start instead.
    async fn assign(&self, partitions: &[(i32, Option<i64>)]) -> Vec<(TopicPartition, i64)> {
        let mut tpl = TopicPartitionList::new();
        for (p, _) in partitions {
            tpl.add_partition("t", *p);
        }
        self.consumer.assign(&tpl).expect("manual assignment");
        let committed = partitions
            .iter()
            .map(|(p, offset)| Committed {
                tp: tp(*p),
                offset: *offset,
                metadata: crate::resume::commit_metadata("E"),
                known: true,
            })
            .collect();
        self.assign_committed(committed).await
    }

    async fn assign_committed(&self, partitions: Vec<Committed>) -> Vec<(TopicPartition, i64)> {
        let (answer, rx) = std::sync::mpsc::sync_channel(1);
        self.send(KafkaEvent::Assigned { partitions, answer }).await;
        answer_of(rx).await
    }

    async fn send(&self, event: KafkaEvent) {
        self.kafka.send(event).await.expect("the loop takes events");
    }

    async fn records(&self, partition: i32, offsets: std::ops::Range<i64>) {
        for offset in offsets {
            let value = format!(r#"{{"id":"i{offset}","entity":"e","seq":{}}}"#, offset + 1);
            self.send(KafkaEvent::Record(Fetched {
                tp: tp(partition),
                record: TopicRecord {
                    partition,
                    offset,
                    timestamp_ms: None,
                    key: None,
                    value: Some(value.into_bytes()),
                    headers: Vec::new(),
                },
            }))
            .await;
        }
    }

    /// The next item the loop queued for the guard stage.
    async fn next_queued(&mut self) -> ToStage {
        tokio::time::timeout(WAIT, self.queue.recv())
            .await
            .expect("something queued within the wait")
            .expect("the loop is running")
    }

    /// The next batch the loop hands to the guard stage, past any
    /// ownership change queued before it.
    async fn next_batch(&mut self) -> Batch {
        loop {
            if let ToStage::Batch(batch) = self.next_queued().await {
                return batch;
            }
        }
    }

    /// The next ownership change, past any batch queued before it.
    async fn next_ownership(&mut self) -> Ownership {
        loop {
            if let ToStage::Ownership(change) = self.next_queued().await {
                return change;
            }
        }
    }

    /// Whether anything but ownership changes is queued now.
    fn batch_queued(&mut self) -> bool {
        std::iter::from_fn(|| self.queue.try_recv()).any(|q| matches!(q, ToStage::Batch(_)))
    }

    /// Sends a revoke and returns the answer's receiver (answered later).
    async fn revoke(
        &self,
        partitions: &[i32],
    ) -> std::sync::mpsc::Receiver<Vec<(TopicPartition, i64)>> {
        let (answer, rx) = std::sync::mpsc::sync_channel(1);
        let partitions = partitions.iter().map(|p| tp(*p)).collect();
        self.send(KafkaEvent::Revoked { partitions, answer }).await;
        rx
    }

    async fn ended(self) -> (LoopEnd, EventLoop<Table>) {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the loop ends within the wait")
            .expect("the loop does not panic")
    }
}

async fn answer_of<T: Send + 'static>(rx: std::sync::mpsc::Receiver<T>) -> T {
    tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the loop answers within the wait")
}

fn offsets(batch: &Batch) -> Vec<(i32, i64)> {
    batch.positions().map(|(tp, o)| (tp.partition, o)).collect()
}

fn rolled_back() -> StateChanged {
    StateChanged {
        cause: Change::RolledBack,
        detail: "redis: progress of t/0 is Some(200), idem recorded 400".into(),
    }
}

#[tokio::test]
async fn an_assignment_answers_the_rewinds_and_tells_the_stage_what_to_check() {
    let mut table = table();
    table.rewinds.insert(tp(1), 5);
    let mut h = start(table);
    let starts = h.assign(&[(0, Some(10)), (1, Some(20))]).await;
    assert_eq!(
        starts,
        [(tp(1), 5)],
        "only the rewound partition starts elsewhere"
    );
    match h.next_ownership().await {
        Ownership::Taken { mut floors, .. } => {
            floors.sort_by_key(|(tp, _)| tp.partition);
            assert_eq!(floors, [(tp(0), 10), (tp(1), 5)]);
        }
        other => panic!("expected the assignment's floors, got {other:?}"),
    }
    assert!(h
        .health
        .not_ready_reason()
        .is_some_and(|r| r.contains("re-reading 1 partition")));
    h.records(1, 5..7).await;
    assert_eq!(offsets(&h.next_batch().await), [(1, 5), (1, 6)]);
}

#[tokio::test]
async fn a_revoke_waits_for_the_in_flight_batch_and_answers_its_commit_point() {
    let mut h = start(table());
    h.assign(&[(0, None)]).await;
    h.records(0, 0..3).await;
    let batch = h.next_batch().await;
    let answer = h.revoke(&[0]).await;
    // The loop is waiting for the batch: no answer yet.
    tokio::task::yield_now().await;
    assert!(
        answer.try_recv().is_err(),
        "answered before the batch finished"
    );
    h.stage
        .send(StageEvent::Finished(batch.finished()))
        .unwrap();
    assert_eq!(
        answer_of(answer).await,
        [(tp(0), 3)],
        "committed == last done + 1"
    );
    let released = loop {
        match h.next_ownership().await {
            Ownership::Released(tps) => break tps,
            Ownership::Taken { .. } => continue,
        }
    };
    assert_eq!(
        released,
        [tp(0)],
        "the stage stops checking a revoked partition"
    );
}

#[tokio::test]
async fn a_restart_from_the_stage_ends_the_loop_with_its_cause() {
    let h = start(table());
    h.assign(&[(0, Some(400))]).await;
    // What the idle check reports when Redis went back under an idle partition.
    h.stage.send(StageEvent::Restart(rolled_back())).unwrap();
    match h.ended().await.0 {
        LoopEnd::Restart(why @ Restart::StateChanged(_)) => {
            let why = why.to_string();
            assert!(why.contains("rolled_back") && why.contains("400"), "{why}")
        }
        other => panic!("expected a restart, got {other:?}"),
    }
}

#[tokio::test]
async fn a_restart_during_a_revoke_answers_at_once_then_ends_the_loop() {
    let mut h = start(table());
    h.assign(&[(0, None)]).await;
    h.records(0, 0..2).await;
    let _in_flight = h.next_batch().await;
    let answer = h.revoke(&[0]).await;
    // One turn for the loop (this runtime has one thread): it takes the
    // revoke and waits for the batch.
    tokio::task::yield_now().await;
    h.stage.send(StageEvent::Restart(rolled_back())).unwrap();
    // Well before kafka.revoke_timeout (30 s): the stage stopped, nothing more finishes.
    assert_eq!(
        answer_of(answer).await,
        [],
        "nothing of the unfinished batch is committed"
    );
    assert!(matches!(h.ended().await.0, LoopEnd::Restart(_)));
}

#[tokio::test]
async fn stop_consuming_drops_new_records_and_still_commits_what_finishes() {
    let mut h = start(table());
    h.assign(&[(0, None)]).await;
    h.records(0, 0..2).await;
    let batch = h.next_batch().await;
    h.stage
        .send(StageEvent::StopConsuming("dead-letter ratio 0.9".into()))
        .unwrap();
    h.stage
        .send(StageEvent::Finished(batch.finished()))
        .unwrap();
    h.records(0, 2..4).await;
    let answer = h.revoke(&[0]).await;
    assert_eq!(
        answer_of(answer).await,
        [],
        "the finished batch was stored before the revoke"
    );
    assert_eq!(
        h.health.stopped_reason().as_deref(),
        Some("dead-letter ratio 0.9")
    );
    assert!(!h.batch_queued(), "no record is batched once stopped");
    h.shutdown.trigger();
    let (end, event_loop) = h.ended().await;
    assert!(matches!(end, LoopEnd::Shutdown));
    assert_eq!(
        event_loop.in_flight(),
        0,
        "records after the stop were never begun"
    );
}

#[tokio::test]
async fn shutdown_during_a_drain_ends_the_loop_and_finish_takes_what_the_stage_finished() {
    let mut h = start(table());
    h.assign(&[(0, None)]).await;
    h.records(0, 0..3).await;
    let batch = h.next_batch().await;
    h.shutdown.trigger();
    let stage = h.stage.clone();
    let (end, mut event_loop) = h.ended().await;
    assert!(matches!(end, LoopEnd::Shutdown));
    assert_eq!(event_loop.in_flight(), 3);
    // The guard stage finishes its batch during the drain, then ends.
    stage.send(StageEvent::Finished(batch.finished())).unwrap();
    event_loop.finish();
    assert_eq!(
        event_loop.in_flight(),
        0,
        "the drained batch is done, so its offsets are stored"
    );
}

#[tokio::test]
async fn an_unreadable_commit_or_a_lost_log_ends_the_loop_without_starts() {
    let h = start(table());
    let starts = h
        .assign_committed(vec![Committed {
            tp: tp(0),
            offset: None,
            metadata: String::new(),
            known: false,
        }])
        .await;
    assert_eq!(starts, []);
    assert!(
        matches!(h.ended().await.0, LoopEnd::Restart(why @ Restart::CommitUnknown(_)) if why.to_string().contains("committed offset of t/0"))
    );

    let mut table = table();
    table.unrecoverable = true;
    let h = start(table);
    assert_eq!(h.assign(&[(0, Some(5))]).await, []);
    assert!(matches!(h.ended().await.0, LoopEnd::Unrecoverable(_)));
}

/// `/readyz` and `idem_assigned_partitions` speak of an assignment only
/// once every start of it is decided: while Redis's records are read the
/// instance serves nothing (a test that restored a snapshot after "ready"
/// raced the reading).
#[tokio::test]
async fn an_assignment_is_ready_only_once_its_starts_are_decided() {
    let mut table = table();
    table.unrecoverable = true;
    let h = start(table);
    h.health.set_redis_ok();
    assert_eq!(h.assign(&[(0, Some(5))]).await, []);
    assert!(
        !h.health.is_ready(),
        "ready though no start was decided: {:?}",
        h.health.not_ready_reason()
    );
    assert!(matches!(h.ended().await.0, LoopEnd::Unrecoverable(_)));

    let h = start(self::table());
    h.health.set_redis_ok();
    h.assign(&[(0, Some(5))]).await;
    assert!(h.health.is_ready(), "{:?}", h.health.not_ready_reason());
}

#[tokio::test]
async fn a_stop_outlives_a_restart_of_consumption() {
    let mut h = start_with(table(), Some("dead-letter ratio 0.9".into()));
    h.assign(&[(0, None)]).await;
    h.records(0, 0..3).await;
    let answer = h.revoke(&[0]).await;
    assert_eq!(
        answer_of(answer).await,
        [],
        "nothing was begun, so nothing is committed"
    );
    assert!(
        !h.batch_queued(),
        "the new round batches nothing once stopped"
    );
    h.shutdown.trigger();
    let (_, event_loop) = h.ended().await;
    assert_eq!(event_loop.in_flight(), 0);
    assert_eq!(
        event_loop.stopped().as_deref(),
        Some("dead-letter ratio 0.9"),
        "and the round hands the stop on to the next"
    );
}

#[tokio::test]
async fn a_fatal_consumer_error_ends_the_loop_and_readyz_names_it_until_a_join() {
    let h = start(table());
    h.health.set_redis_ok();
    h.assign(&[(0, Some(10))]).await;
    assert!(h.health.is_ready(), "joined with a partition");
    h.send(KafkaEvent::Fatal(FatalError {
        code: RDKafkaErrorCode::UnreleasedInstanceId,
        reason: "instance id pod-0 is in use".into(),
    }))
    .await;
    let health = h.health.clone();
    let (end, event_loop) = h.ended().await;
    let LoopEnd::Restart(why) = end else {
        panic!("a fatal error restarts the consumer, got {end:?}");
    };
    let why = why.to_string();
    assert!(
        why.contains("unreleased_instance_id: instance id pod-0 is in use"),
        "{why}"
    );
    let reason = health
        .not_ready_reason()
        .expect("not ready after a fatal error");
    assert!(
        reason.contains("restarting the consumer") && reason.contains("group.instance.id"),
        "{reason}"
    );
    // The dead consumer's partitions are dropped: nothing more of them is committed.
    assert_eq!(event_loop.owned.assigned_count(), 0);
    health.set_joined();
    assert!(health.is_ready(), "the next consumer's join clears it");
}

/// Fetching is paused (here: consumption stopped; the same holds for a
/// guard stage behind), then the partitions are lost and assigned again.
/// The consumer thread assigns them only after the loop answered, so the
/// loop must count them among the paused partitions, or a resume never
/// resumes them. (Found from outside: a member paused past its session
/// while a guard call failed got its partitions back and never fetched
/// again; the pause had read the still empty assignment and replaced the
/// paused partitions with none.)
#[tokio::test]
async fn partitions_assigned_again_while_paused_stay_among_the_paused() {
    let h = start(table());
    h.assign(&[(0, None), (1, None)]).await;
    h.stage
        .send(StageEvent::StopConsuming("dead-letter ratio 0.9".into()))
        .unwrap();
    h.send(KafkaEvent::Lost(vec![tp(0), tp(1)])).await;
    // As the consumer thread does: unassign the lost, ask, then assign.
    h.consumer.unassign().unwrap();
    let committed = [0, 1]
        .map(|p| Committed {
            tp: tp(p),
            offset: None,
            metadata: crate::resume::commit_metadata("E"),
            known: true,
        })
        .to_vec();
    h.assign_committed(committed).await;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("t", 0);
    tpl.add_partition("t", 1);
    h.consumer.assign(&tpl).unwrap();
    h.shutdown.trigger();
    let (_, event_loop) = h.ended().await;
    let paused: Vec<i32> = event_loop
        .mode
        .paused()
        .map(|p| p.elements().iter().map(|e| e.partition()).collect())
        .unwrap_or_default();
    assert_eq!(
        paused,
        [0, 1],
        "the partitions assigned again are paused too"
    );
}

/// Records wait for a full guard stage until fetching pauses; then their
/// partition is lost, so they are dropped. With nothing left to hand over,
/// the loop must resume fetching (a resume came only with a hand-over, so
/// the reassigned partition never fetched again: found from outside, a
/// member paused past its session while a guard call failed).
#[tokio::test]
async fn a_pause_ends_when_the_records_it_held_back_are_dropped() {
    let h = start(table());
    h.assign(&[(0, None)]).await;
    h.records(0, 0..2).await;
    // The first batch fills the stage's channel (nobody takes it); the next
    // records wait, and after PAUSE_AFTER fetching pauses. The pause has no
    // signal outside the loop: wait past it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.records(0, 2..4).await;
    tokio::time::sleep(PAUSE_AFTER + Duration::from_millis(500)).await;
    h.send(KafkaEvent::Lost(vec![tp(0)])).await;
    h.consumer.unassign().unwrap();
    h.assign(&[(0, Some(2))]).await;
    h.shutdown.trigger();
    let (_, event_loop) = h.ended().await;
    assert!(
        event_loop.mode.paused().is_none(),
        "still paused: {:?}",
        event_loop.mode
    );
}

/// A revoke is answered while the stage's queue is full and the stage
/// takes nothing (as while it retries a Redis outage): only batches count
/// toward the queue's bound. The release is queued behind the batch
/// handed before it, so the stage applies that batch first.
#[tokio::test]
async fn a_revoke_is_answered_while_the_queue_has_no_room() {
    let mut h = start(table());
    h.assign(&[(0, None), (1, None)]).await;
    h.records(0, 0..2).await;
    // The stage holds this one, retrying it.
    let _held = h.next_batch().await;
    h.records(0, 2..4).await;
    // Queued: the queue (room for one) is full once it is there.
    let deadline = Instant::now() + WAIT;
    while h.queue.len() == 0 {
        assert!(Instant::now() < deadline, "the second batch was not queued");
        tokio::task::yield_now().await;
    }
    h.records(0, 4..6).await;
    let answer = h.revoke(&[1]).await;
    assert_eq!(
        answer_of(answer).await,
        [],
        "nothing of partition 1 in flight"
    );
    let Some(ToStage::Batch(queued)) = h.queue.try_recv() else {
        panic!("the batch handed before the revoke comes first");
    };
    assert_eq!(offsets(&queued), [(0, 2), (0, 3)]);
    assert!(matches!(
        h.queue.try_recv(),
        Some(ToStage::Ownership(Ownership::Released(tps))) if tps == [tp(1)]
    ));
}

/// The stage ends (Redis's state changed) while the loop hands it a full
/// batch: the hand-over finds it gone, and the round ends as the stage's
/// last report says, a restart, not a shutdown. (Found from outside: the
/// loop took the failed hand-over for a shutdown, and idem exited instead
/// of restarting consumption.) A full batch is handed over before the loop
/// reads anything more, so the revoke comes after it; its answer (after
/// `kafka.revoke_timeout`, nothing of the batch being done) shows the loop
/// still runs.
#[tokio::test]
async fn a_stage_gone_during_a_hand_over_ends_the_round_as_its_last_report_says() {
    let mut h = start_configured(table(), None, Duration::from_millis(200));
    h.assign(&[(0, None)]).await;
    let (_, fresh) = crate::pipeline::link::stage_queue(1);
    drop(std::mem::replace(&mut h.queue, fresh));
    let max = Config::defaults().pipeline.batch_max_events.get() as i64;
    h.records(0, 0..max).await;
    let answer = h.revoke(&[0]).await;
    assert_eq!(
        answer_of(answer).await,
        [],
        "the loop outlived the failed hand-over; nothing of the batch is committed"
    );
    h.stage.send(StageEvent::Restart(rolled_back())).unwrap();
    assert!(matches!(
        h.ended().await.0,
        LoopEnd::Restart(Restart::StateChanged(_))
    ));
}
