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
mod blocked;
mod consumer;
mod event_loop;
mod progress;
mod recovery;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::guard::Guard;
use crate::kafka;
use crate::metrics::{self, Health};
use crate::model::Outcome;
use crate::store::{self, KeyLayout};
use apply::GuardStage;
use batch::Batch;
use consumer::{Consumer, Forwarder, KafkaEvent, PollThread};
use event_loop::{EventLoop, LoopEnd, RedisSide};
pub use progress::Progress;
use recovery::RedisProgress;
use store::progress::ProgressStore;

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

/// Why `idem run` could not start (or, for the metrics endpoint, keep
/// serving). Each says what to fix; none is retried: retryable faults
/// (Redis or Kafka unreachable, timeouts) are retried inside the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Preflight(#[from] kafka::PreflightError),
    #[error(transparent)]
    RedisRefused(#[from] store::ConnectError),
    #[error(transparent)]
    RedisUnfit(#[from] store::CheckError),
    /// Creating the consumer or producer, or subscribing, failed.
    #[error("Kafka client")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    #[error("cannot start the consumer thread")]
    Thread(#[source] std::io::Error),
    /// The task that ran the broker check ended without an answer.
    #[error("the start-up check of the brokers did not finish")]
    PreflightTask(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Snippet(#[from] crate::guard::SnippetError),
    /// Redis lost effects that the log no longer holds.
    #[error(transparent)]
    Unrecoverable(#[from] recovery::Unrecoverable),
}

/// Runs idem until `shutdown` fires: serves metrics, consumes the configured
/// topics and applies them to Redis. Returns after the final commit.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    log_effective_config(&config);
    let handle = metrics::install(&config.kafka.group_id, &config.redis.key_prefix)?;
    let health = Health::default();
    metrics::serve(config.metrics_listen, handle, health.clone()).await?;
    for topic in &config.kafka.topics {
        metrics::init_topic(topic);
    }
    run_pipeline(Arc::new(config), health, shutdown).await
}

/// The settings an operator checks first, secrets redacted, and the
/// warnings about settings that are valid but probably not meant.
fn log_effective_config(config: &Config) {
    tracing::info!(
        brokers = %config.kafka.brokers,
        group = %config.kafka.group_id,
        topics = %config.kafka.topics.join(","),
        windows = %config.effective_windows(),
        redis = %crate::config::redact_url(&config.redis.url),
        redis_mode = ?config.redis.mode,
        key_prefix = %config.redis.key_prefix,
        durability = ?config.redis.durability,
        dead_letter_topic = %config.dlq.topic,
        metrics = %config.metrics_listen,
        "effective configuration (`idem config show` lists every key and where it was set)"
    );
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
}

/// How long start-up waits for the brokers to answer before it goes on
/// without them (they are retried) — a refused login fails at once.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

async fn run_pipeline(
    config: Arc<Config>,
    health: Health,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let kafka_config = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka::preflight(&kafka_config, PREFLIGHT_TIMEOUT))
        .await??;
    // In the background: with the brokers down it waits for its timeout,
    // and consumption need not wait for a warning.
    tokio::spawn({
        let config = config.clone();
        async move { crate::dlq::check_topics(&config).await }
    });
    let mut backoff = Backoff::new(&config);
    loop {
        let Some((guard, redis)) = start_guard(&config, &mut shutdown).await? else {
            return Ok(());
        };
        health.set_redis_ok(true);
        match run_consumer(&config, &health, &mut shutdown, guard, redis).await? {
            LoopEnd::Shutdown => return Ok(()),
            LoopEnd::Unrecoverable(e) => return Err(e.into()),
            LoopEnd::Restart(why) => {
                let wait = backoff.next();
                tracing::warn!(reason = %why, restart_in = ?wait, "consumption restarts: Redis's progress is read again and every partition resumes from what Redis holds");
                tokio::select! {
                    _ = shutdown.wait() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One consumer's life: joins the group, applies batches until shutdown,
/// a restart or an unrecoverable loss, then commits what is done and leaves.
async fn run_consumer(
    config: &Arc<Config>,
    health: &Health,
    shutdown: &mut Shutdown,
    guard: Guard,
    redis: RedisSide,
) -> Result<LoopEnd, RunError> {
    let (consumer, poller, events, notes) = start_consumer(config, &redis.epoch)?;

    // The guard stage, its own task: applies batches in order. The channel
    // holds one batch while another is applied, so fetching and decoding
    // overlap the Redis round trip, and at most two batches are in flight.
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let (finished_tx, finished) = mpsc::unbounded_channel();
    let (restart_trigger, mut restart) = Shutdown::new();
    let stage = GuardStage {
        config: config.clone(),
        guard,
        health: health.clone(),
        shutdown: shutdown.clone(),
        summary: Summary::new(),
        dlq: crate::dlq::DlqWriter::new(config)?,
        budget: crate::dlq::budget::DlqBudget::new(config.dlq.ratio_window, config.dlq.max_ratio),
        finished: finished_tx,
        progress: RedisProgress::new(redis.store.clone(), redis.epoch.clone()),
        restart: restart_trigger,
    };
    let guard_task = tokio::spawn(stage.run(batch_rx));
    let mut event_loop = EventLoop::new(
        config.clone(),
        consumer,
        health.clone(),
        events,
        notes,
        finished,
        redis,
    );
    let end = event_loop.run(&batch_tx, shutdown, &mut restart).await;

    shut_down(config, event_loop, guard_task, batch_tx, poller).await;
    Ok(end)
}

/// The consumer and its polling thread, subscribed; the channels on which
/// records, rebalances (`events`), commits and statistics (`notes`) arrive.
type ConsumerParts = (
    Arc<Consumer>,
    PollThread,
    mpsc::Receiver<KafkaEvent>,
    mpsc::UnboundedReceiver<consumer::KafkaNote>,
);

/// Creates the consumer, subscribes it and starts its polling thread.
fn start_consumer(config: &Config, epoch: &str) -> Result<ConsumerParts, RunError> {
    // The consumer thread reports in order; at most this many records wait
    // in the channel (the loop also holds up to one batch of its own).
    let (event_tx, events) =
        mpsc::channel::<KafkaEvent>(config.pipeline.batch_max_events.get().max(64));
    let (note_tx, notes) = mpsc::unbounded_channel();
    let consumer: Arc<Consumer> = Arc::new(
        kafka::consumer_config(&config.kafka).create_with_context(Forwarder::new(
            event_tx.clone(),
            note_tx,
            config.kafka.revoke_timeout,
            crate::resume::commit_metadata(epoch),
        ))?,
    );
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let poller = PollThread::spawn(consumer.clone(), event_tx).map_err(RunError::Thread)?;
    tracing::info!(
        group = %config.kafka.group_id,
        topics = ?config.kafka.topics,
        brokers = %config.kafka.brokers,
        "consuming"
    );
    Ok((consumer, poller, events, notes))
}

/// Finishes in-flight batches (bounded by shutdown.drain_timeout), commits
/// what is done and leaves the group.
async fn shut_down(
    config: &Config,
    mut event_loop: EventLoop,
    mut guard_task: tokio::task::JoinHandle<()>,
    batch_tx: mpsc::Sender<Batch>,
    poller: PollThread,
) {
    tracing::info!(
        in_flight = event_loop.in_flight(),
        drain_timeout = ?config.shutdown_drain_timeout,
        "shutting down: finishing in-flight batches, then committing"
    );
    drop(batch_tx);
    if tokio::time::timeout(config.shutdown_drain_timeout, &mut guard_task)
        .await
        .is_err()
    {
        tracing::warn!("in-flight batches did not finish within shutdown.drain_timeout; their offsets stay uncommitted");
        guard_task.abort();
    }
    event_loop.finish();
    let (consumer, events) = event_loop.into_parts();
    // A revoke from here on finds the loop gone and commits nothing more:
    // the final commit below is the last word.
    drop(events);
    let closing = tokio::task::spawn_blocking(move || {
        kafka::commit_stored(&*consumer);
        poller.stop();
        consumer.unsubscribe();
        consumer
    });
    match tokio::time::timeout(Duration::from_secs(30), closing).await {
        Ok(Ok(consumer)) => close_consumer(consumer).await,
        _ => tracing::warn!("the final commit did not finish within 30s; exiting anyway (the guard makes this safe)"),
    }
    tracing::info!("stopped");
}

/// Connects to Redis (retrying until it answers), checks that it keeps
/// idem's keys and gives the configured durability, settles the epoch
/// marker and loads the guard script. `None` if shutdown fired first.
async fn start_guard(
    config: &Config,
    shutdown: &mut Shutdown,
) -> Result<Option<(Guard, RedisSide)>, RunError> {
    let Some(mut conn) = connect_redis(config, shutdown).await? else {
        return Ok(None);
    };
    store::check_version(&mut conn).await?;
    store::check_eviction_policy(&mut conn, config.redis.allow_eviction).await?;
    let wait = store::durable_wait(&mut conn, config.redis.durability).await?;
    match store::persistence(&mut conn).await {
        Ok(nodes) => nodes
            .iter()
            .filter_map(|p| p.warning(config.redis.durability))
            .for_each(|w| tracing::warn!("{w}")),
        Err(e) => tracing::debug!(error = %e, "could not read Redis's persistence settings"),
    }
    let layout = KeyLayout::new(&config.redis.key_prefix);
    let mut store = ProgressStore::new(conn.clone(), layout.clone());
    let Some(epoch) = establish_epoch(config, &mut store, shutdown).await else {
        return Ok(None);
    };
    crate::guard::check_snippets(&mut conn, &config.effects.snippets).await?;
    let mut guard = Guard::new(
        conn,
        layout,
        config.pipeline.events_per_script.get(),
        epoch.clone(),
    )
    .with_snippets(&config.effects.snippets)
    // Half the response timeout, so a slow WAIT reports itself before the client gives up.
    .with_durable_wait(wait, config.redis.response_timeout / 2);
    match guard.load_script().await {
        // Each snippet compiled alone, yet the script with them does not.
        Err(e) if e.to_string().contains("compiling") => {
            return Err(RunError::Snippet(crate::guard::SnippetError {
                file: "guard.lua with the custom effects".into(),
                message: e.to_string(),
            }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not load the guard script now; it is loaded on first use")
        }
        Ok(()) => {}
    }
    Ok(Some((guard, RedisSide { store, epoch })))
}

/// The epoch every marker agrees on (renewed where one is missing),
/// retrying until Redis answers; `None` if shutdown fired first.
async fn establish_epoch(
    config: &Config,
    store: &mut ProgressStore,
    shutdown: &mut Shutdown,
) -> Option<String> {
    let mut backoff = Backoff::new(config);
    loop {
        match store.establish_epoch().await {
            Ok(epoch) => {
                tracing::info!(epoch = %epoch, "Redis epoch marker");
                return Some(epoch);
            }
            Err(e) => {
                let wait = backoff.next();
                metrics::record_retry(e.cause());
                tracing::warn!(error = %e, retry_in = ?wait, "cannot read or set Redis's epoch marker");
                tokio::select! {
                    _ = shutdown.wait() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Connects to Redis, retrying with backoff until it answers or shutdown
/// fires (`None`). Refused credentials end the start with an error: retrying
/// cannot fix them.
async fn connect_redis(
    config: &Config,
    shutdown: &mut Shutdown,
) -> Result<Option<crate::store::RedisConn>, RunError> {
    let mut backoff = Backoff::new(config);
    loop {
        match store::connect(&config.redis).await {
            Ok(conn) => return Ok(Some(conn)),
            Err(e) if e.is_auth_refusal() => {
                return Err(store::explain_connect_error(&config.redis, e).into())
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
async fn close_consumer(consumer: Arc<Consumer>) {
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

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_millis() -> i64 {
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
    counts: [u64; Outcome::ALL.len()],
    last_log: Instant,
}

impl Summary {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Summary {
            counts: [0; Outcome::ALL.len()],
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
        let [applied, duplicate, stale, conflict, invalid, late] = self.counts;
        tracing::info!(
            applied,
            duplicate,
            stale,
            conflict,
            invalid,
            late,
            "outcomes since start"
        );
        self.last_log = Instant::now();
    }
}
