//! Kafka clients: the consumer's fixed delivery settings and its rebalance
//! context, plus small admin helpers shared by the CLI and the tests.
//!
//! Guarantee: offsets are stored only by idem after an effect
//! (`enable.auto.offset.store=false`); librdkafka's auto commit then commits
//! nothing but those stored offsets. No config key can change this.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use std::sync::Arc;

use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::metrics::{self, Health};
use crate::offsets::TopicPartition;
use crate::pipeline::Progress;

/// Security settings for the clients the tools make from a broker list
/// (topics, replay, inspect, dlq, reconcile); set once by the CLI from the config.
static TOOL_SECURITY: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

/// Makes every later `client_config` carry `cfg`'s security settings.
pub fn set_tool_security(cfg: &KafkaConfig) {
    let settings = base_config(cfg)
        .config_map()
        .iter()
        .filter(|(k, _)| **k != "bootstrap.servers")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = TOOL_SECURITY.set(settings);
}

/// A client configuration for `brokers` with the process's security settings.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in TOOL_SECURITY.get().into_iter().flatten() {
        c.set(k, v);
    }
    c
}

/// Brokers and security settings, shared by every client idem makes.
pub fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("security.protocol", &cfg.security_protocol);
    if cfg.security_protocol.starts_with("sasl") {
        c.set("sasl.mechanisms", &cfg.sasl_mechanism)
            .set("sasl.username", &cfg.sasl_username)
            .set(
                "sasl.password",
                cfg.sasl_password.as_ref().map(|p| p.expose()).unwrap_or(""),
            );
    }
    let files = [
        ("ssl.ca.location", &cfg.ssl_ca_location),
        ("ssl.certificate.location", &cfg.ssl_certificate_location),
        ("ssl.key.location", &cfg.ssl_key_location),
    ];
    for (key, path) in files {
        if !path.is_empty() {
            c.set(key, path);
        }
    }
    if let Some(p) = &cfg.ssl_key_password {
        c.set("ssl.key.password", p.expose());
    }
    c
}

/// Checks, before joining the group, that the brokers accept idem's
/// credentials and TLS settings: a refused login or a failed handshake is
/// a configuration error, reported with what to fix, not retried forever.
/// Unreachable brokers are not an error here (librdkafka keeps retrying).
pub fn preflight(cfg: &KafkaConfig, timeout: Duration) -> anyhow::Result<()> {
    let refused = Arc::new(std::sync::Mutex::new(None::<(RDKafkaErrorCode, String)>));
    // The consumer's own settings (the passthrough may carry TLS settings
    // such as ssl.endpoint.identification.algorithm, and librdkafka checks
    // them against each other), without joining a group: without group.id
    // librdkafka reports errors on the main queue, which `poll` serves.
    let mut config = consumer_config(cfg);
    config.remove("group.id").remove("group.instance.id");
    let consumer: BaseConsumer<RefusalContext> = config
        .create_with_context(RefusalContext(refused.clone()))
        .map_err(|e| match e.to_string() {
            m if m.contains("location failed") => anyhow::anyhow!(
                "librdkafka could not load the TLS files ({m}). Check kafka.ssl_ca_location, \
                 kafka.ssl_certificate_location and kafka.ssl_key_location, and \
                 kafka.ssl_key_password (or _file) for an encrypted key: a wrong key \
                 password shows as \"PEM lib\"."
            ),
            m => anyhow::anyhow!("cannot create a Kafka client: {m}"),
        })?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let topic = cfg.topics.first().map(String::as_str);
        let fetched = consumer.fetch_metadata(topic, Duration::from_secs(1));
        // Error events reach the context only through polling.
        while consumer.poll(Duration::ZERO).is_some() {}
        if let Some((code, reason)) = refused.lock().unwrap().take() {
            anyhow::bail!("{}", refusal_advice(cfg, code, &reason));
        }
        match fetched {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                tracing::warn!(brokers = %cfg.brokers, error = %e, "Kafka is not reachable yet; starting anyway, librdkafka keeps retrying");
                return Ok(());
            }
            Err(_) => {}
        }
    }
}

/// What to fix when the brokers refuse idem, from librdkafka's error.
fn refusal_advice(cfg: &KafkaConfig, code: RDKafkaErrorCode, reason: &str) -> String {
    if code == RDKafkaErrorCode::Authentication {
        format!(
            "Kafka refused idem's SASL credentials ({reason}). Check kafka.sasl_username (now {:?}), \
             kafka.sasl_password or kafka.sasl_password_file, and that the user exists for \
             kafka.sasl_mechanism {}.",
            cfg.sasl_username, cfg.sasl_mechanism
        )
    } else {
        format!(
            "the TLS handshake with the Kafka brokers failed ({reason}). Check that \
             kafka.security_protocol ({}) matches the listener at {}, that kafka.ssl_ca_location \
             names the CA that signed the brokers' certificates, and any client certificate \
             (kafka.ssl_certificate_location, kafka.ssl_key_location).",
            cfg.security_protocol, cfg.brokers
        )
    }
}

/// Remembers the first authentication or TLS error librdkafka reports.
struct RefusalContext(Arc<std::sync::Mutex<Option<(RDKafkaErrorCode, String)>>>);

impl ClientContext for RefusalContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let (true, Some(code)) = (is_refusal(&error, reason), error.rdkafka_error_code()) {
            self.0
                .lock()
                .unwrap()
                .get_or_insert_with(|| (code, reason.to_string()));
        }
    }
}

impl ConsumerContext for RefusalContext {}

/// An error that retrying will not fix: the brokers refuse the credentials
/// or the TLS handshake. A broker that rejects the client certificate
/// (TLS 1.3 sends the alert after the handshake) shows up as a transport
/// failure carrying OpenSSL's alert.
fn is_refusal(error: &KafkaError, reason: &str) -> bool {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL) => true,
        Some(RDKafkaErrorCode::BrokerTransportFailure) => reason.contains("SSL routines"),
        _ => false,
    }
}

/// The consumer configuration: user passthrough first, then the settings
/// that protect the guarantee, which always win.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(cfg);
    for (k, v) in &cfg.librdkafka {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        // Offsets are stored by idem only once the record's outcome is durable in Redis.
        .set("enable.auto.offset.store", "false")
        // Auto commit only ever commits what idem stored: safe, and off the hot path.
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().to_string(),
        )
        .set("auto.offset.reset", cfg.auto_offset_reset.as_str())
        .set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        )
        // End-of-partition events are noise for a long-running consumer.
        .set("enable.partition.eof", "false");
    if let Some(id) = &cfg.group_instance_id {
        // Static membership: a restart within the session timeout keeps the assignment.
        c.set("group.instance.id", id);
    }
    if !cfg.librdkafka.contains_key("statistics.interval.ms") {
        // Feeds the lag and uncommitted-events gauges.
        c.set("statistics.interval.ms", "5000");
    }
    if !cfg.librdkafka.contains_key("queued.max.messages.kbytes") {
        // librdkafka prefetches up to 64 MB by default; 8 MB keeps a second
        // of backlog at high rates while holding resident memory flat.
        c.set("queued.max.messages.kbytes", "8192");
    }
    if !cfg.librdkafka.contains_key("fetch.queue.backoff.ms") {
        // With a small prefetch queue the default 1 s pause after filling it
        // would show up as 1 s latency spikes and idle gaps; fetch again soon.
        c.set("fetch.queue.backoff.ms", "10");
    }
    if !cfg.librdkafka.contains_key("partition.assignment.strategy") {
        // Cooperative rebalancing moves only the partitions that must move.
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    c
}

/// Rebalance handling. On revoke: stop taking records of the revoked
/// partitions, wait (bounded) until their in-flight batches are applied,
/// store and synchronously commit their offsets, then let the rebalance go
/// on: the next owner starts after everything this instance finished. On
/// loss: forget the partitions and commit nothing for them.
pub struct IdemContext {
    pub health: Health,
    pub progress: Arc<Progress>,
    pub revoke_timeout: Duration,
}

impl ClientContext for IdemContext {
    /// A refusal after start (rotated credentials, a replaced certificate)
    /// is logged as an error with its cause; librdkafka keeps retrying, so
    /// idem resumes once the brokers accept it again.
    fn error(&self, error: KafkaError, reason: &str) {
        if is_refusal(&error, reason) {
            metrics::record_retry("kafka_refused");
            tracing::error!(error = %error, reason, "Kafka refused idem's credentials or TLS handshake; consumption is stalled until the brokers accept them (see docs/security.md)");
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }

    /// librdkafka's periodic statistics carry each partition's lag and its
    /// stored vs committed offsets: exported as gauges.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut uncommitted = 0i64;
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0
                    || !self
                        .progress
                        .is_assigned(&TopicPartition::new(topic.as_str(), *partition))
                {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    metrics::set_consumer_lag(topic, *partition, p.consumer_lag);
                }
                if p.stored_offset >= 0 && p.committed_offset >= 0 {
                    uncommitted += (p.stored_offset - p.committed_offset).max(0);
                }
            }
        }
        metrics::set_uncommitted_events(uncommitted);
    }
}

impl ConsumerContext for IdemContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps = partitions_of(tpl);
                if consumer.assignment_lost() {
                    metrics::record_rebalance("lost");
                    tracing::warn!(
                        partitions = tps.len(),
                        "partitions lost; their in-flight work is not committed"
                    );
                    self.progress.forget(&tps);
                    return;
                }
                metrics::record_rebalance("revoke");
                self.progress.unassign(&tps);
                let idle = block_in_place_if_possible(|| {
                    self.progress.wait_idle(&tps, self.revoke_timeout)
                });
                if !idle {
                    tracing::warn!(timeout = ?self.revoke_timeout, "revoked partitions still had work in flight; committing only what is done");
                }
                let commits = self.progress.take_commits(|tp| tps.contains(tp));
                for (tp, next) in &commits {
                    if store_offset(consumer, tp, *next) {
                        self.progress.note_stored(tp, *next);
                    }
                }
                commit_stored(consumer);
                self.progress.forget(&tps);
                tracing::info!(
                    partitions = tps.len(),
                    committed = commits.len(),
                    "partitions revoked after committing their finished offsets"
                );
            }
            Rebalance::Assign(tpl) => {
                metrics::record_rebalance("assign");
                let tps = partitions_of(tpl);
                self.progress.assign(&tps);
                for tp in &tps {
                    metrics::init_partition(&tp.topic, tp.partition);
                }
                tracing::info!(partitions = tps.len(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                metrics::record_rebalance("error");
                tracing::warn!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        if let Ok(assignment) = consumer.assignment() {
            metrics::set_assigned_partitions(assignment.count());
            self.health.set_assigned(assignment.count() > 0);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &rdkafka::TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let rdkafka::Offset::Offset(o) = e.offset() {
                        let tp = TopicPartition::new(e.topic(), e.partition());
                        if let Some(lag) = self.progress.note_committed(&tp, o) {
                            metrics::record_commit_lag(lag);
                        }
                    }
                }
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

/// Runs a blocking wait without starving the async runtime's other tasks
/// (the guard stage must keep running while a rebalance callback waits for it).
fn block_in_place_if_possible<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Stores `next` (the next offset to read) as the partition's commit point;
/// returns whether it was stored. A partition no longer assigned is skipped:
/// its new owner decides.
pub fn store_offset<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    tp: &TopicPartition,
    next: i64,
) -> bool {
    let mut tpl = TopicPartitionList::with_capacity(1);
    let stored = tpl
        .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
        .and_then(|()| consumer.store_offsets(&tpl));
    match stored {
        Ok(()) => {
            metrics::set_committed_offset(&tp.topic, tp.partition, next);
            true
        }
        Err(e) => {
            tracing::debug!(topic = %tp.topic, partition = tp.partition, error = %e, "offset not stored (partition no longer assigned)");
            false
        }
    }
}

/// Synchronously commits the stored offsets; "nothing to commit" is fine.
pub fn commit_stored<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "synchronous commit failed"),
    }
}

/// How long admin and metadata calls may take.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Secret};

    #[test]
    fn security_settings_reach_every_client_and_fixed_keys_win() {
        let mut cfg = Config::defaults().kafka;
        cfg.security_protocol = "sasl_plaintext".into();
        cfg.sasl_mechanism = "PLAIN".into();
        cfg.sasl_username = "idem".into();
        cfg.sasl_password = Some(Secret::new("pw"));
        cfg.librdkafka
            .insert("fetch.max.bytes".into(), "1000".into());
        let c = consumer_config(&cfg);
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("fetch.max.bytes"), Some("1000"));
        let plain = base_config(&Config::defaults().kafka);
        assert_eq!(plain.get("sasl.password"), None);
    }
}
