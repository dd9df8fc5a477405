//! The data path around the guard: the consumer thread fetches, the event
//! loop batches and commits, the guard stage applies batches to Redis.
//! The guarantee they keep together, commit after effect, is stated once in
//! docs/guarantees.md; each part's doc says its share.
//!
//! Layout: `consumer` (librdkafka's callbacks as messages) → `event_loop`
//! (the one owner of progress, driven by messages only) → `queue` (batches
//! and ownership changes, in order: `link`) → `guard_stage` (Redis, dead letters,
//! progress records); `startup` connects and checks
//! Redis, `recovery` reads and keeps Redis's progress records, `shutdown`
//! is the one cancellation signal.

mod batch;
mod blocked;
mod consumer;
mod event_loop;
mod guard_stage;
mod link;
mod owned;
mod recovery;
mod runs;
mod shutdown;
mod startup;
mod summary;
#[cfg(test)]
mod test_proxy;
mod timing;
mod verdicts;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::guard::Guard;
use crate::kafka;
use crate::metrics::{self, Health};
use consumer::{Consumer, Forwarder, KafkaEvent, PollThread};
use event_loop::{EventLoop, LoopEnd, RedisSide, StageLink};
use guard_stage::GuardStage;
pub use owned::OwnedPartitions;
pub use recovery::judged_start;
use recovery::ProgressRecords;
pub use shutdown::{Shutdown, ShutdownTrigger};
use startup::start_guard;
pub use startup::RunError;
pub use timing::unix_millis;
use timing::Backoff;

/// What `idem run` is told beyond the configuration: one-off decisions of
/// the operator, not settings of the deployment.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// An ambiguous start (docs/runbook.md) takes the group's commits as they are.
    pub accept_commits: bool,
}

/// Runs idem until `shutdown` fires: serves metrics, consumes the configured
/// topics and applies them to Redis. Returns after the final commit.
pub async fn run(config: Config, options: RunOptions, shutdown: Shutdown) -> Result<(), RunError> {
    let refusals = config.refusals();
    if !refusals.is_empty() {
        return Err(RunError::Config(refusals.join("\n")));
    }
    log_effective_config(&config);
    let handle = metrics::install(&config.kafka.group_id, &config.redis.key_prefix)?;
    let health = Health::default();
    metrics::serve(config.metrics.listen, handle, health.clone()).await?;
    for topic in &config.kafka.topics {
        metrics::init_topic(topic);
    }
    let config = Arc::new(config);
    let relay = (!config.changelog.topics.is_empty()).then(|| {
        let mut stop = shutdown.clone();
        tokio::spawn(crate::relay::run(config.clone(), async move {
            stop.wait().await
        }))
    });
    let members = {
        let mut stop = shutdown.clone();
        tokio::spawn(crate::relay::members::watch(
            config.clone(),
            health.clone(),
            async move { stop.wait().await },
        ))
    };
    let result = run_pipeline(config, options, health, shutdown).await;
    // It stops with the same signal, and removes its registration.
    let _ = tokio::time::timeout(Duration::from_secs(2), members).await;
    if let Some(relay) = relay {
        // It stops with the same signal; a clean stop hands its lease over.
        let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
    }
    result
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
        redis_mode = %config.redis.mode,
        key_prefix = %config.redis.key_prefix,
        durability = %config.redis.durability,
        dead_letter_topics = %config
            .kafka
            .topics
            .iter()
            .map(|t| format!("{t}={}", config.dlq.topic_for(t)))
            .collect::<Vec<_>>()
            .join(","),
        effects = %match config.effects.describe() {
            rules if rules.is_empty() => "none (every event merges its data)".to_string(),
            rules => rules.join("; "),
        },
        metrics = %config.metrics.listen,
        "effective configuration (`idem config show` lists every key and where it was set)"
    );
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(changelog) = config.changelog.describe(&config.kafka.group_id) {
        tracing::info!("{changelog}");
    }
}

/// How long start-up waits for the brokers to answer before it goes on
/// without them (they are retried) — a refused login fails at once.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

async fn run_pipeline(
    config: Arc<Config>,
    options: RunOptions,
    health: Health,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let kafka_config = config.kafka.clone();
    let reach =
        tokio::task::spawn_blocking(move || kafka::preflight(&kafka_config, PREFLIGHT_TIMEOUT))
            .await??;
    health.set_kafka_unreachable(kafka::unreachable_reason(&config.kafka, &reach));
    tokio::spawn(watch_missing_topics(config.clone(), health.clone(), reach));
    // In the background: with the brokers down it waits for its timeout,
    // and consumption need not wait for a warning.
    tokio::spawn({
        let config = config.clone();
        async move { crate::dlq::check_topics(&config).await }
    });
    let mut backoff = Backoff::new(&config);
    let accept_commits = Arc::new(std::sync::atomic::AtomicBool::new(options.accept_commits));
    if options.accept_commits {
        tracing::warn!("--accept-commits: the first assignment takes commits idem did not write as they are, even over a Redis that holds nothing of idem's; remove the flag (IDEM_ACCEPT_COMMITS) once idem started");
    }
    // A stop of consumption (the dead-letter budget) outlives a restart of
    // consumption: only a restart of idem lifts it. Held here, between rounds.
    let mut stopped: Option<String> = None;
    loop {
        let Some((guard, mut redis)) = start_guard(&config, &health, &mut shutdown).await? else {
            return Ok(());
        };
        redis.accept_commits = accept_commits.clone();
        health.set_redis_ok();
        let started = std::time::Instant::now();
        let round = Round {
            guard,
            redis,
            stopped: &mut stopped,
        };
        match run_consumer(&config, &health, &mut shutdown, round).await? {
            LoopEnd::Shutdown => return Ok(()),
            LoopEnd::Unrecoverable(e) => return Err(e.into()),
            LoopEnd::Restart(why) => {
                backoff.after_run(started.elapsed());
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

/// Names on `/readyz` the consumed topics the brokers do not know, asking
/// again every few seconds until each exists (librdkafka picks a new topic
/// up on its own); from what the start-up probe saw.
async fn watch_missing_topics(config: Arc<Config>, health: Health, mut reach: kafka::Reach) {
    loop {
        let missing = kafka::missing_topics(&config.kafka.topics, &reach);
        if missing.as_ref().is_some_and(Vec::is_empty) {
            health.set_topics_missing(None);
            return;
        }
        if let Some(missing) = missing {
            health.set_topics_missing(Some(format!(
                "topic {} does not exist (kafka.topics): create it, e.g. idem topics apply --dir topics",
                missing.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let kafka_config = config.kafka.clone();
        reach = match tokio::task::spawn_blocking(move || {
            kafka::probe(&kafka_config, None, Duration::from_secs(5))
        })
        .await
        {
            Ok(Ok(reach)) => reach,
            _ => kafka::Reach::NotYet("the probe did not finish".into()),
        };
    }
}

/// What one round of consumption starts with.
struct Round<'a> {
    guard: Guard,
    redis: RedisSide,
    /// Why consumption was stopped in an earlier round, if it was; the
    /// round leaves here what the next one starts with.
    stopped: &'a mut Option<String>,
}

/// One consumer's life: joins the group, applies batches until shutdown,
/// a restart or an unrecoverable loss, then commits what is done and leaves.
async fn run_consumer(
    config: &Arc<Config>,
    health: &Health,
    shutdown: &mut Shutdown,
    round: Round<'_>,
) -> Result<LoopEnd, RunError> {
    let Round {
        guard,
        redis,
        stopped,
    } = round;
    let (consumer, poller, events, notes) = start_consumer(config, &redis.epoch)?;

    // The guard stage, its own task: applies batches in order. The queue
    // holds one batch while another is applied, so fetching and decoding
    // overlap the Redis round trip, and at most two batches are in flight.
    let (queue, queued) = link::stage_queue(1);
    let (stage_tx, stage_events) = mpsc::unbounded_channel();
    let progress = ProgressRecords::new(redis.store.clone(), redis.epoch.clone());
    let stage = GuardStage::new(config, guard, progress, health, shutdown, stage_tx)?
        .already_stopped(stopped.is_some());
    let guard_task = tokio::spawn(stage.run(queued));
    let mut event_loop = EventLoop::new(
        config.clone(),
        consumer,
        health.clone(),
        events,
        notes,
        StageLink {
            events: stage_events,
            queue,
        },
        redis,
    )
    .stopped_before(stopped.clone());
    let end = event_loop.run(shutdown).await;
    *stopped = event_loop.stopped();

    shut_down(config, event_loop, guard_task, poller).await;
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
            config.kafka.auto_offset_reset,
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
    poller: PollThread,
) {
    tracing::info!(
        in_flight = event_loop.in_flight(),
        drain_timeout = ?config.shutdown.drain_timeout,
        "shutting down: finishing in-flight batches, then committing"
    );
    // The stage ends once it has applied what is queued.
    event_loop.close_queue();
    if tokio::time::timeout(config.shutdown.drain_timeout, &mut guard_task)
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
