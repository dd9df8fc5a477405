//! The consumer thread: polls a `BaseConsumer` on a thread of its own and
//! forwards everything librdkafka reports (records, rebalances, commits,
//! statistics) to the processing loop as [`KafkaEvent`]s. The loop owns all
//! progress; this thread owns nothing but the client.
//!
//! This is Quickwit's pattern (`quickwit-indexing/src/source/kafka_source.rs`).
//! With a `StreamConsumer` the rebalance callback runs inside the loop's own
//! `recv()`, so "send to the loop and wait for its answer" would deadlock;
//! here the callback runs on the poll thread, which may wait while the loop
//! drains the revoked partitions.
//!
//! Guarantee: a revoke is answered only by the loop, after the revoked
//! partitions' in-flight batches finished (or the revoke deadline passed);
//! the commit points it answers with are stored and committed synchronously
//! before librdkafka hands the partitions on. A lost assignment commits
//! nothing. Once the loop is gone (shutdown), a revoke commits nothing more:
//! the loop made its final commit before it let go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::OffsetReset;
use crate::kafka::{self, TopicRecord};
use crate::metrics;
use crate::offsets::TopicPartition;

/// A record as fetched, with the partition it came from, before decoding.
pub struct Fetched {
    pub tp: TopicPartition,
    pub record: TopicRecord,
}

impl Fetched {
    fn from_message(m: &BorrowedMessage<'_>) -> Fetched {
        Fetched {
            tp: TopicPartition::new(m.topic(), m.partition()),
            record: TopicRecord::from_message(m),
        }
    }
}

/// A newly assigned partition with its committed offset and metadata.
#[derive(Debug, Clone)]
pub struct Committed {
    pub tp: TopicPartition,
    /// `None`: no commit.
    pub offset: Option<i64>,
    pub metadata: String,
    /// Whether the commit could be read (if not, consumption restarts).
    pub known: bool,
}

/// What the consumer thread tells the loop, in the order librdkafka reported it.
pub enum KafkaEvent {
    Record(Fetched),
    Error(KafkaError),
    /// The loop answers with the partitions that must start elsewhere than
    /// their committed offset (Redis's state stops before it).
    Assigned {
        partitions: Vec<Committed>,
        answer: std::sync::mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
    },
    /// The loop stops taking records of `partitions`, waits (bounded) for
    /// their in-flight batches and answers with their commit points.
    Revoked {
        partitions: Vec<TopicPartition>,
        answer: std::sync::mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
    },
    /// The assignment was lost (session timeout, fenced): commit nothing.
    Lost(Vec<TopicPartition>),
    /// librdkafka's client failed for good (e.g. `UNRELEASED_INSTANCE_ID`:
    /// another member still holds this `group.instance.id`). It serves
    /// nothing more; only a new consumer can.
    Fatal(FatalError),
}

/// A fatal error of the consumer, as `rd_kafka_fatal_error` reports it.
#[derive(Debug, Clone)]
pub struct FatalError {
    pub code: RDKafkaErrorCode,
    pub reason: String,
}

/// Facts for metrics only, which need no order with the records.
pub enum KafkaNote {
    Committed(Vec<(TopicPartition, i64)>),
    /// Whether the group protocol is up (a member of a settled group, with
    /// or without partitions) and per partition: consumer lag, stored
    /// offset, committed offset.
    Stats {
        joined: bool,
        rows: Vec<(TopicPartition, i64, i64, i64)>,
    },
}

/// The client context: forwards callbacks to the loop.
pub struct Forwarder {
    events: mpsc::Sender<KafkaEvent>,
    notes: mpsc::UnboundedSender<KafkaNote>,
    /// How long a revoke waits for the loop's answer (the loop's own bound
    /// plus slack).
    revoke_wait: Duration,
    limiter: kafka::quiet::LogLimiter,
    /// Stored with every offset: the epoch of the Redis the effects are in.
    metadata: String,
    /// `kafka.auto_offset_reset = "latest"`: a partition without a commit
    /// starts at its end (set here, not by librdkafka's reset).
    new_partitions_at_end: bool,
}

pub type Consumer = BaseConsumer<Forwarder>;

impl Forwarder {
    pub fn new(
        events: mpsc::Sender<KafkaEvent>,
        notes: mpsc::UnboundedSender<KafkaNote>,
        revoke_timeout: Duration,
        metadata: String,
        reset: OffsetReset,
    ) -> Forwarder {
        Forwarder {
            events,
            notes,
            revoke_wait: revoke_timeout + Duration::from_secs(5),
            limiter: kafka::quiet::LogLimiter::default(),
            metadata,
            new_partitions_at_end: reset == OffsetReset::Latest,
        }
    }

    /// Reads the committed offsets of `tpl`, asks the loop where each must
    /// start, and sets those offsets in `tpl` before it is assigned.
    fn assign(&self, consumer: &Consumer, tpl: &mut TopicPartitionList) {
        let partitions: Vec<Committed> = match consumer
            .committed_offsets(tpl.clone(), self.revoke_wait)
        {
            Ok(committed) => committed
                .elements()
                .iter()
                .map(|e| Committed {
                    tp: TopicPartition::new(e.topic(), e.partition()),
                    offset: match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    },
                    metadata: e.metadata().to_string(),
                    known: e.error().is_ok(),
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the committed offsets of the assigned partitions; consumption restarts");
                partitions_of(tpl)
                    .into_iter()
                    .map(|tp| Committed {
                        tp,
                        offset: None,
                        metadata: String::new(),
                        known: false,
                    })
                    .collect()
            }
        };
        if self.new_partitions_at_end {
            for c in partitions.iter().filter(|c| c.known && c.offset.is_none()) {
                if let Err(e) = tpl.set_partition_offset(&c.tp.topic, c.tp.partition, Offset::End) {
                    tracing::error!(error = %e, topic = %c.tp.topic, partition = c.tp.partition, "could not start the new partition at its end");
                }
            }
        }
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        if self
            .events
            .blocking_send(KafkaEvent::Assigned { partitions, answer })
            .is_err()
        {
            return;
        }
        // No timeout: a partition must never start without the loop's
        // decision (the answer comes, or the loop is gone and so is the sender).
        if let Ok(starts) = answered.recv() {
            for (tp, offset) in starts {
                if let Err(e) =
                    tpl.set_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset))
                {
                    tracing::error!(error = %e, topic = %tp.topic, partition = tp.partition, "could not set the rewound start offset");
                }
            }
        }
    }

    fn revoke(&self, consumer: &Consumer, partitions: Vec<TopicPartition>) {
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let n = partitions.len();
        let named = crate::offsets::describe_partitions(&partitions);
        if self
            .events
            .blocking_send(KafkaEvent::Revoked { partitions, answer })
            .is_err()
        {
            return; // the loop is gone; it made its final commit
        }
        let Ok(commits) = answered.recv_timeout(self.revoke_wait) else {
            tracing::warn!(
                partitions = %named,
                count = n,
                "the loop did not answer the revoke in time; committing nothing for the revoked partitions"
            );
            return;
        };
        for (tp, next) in &commits {
            kafka::store_offset(consumer, tp, *next, &self.metadata);
        }
        kafka::commit_stored(consumer);
        tracing::info!(
            partitions = %named,
            count = n,
            committed = commits.len(),
            "partitions revoked after committing their finished offsets"
        );
    }
}

impl ClientContext for Forwarder {
    /// A refusal after start (rotated credentials, a replaced certificate)
    /// is logged as an error with its cause; librdkafka keeps retrying, so
    /// idem resumes once the brokers accept it again.
    fn error(&self, error: KafkaError, reason: &str) {
        if kafka::is_refusal(&error, reason) {
            metrics::record_retry("kafka_refused");
            tracing::error!(error = %error, reason, "Kafka refused idem's credentials or TLS handshake; consumption is stalled until the brokers accept them (see docs/security.md)");
        } else {
            self.limiter.error(&error, reason);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.limiter.log(level, fac, message);
    }

    /// librdkafka's periodic statistics carry each partition's lag and its
    /// stored vs committed offsets.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut rows = Vec::new();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 {
                    rows.push((
                        TopicPartition::new(topic.as_str(), *partition),
                        p.consumer_lag,
                        p.stored_offset,
                        p.committed_offset,
                    ));
                }
            }
        }
        let joined = statistics
            .cgrp
            .as_ref()
            .is_some_and(|g| g.state == "up" && g.join_state == "steady");
        let _ = self.notes.send(KafkaNote::Stats { joined, rows });
    }
}

impl ConsumerContext for Forwarder {
    /// rust-rdkafka's own `rebalance`, with one change: an assignment's
    /// start offsets may be set (rewound) before librdkafka takes it.
    fn rebalance(&self, consumer: &Consumer, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(consumer, tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    let _ = self
                        .events
                        .blocking_send(KafkaEvent::Lost(partitions_of(tpl)));
                } else {
                    self.revoke(consumer, partitions_of(tpl));
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                metrics::record_rebalance("error");
                tracing::warn!(error = %RDKafkaErrorCode::from(other), "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "librdkafka refused the rebalance's assignment change");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                let committed = offsets
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => {
                            Some((TopicPartition::new(e.topic(), e.partition()), o))
                        }
                        _ => None,
                    })
                    .collect();
                let _ = self.notes.send(KafkaNote::Committed(committed));
                tracing::debug!(partitions = offsets.count(), "offsets committed");
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; it is retried with the next commit")
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

/// The thread that polls the consumer; stopped by [`PollThread::stop`].
pub struct PollThread {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// How long one poll waits; bounds how late a stop is noticed.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

impl PollThread {
    pub fn spawn(
        consumer: Arc<Consumer>,
        events: mpsc::Sender<KafkaEvent>,
    ) -> std::io::Result<PollThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::Builder::new()
            .name("idem-consumer".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let event = match consumer.poll(POLL_TIMEOUT) {
                        None => continue,
                        Some(Ok(m)) => KafkaEvent::Record(Fetched::from_message(&m)),
                        // A fatal error raises an error event; the client
                        // names the underlying one.
                        Some(Err(e)) => match consumer.client().fatal_error() {
                            Some((code, reason)) => KafkaEvent::Fatal(FatalError { code, reason }),
                            None => KafkaEvent::Error(e),
                        },
                    };
                    let fatal = matches!(event, KafkaEvent::Fatal(_));
                    // After a fatal error the client delivers nothing more.
                    if events.blocking_send(event).is_err() || fatal {
                        break;
                    }
                }
            })?;
        Ok(PollThread { stop, handle })
    }

    /// Stops polling; returns once the thread has ended. Call after the
    /// loop dropped its event receiver, so that a blocked send returns.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}
