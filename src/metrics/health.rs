//! Readiness as `/readyz` reports it, with the cause idem knows, and the
//! partitions this instance owns (for the per-partition series).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use super::exposition;
use crate::offsets::TopicPartition;

/// Readiness as seen by `/readyz`: joined the group (with or without
/// partitions: an idle standby is ready), Redis answers, consumption was not
/// stopped (dead-letter budget) and no partition is blocked
/// (`pipeline.stall_timeout`). Also which partitions this instance owns,
/// so `/metrics` exports per-partition series of those only.
#[derive(Debug, Default, Clone)]
pub struct Health {
    joined: Arc<AtomicBool>,
    owned: Arc<std::sync::RwLock<HashSet<TopicPartition>>>,
    redis_ok: Arc<AtomicBool>,
    stopped: Arc<std::sync::Mutex<Option<String>>>,
    blocked: Arc<std::sync::Mutex<Option<String>>>,
    /// Partitions re-read because Redis lost state, until they are back
    /// where Kafka's commit was.
    rewinding: Arc<std::sync::Mutex<Option<String>>>,
    /// Why Redis is not answering as idem needs (unreachable, refusing).
    redis_problem: Arc<std::sync::Mutex<Option<String>>>,
    /// Why the brokers were not reached at start; cleared by the join.
    kafka_unreachable: Arc<std::sync::Mutex<Option<String>>>,
    /// Consumed topics the brokers do not know, until they exist.
    topics_missing: Arc<std::sync::Mutex<Option<String>>>,
    /// Why the last consumer failed fatally; cleared by the next join.
    kafka_failed: Arc<std::sync::Mutex<Option<String>>>,
    /// Why the guard stage waits for the changelog's relay (an outbox at
    /// changelog.max_outbox).
    changelog_full: Arc<std::sync::Mutex<Option<String>>>,
    /// Changelog topics the brokers do not know (their changes wait in
    /// the outbox), until they exist.
    changelog_missing: Arc<std::sync::Mutex<Option<String>>>,
}

/// `/readyz`'s reason while nothing but the group's admission is missing.
pub const WAITING_TO_JOIN: &str = "waiting to join the consumer group";

impl Health {
    /// Stops consumption for good (until restart), with the reason `/readyz` shows.
    pub fn stop_consuming(&self, reason: String) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// Why consumption was stopped, if it was.
    pub fn stopped_reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets (or clears, with `None`) why partitions are blocked.
    pub fn set_blocked(&self, reason: Option<String>) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// Sets (or clears) which changelog topics do not exist.
    pub fn set_changelog_missing(&self, what: Option<String>) {
        *self
            .changelog_missing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = what;
    }

    /// Sets (or clears) why consumption waits for the changelog's relay.
    pub fn set_changelog_full(&self, reason: Option<String>) {
        *self
            .changelog_full
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// Sets (or clears) what is being re-read after a Redis state loss.
    pub fn set_rewinding(&self, what: Option<String>) {
        *self.rewinding.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    /// Sets (or clears) why the brokers were not reached at start.
    pub fn set_kafka_unreachable(&self, why: Option<String>) {
        *self
            .kafka_unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Sets (or clears) which consumed topics do not exist.
    pub fn set_topics_missing(&self, what: Option<String>) {
        *self
            .topics_missing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = what;
    }

    /// Sets why the Kafka consumer failed fatally: the instance is out of
    /// the group until a new consumer joins (which clears it).
    pub fn set_kafka_failed(&self, why: Option<String>) {
        if why.is_some() {
            self.joined.store(false, Ordering::Relaxed);
        }
        *self.kafka_failed.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why `/readyz` says not ready, the most specific cause known first:
    /// stopped, a fatally failed consumer, a blocked partition, re-reading after a state loss, Redis,
    /// a missing topic, a missing changelog topic, the brokers unreachable, the group not joined yet.
    pub fn not_ready_reason(&self) -> Option<String> {
        let lock = |m: &std::sync::Mutex<Option<String>>| {
            m.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        let redis = || {
            (!self.redis_ok.load(Ordering::Relaxed)).then(|| {
                lock(&self.redis_problem).unwrap_or_else(|| "connecting to Redis".to_string())
            })
        };
        let joined = self.joined.load(Ordering::Relaxed);
        self.stopped_reason()
            .or_else(|| lock(&self.kafka_failed))
            .or_else(|| lock(&self.changelog_full))
            .or_else(|| lock(&self.blocked))
            .or_else(|| lock(&self.rewinding))
            .or_else(redis)
            .or_else(|| lock(&self.topics_missing))
            .or_else(|| lock(&self.changelog_missing))
            .or_else(|| (!joined).then(|| lock(&self.kafka_unreachable)).flatten())
            .or_else(|| (!joined).then(|| WAITING_TO_JOIN.to_string()))
    }

    /// The instance is a member of the group (an assignment arrived, even
    /// an empty one, or the client reports the group up). Stays set: a
    /// rebalance does not make a running instance unready.
    pub fn set_joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
        self.set_kafka_unreachable(None);
        self.set_kafka_failed(None);
    }

    /// The partitions this instance owns now.
    pub fn set_owned<'a>(&self, tps: impl Iterator<Item = &'a TopicPartition>) {
        let owned = tps.cloned().collect();
        *self.owned.write().unwrap_or_else(|e| e.into_inner()) = owned;
    }

    /// The partitions this instance owns now, sorted.
    pub fn owned(&self) -> Vec<TopicPartition> {
        let owned = self.owned.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<TopicPartition> = owned.iter().cloned().collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }

    /// The exposition without the per-partition series of partitions this
    /// instance no longer owns.
    pub(super) fn exposition(&self, handle: &PrometheusHandle) -> String {
        let owned = self.owned.read().unwrap_or_else(|e| e.into_inner());
        exposition::keep_owned(&handle.render(), &owned)
    }

    /// Redis answers as idem needs.
    pub fn set_redis_ok(&self) {
        self.set_redis_problem(None);
    }

    /// Sets (or clears, with `None`) why Redis does not answer as idem needs.
    pub fn set_redis_problem(&self, problem: Option<String>) {
        let mut slot = self.redis_problem.lock().unwrap_or_else(|e| e.into_inner());
        self.redis_ok.store(problem.is_none(), Ordering::Relaxed);
        *slot = problem;
    }

    /// Redis at `url` failed with `error`; `refused`: it refused idem's
    /// credentials, which waiting does not fix.
    pub fn set_redis_failing(&self, url: &str, error: &dyn std::fmt::Display, refused: bool) {
        let url = crate::config::redact_url(url);
        self.set_redis_problem(Some(if refused {
            format!("Redis at {url} refuses idem's credentials ({error}): check the user and password of redis.url or redis.password_file")
        } else {
            format!("Redis at {url} does not answer ({error}); retrying")
        }));
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }
}
