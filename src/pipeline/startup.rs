//! Start-up of one consumption round: Redis connected (retrying until it
//! answers), checked for what idem needs, the epoch marker settled and the
//! guard script loaded; and the errors that end `idem run` before it starts.

use super::event_loop::RedisSide;
use super::recovery;
use super::shutdown::Shutdown;
use super::timing::Backoff;
use crate::config::Config;
use crate::guard::Guard;
use crate::kafka;
use crate::metrics;
use crate::store::{self, progress::ProgressStore, KeyLayout, StoreError};

/// Why `idem run` could not start (or, for the metrics endpoint, keep
/// serving). Each says what to fix; none is retried: retryable faults
/// (Redis or Kafka unreachable, timeouts) are retried inside the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting that would change what events do names a topic idem
    /// does not consume (`Config::refusals`).
    #[error("{0}")]
    Config(String),
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

/// Connects to Redis (retrying until it answers), checks that it keeps
/// idem's keys and gives the configured durability, settles the epoch
/// marker and loads the guard script. `None` if shutdown fired first.
pub async fn start_guard(
    config: &Config,
    health: &crate::metrics::Health,
    shutdown: &mut Shutdown,
) -> Result<Option<(Guard, RedisSide)>, RunError> {
    let Some((mut conn, wait)) = checked_redis(config, health, shutdown).await? else {
        return Ok(None);
    };
    match store::persistence(&mut conn).await {
        Ok(nodes) => nodes
            .iter()
            .filter_map(|p| p.warning(config.redis.durability))
            .for_each(|w| tracing::warn!("{w}")),
        Err(e) => tracing::debug!(error = %e, "could not read Redis's persistence settings"),
    }
    let layout = KeyLayout::new(&config.redis.key_prefix);
    // Who writes the prefix, for reconcile's extras (docs/redis-layout.md).
    if let Err(e) = redis::cmd("SADD")
        .arg(layout.writers_key())
        .arg(&config.kafka.topics)
        .query_async::<i64>(&mut conn)
        .await
    {
        tracing::warn!(error = %e, "could not record the consumed topics in Redis ({}); idem reconcile --delete-extra will not know them from there", layout.writers_key());
    }
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
        // Redis answered, refusing to compile: each snippet compiled alone,
        // yet the script with them does not.
        Err(StoreError::Redis(e))
            if !config.effects.snippets.is_empty() && crate::guard::is_compile_refusal(&e) =>
        {
            return Err(RunError::Snippet(crate::guard::SnippetError {
                file: "the guard script with the custom effects".into(),
                message: guard.locate(&e.to_string()),
            }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not load the guard script now; it is loaded on first use")
        }
        Ok(()) => {}
    }
    let group = config.kafka.group_id.clone();
    Ok(Some((
        guard,
        RedisSide {
            store,
            epoch,
            group,
            accept_commits: Default::default(),
        },
    )))
}

/// A connection to a Redis that passed idem's checks, and the durable wait
/// it gives, retrying while Redis does not answer (a timeout or a dropped
/// connection says nothing about its fitness; found from outside: a Redis
/// slow for a moment at a consumption restart ended `idem run`); `None` if
/// shutdown fired first. A Redis unfit for idem ends the start.
async fn checked_redis(
    config: &Config,
    health: &crate::metrics::Health,
    shutdown: &mut Shutdown,
) -> Result<Option<(crate::store::RedisConn, crate::store::DurableWait)>, RunError> {
    let mut backoff = Backoff::new(config);
    loop {
        let Some(mut conn) = connect_redis(config, health, shutdown).await? else {
            return Ok(None);
        };
        let checked = async {
            store::check_mode(&mut conn).await?;
            store::check_version(&mut conn).await?;
            store::check_eviction_policy(&mut conn, config.redis.allow_eviction).await?;
            store::durable_wait(&mut conn, config.redis.durability).await
        }
        .await;
        match checked {
            Ok(wait) => return Ok(Some((conn, wait))),
            Err(e) if e.is_retryable() => {
                health.set_redis_failing(&config.redis.url, &e, false);
                let wait = backoff.next();
                metrics::record_retry("redis_check");
                tracing::warn!(error = %e, retry_in = ?wait, "cannot check Redis now; trying again");
                tokio::select! {
                    _ = shutdown.wait() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
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
    health: &crate::metrics::Health,
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
                health.set_redis_failing(&config.redis.url, &e, false);
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

#[cfg(test)]
mod tests;
