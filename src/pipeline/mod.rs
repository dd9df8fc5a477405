//! The processing loop: fetch a batch, decode, guard+effect in Redis, mark
//! offsets done, store the contiguous commit point.
//!
//! Guarantee (commit after effect): an offset is stored for commit only when
//! it and every offset fetched before it in its partition has its outcome
//! durable in Redis. A failing Redis call is retried with capped exponential
//! backoff and nothing past it is stored meanwhile. Batches are processed one
//! at a time and in fetch order, so per-partition order is preserved.

mod apply;
mod batch;
mod progress;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::guard::Guard;
use crate::kafka::{self, IdemContext};
use crate::metrics::{self, Health};
use crate::model::Outcome;
use crate::store::{self, KeyLayout};
use apply::GuardStage;
use batch::Batch;
pub use progress::Progress;

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
    run_pipeline(Arc::new(config), health, shutdown).await
}

/// How long start-up waits for the brokers to answer before it goes on
/// without them (they are retried) — a refused login fails at once.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

async fn run_pipeline(
    config: Arc<Config>,
    health: Health,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let kafka_config = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka::preflight(&kafka_config, PREFLIGHT_TIMEOUT))
        .await??;
    let Some(conn) = connect_redis(&config, &mut shutdown).await? else {
        return Ok(());
    };
    health.set_redis_ok(true);
    let mut conn = conn;
    store::check_eviction_policy(&mut conn, config.redis.allow_eviction)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::dlq::check_topic_limits(&config).await;
    let wait = store::durable_wait(&mut conn, config.redis.durability)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut guard = Guard::new(
        conn,
        KeyLayout::new(&config.redis.key_prefix),
        config.pipeline.events_per_script.get(),
    )
    // Half the response timeout, so a slow WAIT reports itself before the client gives up.
    .with_durable_wait(wait, config.redis.response_timeout / 2);
    if let Err(e) = guard.load_script().await {
        tracing::warn!(error = %e, "could not load the guard script now; it is loaded on first use");
    }
    let progress = Arc::new(Progress::default());
    let consumer: StreamConsumer<IdemContext> = kafka::consumer_config(&config.kafka)
        .create_with_context(IdemContext {
            health: health.clone(),
            progress: progress.clone(),
            revoke_timeout: config.kafka.revoke_timeout,
        })?;
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(
        group = %config.kafka.group_id,
        topics = ?config.kafka.topics,
        brokers = %config.kafka.brokers,
        "consuming"
    );

    // Stage 2, its own task: applies batches in order. The channel holds one
    // batch while another is applied, so fetching and decoding overlap the
    // Redis round trip, and at most two batches are in flight.
    let summary = Arc::new(std::sync::Mutex::new(Summary::new()));
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let stage = GuardStage {
        config: config.clone(),
        guard,
        progress: progress.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
        summary: summary.clone(),
        dlq: crate::dlq::DlqWriter::new(&config)?,
        budget: crate::dlq::budget::DlqBudget::new(config.dlq.ratio_window, config.dlq.max_ratio),
    };
    let mut guard_task = tokio::spawn(stage.run(batch_rx));
    let watchdog = tokio::spawn(watch_blocked_partitions(
        progress.clone(),
        health.clone(),
        config.pipeline.stall_timeout,
    ));

    let max = config.pipeline.batch_max_events.get();
    let mut messages: Vec<BorrowedMessage<'_>> = Vec::with_capacity(max);
    loop {
        store_commits(&consumer, &progress);
        summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .maybe_log();
        if health.stopped_reason().is_some() {
            idle_until_shutdown(&consumer, &progress, &mut shutdown).await;
            break;
        }
        if messages.is_empty() {
            let first = tokio::select! {
                // Shutdown first: once asked to stop, take no new work.
                biased;
                _ = shutdown.wait() => break,
                _ = progress.committable() => continue,
                m = consumer.recv() => m,
            };
            match first {
                Ok(m) => messages.push(m),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error; continuing");
                    continue;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + config.pipeline.batch_linger;
        while messages.len() < max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => messages.push(m),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error; continuing");
                    break;
                }
                Err(_) => break,
            }
        }
        let mut batch = Batch::decode(&messages, &config);
        messages.clear();
        // Hand the batch over. Its records are marked begun only at hand-over,
        // so a revoke that happens while we wait never waits for a batch this
        // very loop is holding.
        let permit = match batch_tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => break, // shutdown while Redis was failing
            Err(mpsc::error::TrySendError::Full(())) => {
                match wait_for_guard_stage(
                    &consumer,
                    &batch_tx,
                    &progress,
                    &mut shutdown,
                    &mut messages,
                )
                .await
                {
                    Some(permit) => permit,
                    None => break,
                }
            }
        };
        // Records of partitions revoked meanwhile belong to their new owner.
        batch.retain_partitions(|tp| progress.is_assigned(tp));
        if batch.is_empty() {
            continue;
        }
        count_invalid(&batch, &summary);
        progress.begin(batch.positions().map(|(tp, o)| (tp.clone(), o)));
        metrics::set_in_flight_events(progress.in_flight());
        permit.send(batch);
    }

    tracing::info!(
        in_flight = progress.in_flight(),
        drain_timeout = ?config.shutdown_drain_timeout,
        "shutting down: finishing in-flight batches, then committing"
    );
    drop(batch_tx);
    watchdog.abort();
    if tokio::time::timeout(config.shutdown_drain_timeout, &mut guard_task)
        .await
        .is_err()
    {
        tracing::warn!("in-flight batches did not finish within shutdown.drain_timeout; their offsets stay uncommitted");
        guard_task.abort();
    }
    store_commits(&consumer, &progress);
    // What did not finish now never will: revoke callbacks must not wait for it.
    progress.close();
    summary.lock().unwrap_or_else(|e| e.into_inner()).log();
    kafka::commit_stored(&consumer);
    consumer.unsubscribe();
    close_consumer(consumer).await;
    tracing::info!("stopped");
    Ok(())
}

/// Waits for room in the guard stage's queue. Usually that takes one Redis
/// round trip; if Redis is slower than Kafka for longer than `PAUSE_AFTER`,
/// fetching is paused (instead of buffering) while the loop keeps polling, so
/// the group session and rebalances stay served. Records that arrive anyway
/// (prefetched before the pause) go to `messages` and start the next batch.
/// Returns None on shutdown.
async fn wait_for_guard_stage<'c, 'a>(
    consumer: &'c StreamConsumer<IdemContext>,
    batch_tx: &'a mpsc::Sender<Batch>,
    progress: &Progress,
    shutdown: &mut Shutdown,
    messages: &mut Vec<BorrowedMessage<'c>>,
) -> Option<mpsc::Permit<'a, Batch>> {
    tokio::select! {
        biased;
        _ = shutdown.wait() => return None,
        permit = batch_tx.reserve() => return permit.ok(),
        _ = tokio::time::sleep(PAUSE_AFTER) => {}
    }
    let mut paused = pause_assignment(consumer);
    let permit = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break None,
            permit = batch_tx.reserve() => break permit.ok(),
            _ = progress.committable() => store_commits(consumer, progress),
            m = consumer.recv() => match m {
                Ok(m) => {
                    messages.push(m);
                    // A partition assigned during the pause fetches: pause it too.
                    paused = pause_assignment(consumer);
                }
                Err(e) => tracing::warn!(error = %e, "kafka consumer error; continuing"),
            },
        }
    };
    resume(consumer, paused);
    permit
}

/// Consumption was stopped (dead-letter budget): fetch nothing more, but keep
/// polling so that rebalances are served and the group sees a live member
/// that holds no work, and keep committing what finishes.
async fn idle_until_shutdown(
    consumer: &StreamConsumer<IdemContext>,
    progress: &Progress,
    shutdown: &mut Shutdown,
) {
    let paused = pause_assignment(consumer);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = progress.committable() => store_commits(consumer, progress),
            // Records prefetched before the pause are dropped unprocessed: they
            // were never marked begun, so their offsets are never committed.
            _ = consumer.recv() => {}
        }
    }
    resume(consumer, paused);
}

/// How long the fetch loop waits for the guard stage before pausing fetches.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Pauses fetching for every assigned partition; returns what was paused.
fn pause_assignment(consumer: &StreamConsumer<IdemContext>) -> Option<rdkafka::TopicPartitionList> {
    let assignment = consumer.assignment().ok()?;
    match consumer.pause(&assignment) {
        Ok(()) => {
            metrics::set_paused(true);
            tracing::debug!(
                partitions = assignment.count(),
                "fetching paused: Redis is behind"
            );
            Some(assignment)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not pause fetching");
            None
        }
    }
}

fn resume(consumer: &StreamConsumer<IdemContext>, paused: Option<rdkafka::TopicPartitionList>) {
    let Some(paused) = paused else { return };
    // Partitions revoked meanwhile cannot be resumed; the rest can.
    let owned = consumer.assignment().unwrap_or_default();
    let mut resume = rdkafka::TopicPartitionList::new();
    for e in paused.elements() {
        if owned.find_partition(e.topic(), e.partition()).is_some() {
            resume.add_partition(e.topic(), e.partition());
        }
    }
    if let Err(e) = consumer.resume(&resume) {
        tracing::warn!(error = %e, "could not resume fetching");
    }
    metrics::set_paused(false);
}

fn count_invalid(batch: &Batch, summary: &std::sync::Mutex<Summary>) {
    for it in &batch.items {
        if let Err(invalid) = &it.decoded {
            let tp = &batch.partitions[it.partition];
            tracing::warn!(
                topic = %tp.topic,
                partition = tp.partition,
                offset = it.offset,
                reason = invalid.code(),
                error = %invalid,
                "invalid record skipped"
            );
            metrics::record_outcome(&tp.topic, Outcome::Invalid, 1);
            summary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(Outcome::Invalid, 1);
        }
    }
}

/// Stores each owned partition's new commit point for librdkafka's next commit.
fn store_commits(consumer: &StreamConsumer<IdemContext>, progress: &Progress) {
    for (tp, next) in progress.take_owned_commits() {
        if kafka::store_offset(consumer, &tp, next) {
            progress.note_stored(&tp, next);
        }
    }
}

/// Every second: which partitions are blocked (records in flight, no
/// progress for `stall`)? Sets `idem_partition_blocked` and `/readyz`, and
/// logs when a partition becomes blocked and when it moves again.
async fn watch_blocked_partitions(progress: Arc<Progress>, health: Health, stall: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported: std::collections::BTreeMap<crate::offsets::TopicPartition, &'static str> =
        Default::default();
    loop {
        tick.tick().await;
        let cause = health.waiting_on().unwrap_or("slow");
        let blocked = progress.blocked(stall);
        for (tp, was) in std::mem::take(&mut reported) {
            if !blocked.iter().any(|(b, _)| *b == tp) {
                metrics::set_partition_blocked(&tp.topic, tp.partition, was, false);
                tracing::info!(topic = %tp.topic, partition = tp.partition, "partition moves again");
            } else {
                reported.insert(tp, was);
            }
        }
        for (tp, idle) in &blocked {
            let previous = reported.insert(tp.clone(), cause);
            if previous != Some(cause) {
                if let Some(old) = previous {
                    metrics::set_partition_blocked(&tp.topic, tp.partition, old, false);
                }
                metrics::set_partition_blocked(&tp.topic, tp.partition, cause, true);
                tracing::error!(
                    topic = %tp.topic,
                    partition = tp.partition,
                    cause,
                    idle = ?idle,
                    "partition blocked: records in flight and no progress for longer than pipeline.stall_timeout; nothing past them is committed until the cause is fixed"
                );
            }
        }
        health.set_blocked((!blocked.is_empty()).then(|| {
            let names: Vec<String> = blocked
                .iter()
                .map(|(tp, idle)| format!("{}/{} ({}s)", tp.topic, tp.partition, idle.as_secs()))
                .collect();
            format!(
                "{} partition(s) blocked by {cause}, no progress for longer than pipeline.stall_timeout: {}",
                blocked.len(),
                names.join(", ")
            )
        }));
    }
}

/// Connects to Redis, retrying with backoff until it answers or shutdown
/// fires (`None`). Refused credentials end the start with an error: retrying
/// cannot fix them.
async fn connect_redis(
    config: &Config,
    shutdown: &mut Shutdown,
) -> anyhow::Result<Option<crate::store::RedisConn>> {
    let mut backoff = Backoff::new(config);
    loop {
        match store::connect(&config.redis).await {
            Ok(conn) => return Ok(Some(conn)),
            Err(e) if e.is_auth_refusal() => {
                return Err(store::explain_connect_error(&config.redis, &e))
            }
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
                    _ = shutdown.wait() => return Ok(None),
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

pub(crate) fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Capped exponential backoff.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &Config) -> Self {
        Backoff {
            next: config.pipeline.retry_initial_backoff,
            max: config.pipeline.retry_max_backoff,
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// A periodic one-line summary of outcomes for the log.
pub(crate) struct Summary {
    counts: [u64; 5],
    last_log: Instant,
}

impl Summary {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Summary {
            counts: [0; 5],
            last_log: Instant::now(),
        }
    }

    pub(crate) fn add(&mut self, outcome: Outcome, n: u64) {
        self.counts[outcome as usize] += n;
    }

    pub(crate) fn maybe_log(&mut self) {
        if self.last_log.elapsed() >= Self::EVERY {
            self.log();
        }
    }

    pub(crate) fn log(&mut self) {
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
