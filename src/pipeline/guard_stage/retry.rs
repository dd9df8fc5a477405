//! The stage's one retry: a write ([`Write`]: the guard's script, the dead
//! letters, the progress record) is tried until it is done, shutdown fires,
//! or Redis's state changed; how each ends is a [`Stop`], never a flag.
//! The stage's parts are split in two so a write can borrow what it writes
//! with ([`Io`]) while the retry answers to the rest ([`Control`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::Config;
use crate::dlq::{DeadLetter, DlqWriter, SendError};
use crate::guard::{Guard, GuardInput, Verdict};
use crate::metrics::{self, Health};
use crate::offsets::TopicPartition;
use crate::pipeline::link::StageEvent;
use crate::pipeline::recovery::{Change, ProgressRecords, StateChanged};
use crate::pipeline::shutdown::Shutdown;
use crate::pipeline::timing::Backoff;
use crate::store::progress::Claim;
use crate::store::StoreError;

/// What the stage writes with: Redis (the guard, the progress records)
/// and Kafka (the dead letters).
pub(super) struct Io {
    pub guard: Guard,
    pub progress: ProgressRecords,
    pub dlq: DlqWriter,
}

/// What the stage answers to: its settings, `/readyz`, shutdown, the loop.
pub(super) struct Control {
    pub config: Arc<Config>,
    pub health: Health,
    pub shutdown: Shutdown,
    pub events: mpsc::UnboundedSender<StageEvent>,
}

/// Consecutive failures after which the Redis connection is replaced.
const RECONNECT_AFTER: u32 = 3;

/// Why the stage stops work on a batch, which then stays unfinished
/// (nothing of it is committed). Whatever the loop must know of it was
/// sent already, as a [`StageEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Shutdown fired while a write waited to be tried again.
    Shutdown,
    /// Redis lost or rolled back its state: [`StageEvent::Restart`] was sent.
    StateChanged,
    /// A partition's log was replaced: [`StageEvent::LogReplaced`] was sent.
    LogReplaced,
}

/// Why one attempt failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// Redis did not answer, or refused (a refusal that says its state
    /// changed ends the retry).
    Redis(StoreError),
    /// Kafka did not acknowledge the dead letters.
    Kafka(SendError),
    /// The progress check found Redis's state changed.
    StateChanged(StateChanged),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Redis(e)
    }
}

/// A write the stage tries until it is done.
pub(super) trait Write {
    type Done;
    /// What `/readyz` says the stage waits on while it retries.
    const WAITING_ON: &'static str;
    async fn attempt(&mut self, io: &mut Io) -> Result<Self::Done, Failure>;
    /// After it was done, `took` being the successful attempt's time.
    fn done(&self, _ctl: &Control, _took: Duration) {}
    /// The warning for a failed attempt.
    fn warn(&self, failure: &Failure, retry_in: Duration);
}

/// Tries `write` until it is done. Between attempts: backoff, and a new
/// Redis connection every [`RECONNECT_AFTER`] Redis failures.
pub(super) async fn retry<W: Write>(
    io: &mut Io,
    ctl: &mut Control,
    mut write: W,
) -> Result<W::Done, Stop> {
    let mut backoff = Backoff::new(&ctl.config);
    let mut redis_failures = 0u32;
    let mut failed = false;
    loop {
        let started = Instant::now();
        let failure = match write.attempt(io).await {
            Ok(done) => {
                if failed {
                    let _ = ctl.events.send(StageEvent::Retrying(None));
                }
                write.done(ctl, started.elapsed());
                return Ok(done);
            }
            Err(failure) => failure,
        };
        match &failure {
            Failure::StateChanged(changed) => {
                return Err(restart_for(io, ctl, changed.clone()).await)
            }
            Failure::Redis(e) => {
                if let Some(changed) = StateChanged::from_refusal(e) {
                    return Err(restart_for(io, ctl, changed).await);
                }
                metrics::record_retry(e.cause());
                redis_failures += 1;
                io.redis_failed(ctl, e, redis_failures).await;
            }
            Failure::Kafka(_) => metrics::record_retry("dead_letter"),
        }
        if !failed {
            // The loop names it as the cause of a partition blocked meanwhile.
            failed = true;
            let _ = ctl.events.send(StageEvent::Retrying(Some(W::WAITING_ON)));
        }
        let wait = backoff.next();
        write.warn(&failure, wait);
        tokio::select! {
            _ = ctl.shutdown.wait() => return Err(Stop::Shutdown),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Logs and counts a change of Redis's state and tells the loop to
/// restart consumption from what Redis holds.
pub(super) async fn restart_for(io: &mut Io, ctl: &Control, changed: StateChanged) -> Stop {
    if changed.cause == Change::RolledBack {
        io.progress.renew_epoch().await;
    }
    metrics::record_redis_state_change(changed.cause.as_str());
    tracing::error!(
        cause = changed.cause.as_str(),
        detail = %changed.detail,
        "Redis lost or rolled back its state: nothing more is written; consumption restarts from the offsets Redis's state reflects"
    );
    let _ = ctl.events.send(StageEvent::Restart(changed));
    Stop::StateChanged
}

impl Io {
    /// After the `failures`th Redis failure in a row: the progress records
    /// are suspect, `/readyz` names the failure, and every
    /// [`RECONNECT_AFTER`] failures the connection is replaced.
    pub(super) async fn redis_failed(&mut self, ctl: &Control, e: &StoreError, failures: u32) {
        self.progress.suspect();
        ctl.health
            .set_redis_failing(&ctl.config.redis.url, e, e.is_auth_refusal());
        if failures % RECONNECT_AFTER == 0 {
            self.reconnect(&ctl.config, failures).await;
        }
    }

    /// After repeated failures, a fresh connection for the guard and the
    /// progress records: it can recover where a long-lived client stays
    /// stuck (a failover that moved the address, a cluster topology change).
    pub(super) async fn reconnect(&mut self, config: &Config, failures: u32) {
        match crate::store::connect(&config.redis).await {
            Ok(conn) => {
                tracing::warn!(failures, "redis keeps failing: replaced the connection");
                self.progress.replace_connection(conn.clone());
                self.guard.replace_connection(conn);
            }
            Err(e) => tracing::warn!(error = %e, "redis reconnect failed"),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Redis(e) => e.fmt(f),
            Failure::Kafka(e) => e.fmt(f),
            Failure::StateChanged(c) => write!(f, "{}: {}", c.cause.as_str(), c.detail),
        }
    }
}

/// The progress check, then the guard's script for the batch's events.
pub(super) struct Guarding<'a, 'e>(pub &'a [GuardInput<'e>]);

impl Write for Guarding<'_, '_> {
    type Done = Vec<Verdict>;
    const WAITING_ON: &'static str = "redis";

    async fn attempt(&mut self, io: &mut Io) -> Result<Vec<Verdict>, Failure> {
        // The guard script checks the epoch marker alone, and a restored
        // snapshot keeps the marker: this check sees the records go back.
        if let Some(changed) = io.progress.check().await? {
            return Err(Failure::StateChanged(changed));
        }
        Ok(io.guard.apply(self.0).await?)
    }

    fn done(&self, ctl: &Control, took: Duration) {
        metrics::record_round_trip(took);
        ctl.health.set_redis_ok();
    }

    fn warn(&self, failure: &Failure, retry_in: Duration) {
        let retryable = matches!(failure, Failure::Redis(e) if e.is_retryable());
        tracing::warn!(
            error = %failure,
            retryable,
            events = self.0.len(),
            ?retry_in,
            "redis guard call failed; nothing past this batch is committed until it succeeds"
        );
    }
}

/// The batch's dead letters, until Kafka acknowledged every one; a letter
/// delivered by a failed attempt is not sent again.
pub(super) struct DeadLettering<'a, 'b> {
    letters: &'a [DeadLetter<'b>],
    delivered: Vec<bool>,
}

impl<'a, 'b> DeadLettering<'a, 'b> {
    pub(super) fn new(letters: &'a [DeadLetter<'b>]) -> Self {
        let delivered = vec![false; letters.len()];
        DeadLettering { letters, delivered }
    }
}

impl Write for DeadLettering<'_, '_> {
    type Done = ();
    const WAITING_ON: &'static str = "dead_letter";

    async fn attempt(&mut self, io: &mut Io) -> Result<(), Failure> {
        let sent = io.dlq.send_all(self.letters, &mut self.delivered).await;
        sent.map_err(Failure::Kafka)
    }

    fn done(&self, _ctl: &Control, _took: Duration) {
        for l in self.letters {
            metrics::record_dead_letter(&l.source.topic, l.reason.as_str());
        }
    }

    fn warn(&self, failure: &Failure, retry_in: Duration) {
        let hint = match failure {
            Failure::Kafka(e) => e.hint(),
            _ => "",
        };
        tracing::warn!(
            error = %failure,
            hint,
            records = self.letters.len(),
            dlq_topic = %self.letters[0].topic,
            ?retry_in,
            "cannot write to the dead-letter topic; the batch waits and nothing past it is committed"
        );
    }
}

/// The batch's progress record and its runs' claims. No progress check
/// first: the record's script checks the epoch and refuses a record below
/// idem's (`IDEMROLLBACK`) atomically with its write.
pub(super) struct Recording<'a> {
    pub ends: Vec<(TopicPartition, i64)>,
    pub claims: &'a [Claim],
}

impl Write for Recording<'_> {
    type Done = ();
    const WAITING_ON: &'static str = "redis";

    async fn attempt(&mut self, io: &mut Io) -> Result<(), Failure> {
        Ok(io.progress.record(&self.ends, self.claims).await?)
    }

    fn warn(&self, failure: &Failure, retry_in: Duration) {
        tracing::warn!(error = %failure, ?retry_in, "cannot record the batch's progress in Redis; the batch waits and nothing past it is committed");
    }
}
