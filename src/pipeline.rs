//! The processing loop: fetch a batch, decode, guard+effect in Redis, mark
//! offsets done, store the contiguous commit point.
//!
//! Guarantee (commit after effect): an offset is stored for commit only when
//! it and every offset fetched before it in its partition has its outcome
//! durable in Redis. A failing Redis call is retried with capped exponential
//! backoff and nothing past it is stored meanwhile. Batches are processed one
//! at a time and in fetch order, so per-partition order is preserved.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::config::Config;
use crate::event::{self, Event};
use crate::guard::{Guard, GuardInput, Verdict};
use crate::kafka::{self, IdemContext};
use crate::metrics::{self, Health};
use crate::model::Outcome;
use crate::offsets::{Offsets, TopicPartition};
use crate::store::{self, KeyLayout};

/// A cancellation signal shared by every part of one run.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Fires the [`Shutdown`] it was created with.
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown was triggered (at once if it already was).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

/// Runs idem until `shutdown` fires: serves metrics, consumes the configured
/// topics and applies them to Redis. Returns after the final commit.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let handle = metrics::install()?;
    let health = Health::default();
    metrics::serve(config.metrics_listen, handle, health.clone()).await?;
    for topic in &config.kafka.topics {
        metrics::init_topic(topic);
    }
    run_pipeline(config, health, shutdown).await
}

async fn run_pipeline(
    config: Config,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let Some(conn) = connect_redis(&config, &mut shutdown).await else {
        return Ok(());
    };
    health.set_redis_ok(true);
    let mut guard = Guard::new(
        conn,
        KeyLayout::new(&config.redis.key_prefix),
        config.pipeline.events_per_script.get(),
    );
    let consumer: StreamConsumer<IdemContext> = kafka::consumer_config(&config.kafka)
        .create_with_context(IdemContext {
            health: health.clone(),
        })?;
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(
        group = %config.kafka.group_id,
        topics = ?config.kafka.topics,
        brokers = %config.kafka.brokers,
        "consuming"
    );

    let mut worker = Worker {
        config: &config,
        guard: &mut guard,
        offsets: Offsets::default(),
        health: health.clone(),
        summary: Summary::new(),
    };
    let max = config.pipeline.batch_max_events.get();
    let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(max);
    loop {
        let first = tokio::select! {
            // Shutdown first: once asked to stop, take no new work.
            biased;
            _ = shutdown.wait() => break,
            m = consumer.recv() => m,
        };
        match first {
            Ok(m) => batch.push(m),
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error; continuing");
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + config.pipeline.batch_linger;
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error; continuing");
                    break;
                }
                Err(_) => break,
            }
        }
        let finished = worker.process(&batch, &mut shutdown).await;
        batch.clear();
        if !finished {
            break;
        }
        worker.store_commits(&consumer);
        worker.summary.maybe_log();
    }

    tracing::info!("shutting down: final commit of finished offsets");
    worker.store_commits(&consumer);
    worker.summary.log();
    kafka::commit_stored(&consumer);
    consumer.unsubscribe();
    close_consumer(consumer).await;
    tracing::info!("stopped");
    Ok(())
}

/// Connects to Redis, retrying with backoff until it answers or shutdown fires.
async fn connect_redis(
    config: &Config,
    shutdown: &mut Shutdown,
) -> Option<redis::aio::ConnectionManager> {
    let mut backoff = Backoff::new(config);
    loop {
        match store::connect(&config.redis).await {
            Ok(conn) => return Some(conn),
            Err(e) => {
                let wait = backoff.next();
                metrics::record_retry("redis_connect");
                tracing::warn!(
                    url = %crate::config::redact_url(&config.redis.url),
                    error = %e,
                    retry_in = ?wait,
                    "cannot reach Redis; is it running and is redis.url right?"
                );
                tokio::select! {
                    _ = shutdown.wait() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Drops the consumer off the async runtime: librdkafka's destroy can block
/// (rust-rdkafka #509), and it must not stall the runtime or hang the exit.
async fn close_consumer(consumer: StreamConsumer<IdemContext>) {
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .is_err()
    {
        tracing::warn!(
            "kafka consumer did not close within 10s; exiting anyway (the guard makes this safe)"
        );
    }
}

struct Worker<'a> {
    config: &'a Config,
    guard: &'a mut Guard,
    offsets: Offsets,
    health: Health,
    summary: Summary,
}

impl Worker<'_> {
    /// Decides and applies one batch. Returns false if shutdown fired while
    /// Redis was failing: the batch is then left unfinished and uncommitted.
    async fn process(&mut self, batch: &[BorrowedMessage<'_>], shutdown: &mut Shutdown) -> bool {
        let started = Instant::now();
        let fields = &self.config.event.fields;
        let max_bytes = self.config.event.max_bytes;
        let mut decoded: Vec<(usize, Event)> = Vec::with_capacity(batch.len());
        let mut counts: HashMap<(&str, Outcome), u64> = HashMap::new();
        for (i, m) in batch.iter().enumerate() {
            let tp = TopicPartition::new(m.topic(), m.partition());
            self.offsets.begin(&tp, m.offset());
            match event::decode(m.payload(), fields, max_bytes) {
                Ok(e) => decoded.push((i, e)),
                Err(invalid) => {
                    tracing::warn!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        reason = invalid.code(),
                        error = %invalid,
                        "invalid record skipped"
                    );
                    *counts.entry((m.topic(), Outcome::Invalid)).or_default() += 1;
                    self.offsets.mark_done(&tp, m.offset());
                }
            }
        }
        let inputs: Vec<GuardInput<'_>> = decoded
            .iter()
            .map(|(i, e)| GuardInput {
                event: e,
                window: self.config.dedupe.window_for(batch[*i].topic()),
            })
            .collect();

        let Some(verdicts) = self.guard_with_retry(&inputs, shutdown).await else {
            return false;
        };
        for ((i, e), verdict) in decoded.iter().zip(&verdicts) {
            let m = &batch[*i];
            record_verdict(m, e, verdict);
            *counts.entry((m.topic(), verdict.outcome)).or_default() += 1;
            self.offsets
                .mark_done(&TopicPartition::new(m.topic(), m.partition()), m.offset());
        }
        for ((topic, outcome), n) in counts {
            metrics::record_outcome(topic, outcome, n);
            self.summary.add(outcome, n);
        }
        metrics::record_batch(batch.len(), started.elapsed());
        true
    }

    async fn guard_with_retry(
        &mut self,
        inputs: &[GuardInput<'_>],
        shutdown: &mut Shutdown,
    ) -> Option<Vec<Verdict>> {
        let mut backoff = Backoff::new(self.config);
        loop {
            let started = Instant::now();
            match self.guard.apply(inputs).await {
                Ok(verdicts) => {
                    metrics::record_round_trip(started.elapsed());
                    self.health.set_redis_ok(true);
                    return Some(verdicts);
                }
                Err(e) => {
                    self.health.set_redis_ok(false);
                    metrics::record_retry(e.cause());
                    let wait = backoff.next();
                    tracing::warn!(
                        error = %e,
                        retryable = e.is_retryable(),
                        events = inputs.len(),
                        retry_in = ?wait,
                        "redis guard call failed; nothing past this batch is committed until it succeeds"
                    );
                    tokio::select! {
                        _ = shutdown.wait() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Stores each partition's new commit point for librdkafka's next commit.
    fn store_commits(&mut self, consumer: &StreamConsumer<IdemContext>) {
        for (tp, next) in self.offsets.take_commits() {
            let mut tpl = TopicPartitionList::with_capacity(1);
            let stored = tpl
                .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
                .and_then(|()| consumer.store_offsets(&tpl));
            match stored {
                Ok(()) => metrics::set_committed_offset(&tp.topic, tp.partition, next),
                // The partition moved to another instance: its new owner decides.
                Err(e) => {
                    tracing::debug!(topic = %tp.topic, partition = tp.partition, error = %e, "offset not stored (partition no longer assigned)");
                    self.offsets.forget(&tp);
                }
            }
        }
    }
}

fn record_verdict(m: &BorrowedMessage<'_>, e: &Event, verdict: &Verdict) {
    match verdict.outcome {
        Outcome::Duplicate => {
            if let Some(age) = verdict.duplicate_age {
                metrics::record_duplicate_age(age);
            }
        }
        Outcome::Conflict => tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            id = %e.id,
            fingerprint = %format!("{:016x}", e.fingerprint),
            remembered = %format!("{:016x}", verdict.remembered_fingerprint.unwrap_or(0)),
            "conflict: id reused with a different payload; not applied"
        ),
        _ => {}
    }
}

/// Capped exponential backoff.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &Config) -> Self {
        Backoff {
            next: config.pipeline.retry_initial_backoff,
            max: config.pipeline.retry_max_backoff,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// A periodic one-line summary of outcomes for the log.
struct Summary {
    counts: [u64; 5],
    last_log: Instant,
}

impl Summary {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Summary {
            counts: [0; 5],
            last_log: Instant::now(),
        }
    }

    fn add(&mut self, outcome: Outcome, n: u64) {
        self.counts[outcome as usize] += n;
    }

    fn maybe_log(&mut self) {
        if self.last_log.elapsed() >= Self::EVERY {
            self.log();
        }
    }

    fn log(&mut self) {
        let [applied, duplicate, stale, conflict, invalid] = self.counts;
        tracing::info!(
            applied,
            duplicate,
            stale,
            conflict,
            invalid,
            "outcomes since start"
        );
        self.last_log = Instant::now();
    }
}
