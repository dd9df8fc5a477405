//! Kafka clients: the settings every client shares, the consumer's fixed
//! delivery settings, the start-up check of credentials, and the offset
//! store and commit helpers.
//!
//! Guarantee: offsets are stored only by idem after an effect
//! (`enable.auto.offset.store=false`); librdkafka's auto commit then commits
//! nothing but those stored offsets. No config key can change this.

use std::collections::BTreeMap;
use std::time::Duration;

pub mod groups;
pub mod quiet;
pub mod topic_ids;
pub use quiet::QuietContext;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use std::sync::Arc;

use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{GroupProtocol, KafkaConfig};
use crate::metrics;
use crate::offsets::TopicPartition;

/// Brokers and security settings, shared by every client idem makes.
pub fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id(host_name().as_deref()))
        .set("security.protocol", cfg.security_protocol.as_str());
    if cfg.security_protocol.uses_sasl() {
        c.set("sasl.mechanisms", cfg.sasl_mechanism.as_str())
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

/// Every topic the brokers know, with its partition count, asked on a
/// client idem already has (blocking).
pub fn partition_counts_of<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, i32>, rdkafka::error::KafkaError> {
    let md = client.fetch_metadata(None, timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// `idem-<host>`, so that group listings and broker logs name the machine
/// (or pod) rather than librdkafka's default `rdkafka`. Characters Kafka
/// quotas and logs do not like become `-`. Override with
/// `kafka.librdkafka."client.id"`.
pub fn client_id(host: Option<&str>) -> String {
    let host: String = host
        .unwrap_or("")
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if host.is_empty() {
        "idem".to_string()
    } else {
        format!("idem-{host}")
    }
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
}

/// Why idem cannot talk to the brokers with its settings: a configuration
/// error, reported with what to fix and never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "librdkafka could not load the TLS files ({0}). Check kafka.ssl_ca_location, \
         kafka.ssl_certificate_location and kafka.ssl_key_location, and \
         kafka.ssl_key_password (or _file) for an encrypted key: a wrong key \
         password shows as \"PEM lib\"."
    )]
    TlsFiles(String),
    #[error("cannot create a Kafka client: {0}")]
    Client(String),
    /// The brokers refused the credentials or the TLS handshake; the text
    /// says what to check.
    #[error("{0}")]
    Refused(String),
}

/// Checks, before joining the group, that the brokers accept idem's
/// credentials and TLS settings: a refused login or a failed handshake is
/// a configuration error, reported with what to fix, not retried forever.
/// Unreachable brokers are not an error here (librdkafka keeps retrying):
/// what the brokers said is returned, for `/readyz`.
pub fn preflight(cfg: &KafkaConfig, timeout: Duration) -> Result<Reach, PreflightError> {
    let reach = probe(cfg, None, timeout)?;
    match &reach {
        Reach::NotYet(e) => {
            tracing::warn!(brokers = %cfg.brokers, error = %e, "Kafka is not reachable yet; starting anyway, librdkafka keeps retrying");
        }
        Reach::NotABroker(e) => {
            tracing::warn!(brokers = %cfg.brokers, error = %e, "{NOT_A_BROKER}; starting anyway, librdkafka keeps retrying");
        }
        Reach::Answered { .. } => {}
    }
    Ok(reach)
}

/// What `/readyz` says while the brokers have not answered as brokers.
pub fn unreachable_reason(cfg: &KafkaConfig, reach: &Reach) -> Option<String> {
    match reach {
        Reach::NotYet(e) => Some(format!(
            "Kafka unreachable: no broker of kafka.brokers ({}) answered ({e}); retrying",
            cfg.brokers
        )),
        Reach::NotABroker(_) => Some(format!(
            "Kafka unreachable at {}: {NOT_A_BROKER}",
            cfg.brokers
        )),
        Reach::Answered { .. } => None,
    }
}

/// The consumed `topics` the brokers' answer does not hold (`None`: they
/// did not answer, so nobody knows).
pub fn missing_topics(topics: &[String], reach: &Reach) -> Option<Vec<String>> {
    match reach {
        Reach::Answered { partitions, .. } => Some(
            topics
                .iter()
                .filter(|t| !partitions.contains_key(*t))
                .cloned()
                .collect(),
        ),
        _ => None,
    }
}

/// How long a consumer may wait to be admitted to its group before idem
/// warns: a join takes seconds, a broker's refusal lasts.
pub const NOT_ADMITTED_AFTER: Duration = Duration::from_secs(20);

/// The warning for a consumer the group has not admitted after
/// [`NOT_ADMITTED_AFTER`]: librdkafka retries such refusals without a word.
pub fn warn_not_admitted(cfg: &KafkaConfig) {
    tracing::warn!(
        group = %cfg.group_id,
        protocol = cfg.group_protocol.as_str(),
        waited_s = NOT_ADMITTED_AFTER.as_secs(),
        "the consumer group has not admitted this instance yet (/readyz: waiting to join). \
         If the group runs under the other kafka.group_protocol, the broker may refuse to convert it \
         (Kafka 4.1 logs \"Cannot upgrade classic group\" when its members use cooperative-sticky): \
         stop the group, then start every instance with the same protocol \
         (docs/configuration.md, \"Moving a running group\"); otherwise see the group coordinator's log"
    );
}

/// What the brokers said to a metadata request.
#[derive(Debug)]
pub enum Reach {
    /// They answered: the ids of the cluster's brokers, and the partition
    /// count of each topic asked about (every topic, when none was named).
    Answered {
        brokers: Vec<i32>,
        partitions: BTreeMap<String, usize>,
    },
    /// None answered before the deadline; librdkafka's last error.
    NotYet(String),
    /// The address answers, but not as a broker: librdkafka's error (a
    /// listener without the broker's APIs, such as a KRaft controller's).
    NotABroker(String),
}

/// What [`Reach::NotABroker`] means, for the operator.
pub const NOT_A_BROKER: &str =
    "this address answers but is not a Kafka broker listener (a KRaft controller port?): \
     point kafka.brokers at a listener of the brokers' `listeners`/`advertised.listeners`";

/// Answers of the same kind after which the probe stops waiting: a
/// listener that is not a broker's refuses at once, every time.
const NOT_A_BROKER_ANSWERS: u32 = 3;

/// Asks the brokers for metadata (of `topic`, or of every topic) until they
/// answer or `timeout` passes, with the consumer's settings; refused
/// credentials or TLS are the error.
pub fn probe(
    cfg: &KafkaConfig,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Reach, PreflightError> {
    let refused = Arc::new(std::sync::Mutex::new(None::<(RDKafkaErrorCode, String)>));
    // The consumer's own settings (the passthrough may carry TLS settings
    // such as ssl.endpoint.identification.algorithm, and librdkafka checks
    // them against each other), without joining a group: without group.id
    // librdkafka reports errors on the main queue, which `poll` serves.
    let mut config = consumer_config(cfg);
    config.remove("group.id").remove("group.instance.id");
    let consumer: BaseConsumer<RefusalContext> = config
        .create_with_context(RefusalContext::new(refused.clone()))
        .map_err(|e| match e {
            KafkaError::ClientCreation(reason) if tls_files_fail(cfg) => {
                PreflightError::TlsFiles(reason)
            }
            other => PreflightError::Client(other.to_string()),
        })?;
    let deadline = std::time::Instant::now() + timeout;
    // librdkafka fails some requests at once (a listener that is not a
    // broker's): asking again at once would spin, so the pause doubles.
    let mut pause = Duration::from_millis(50);
    let mut refusals_as_not_a_broker = 0;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let fetched = consumer.fetch_metadata(topic, left.min(Duration::from_secs(1)));
        // Error events reach the context only through polling.
        while consumer.poll(Duration::ZERO).is_some() {}
        if let Some((code, reason)) = refused.lock().unwrap().take() {
            return Err(PreflightError::Refused(refusal_advice(cfg, code, &reason)));
        }
        match fetched {
            Ok(md) => {
                return Ok(Reach::Answered {
                    brokers: md.brokers().iter().map(|b| b.id()).collect(),
                    partitions: md
                        .topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| (t.name().to_string(), t.partitions().len()))
                        .collect(),
                })
            }
            Err(e) => {
                // In a row: a bootstrap list may mix brokers and a controller.
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnsupportedFeature) {
                    refusals_as_not_a_broker += 1;
                    if refusals_as_not_a_broker >= NOT_A_BROKER_ANSWERS {
                        return Ok(Reach::NotABroker(e.to_string()));
                    }
                } else {
                    refusals_as_not_a_broker = 0;
                }
                let now = std::time::Instant::now();
                if now >= deadline {
                    return Ok(Reach::NotYet(e.to_string()));
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Whether a client with only the brokers and the security settings cannot
/// be created: librdkafka loads the TLS files (CA, certificate, key with
/// its password) at creation, so then the files are at fault, not the
/// passthrough settings.
fn tls_files_fail(cfg: &KafkaConfig) -> bool {
    cfg.security_protocol.uses_tls() && base_config(cfg).create::<BaseConsumer>().is_err()
}

/// What to fix when the brokers refuse idem, from librdkafka's error.
fn refusal_advice(cfg: &KafkaConfig, code: RDKafkaErrorCode, reason: &str) -> String {
    if code == RDKafkaErrorCode::Authentication {
        format!(
            "Kafka refused idem's SASL credentials ({reason}). Check kafka.sasl_username (now {:?}), \
             kafka.sasl_password or kafka.sasl_password_file, and that the user exists for \
             kafka.sasl_mechanism {}.",
            cfg.sasl_username,
            cfg.sasl_mechanism.as_str()
        )
    } else {
        format!(
            "the TLS handshake with the Kafka brokers failed ({reason}). Check that \
             kafka.security_protocol ({}) matches the listener at {}, that kafka.ssl_ca_location \
             names the CA that signed the brokers' certificates, and any client certificate \
             (kafka.ssl_certificate_location, kafka.ssl_key_location).",
            cfg.security_protocol.as_str(),
            cfg.brokers
        )
    }
}

/// Remembers the first authentication or TLS error librdkafka reports;
/// its own log lines are quiet (see [`quiet`]).
struct RefusalContext {
    refused: Arc<std::sync::Mutex<Option<(RDKafkaErrorCode, String)>>>,
    limiter: quiet::LogLimiter,
}

impl RefusalContext {
    fn new(refused: Arc<std::sync::Mutex<Option<(RDKafkaErrorCode, String)>>>) -> Self {
        RefusalContext {
            refused,
            limiter: quiet::LogLimiter::default(),
        }
    }
}

impl ClientContext for RefusalContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        // Under load the handshake's error event can come too late for the
        // probe (librdkafka raises a repeated error once); its log line
        // comes at every failure.
        if let Some(code) = refusal_in_log(message) {
            self.refused
                .lock()
                .unwrap()
                .get_or_insert_with(|| (code, message.to_string()));
        }
        self.limiter.log(level, fac, message);
    }

    fn stats(&self, _: rdkafka::Statistics) {}

    fn error(&self, error: KafkaError, reason: &str) {
        if let (true, Some(code)) = (is_refusal(&error, reason), error.rdkafka_error_code()) {
            self.refused
                .lock()
                .unwrap()
                .get_or_insert_with(|| (code, reason.to_string()));
        }
    }
}

impl ConsumerContext for RefusalContext {}

/// A refusal named by one of librdkafka's log lines: a failed TLS
/// handshake or SASL authentication (what [`is_refusal`] takes from error
/// events).
fn refusal_in_log(message: &str) -> Option<RDKafkaErrorCode> {
    if message.contains("SASL authentication error") {
        Some(RDKafkaErrorCode::Authentication)
    } else if message.contains("SSL handshake failed") {
        Some(RDKafkaErrorCode::SSL)
    } else {
        None
    }
}

/// An error that retrying will not fix: the brokers refuse the credentials
/// or the TLS handshake. A broker that rejects the client certificate
/// (TLS 1.3 sends the alert after the handshake) shows up as a transport
/// failure carrying OpenSSL's alert.
pub(crate) fn is_refusal(error: &KafkaError, reason: &str) -> bool {
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
        // A partition without a commit starts where kafka.auto_offset_reset
        // says: idem sets it at the assignment. librdkafka's own reset (a
        // position out of range: retention deleted what was ahead of it, or
        // the log was replaced) goes to the earliest record, so a reset
        // never skips records that exist (docs/guarantees.md, offset marks).
        .set("auto.offset.reset", "earliest")
        .set("group.protocol", cfg.group_protocol.as_str())
        // End-of-partition events are noise for a long-running consumer.
        .set("enable.partition.eof", "false");
    let classic = cfg.group_protocol == GroupProtocol::Classic;
    if classic {
        // Under the consumer protocol the broker sets the session (librdkafka
        // refuses the key there).
        c.set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        );
    }
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
    if classic && !cfg.librdkafka.contains_key("partition.assignment.strategy") {
        // Cooperative rebalancing moves only the partitions that must move
        // (the consumer protocol is incremental by design, its assignor the broker's).
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    c
}

/// The list `(topic, partition, next offset)` to commit, each with `metadata`.
pub fn offsets_with_metadata<'a>(
    offsets: impl IntoIterator<Item = (&'a str, i32, i64)>,
    metadata: &str,
) -> rdkafka::error::KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, next) in offsets {
        let mut elem = tpl.add_partition(topic, partition);
        elem.set_metadata(metadata);
        elem.set_offset(Offset::Offset(next))?;
    }
    Ok(tpl)
}

/// Stores `next` (the next offset to read) as the partition's commit point,
/// with `metadata` (see `resume::commit_metadata`); returns whether it was
/// stored. A partition no longer assigned is skipped: its new owner decides.
pub fn store_offset<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    tp: &TopicPartition,
    next: i64,
    metadata: &str,
) -> bool {
    let stored = offsets_with_metadata([(tp.topic.as_str(), tp.partition, next)], metadata)
        .and_then(|tpl| consumer.store_offsets(&tpl));
    match stored {
        Ok(()) => {
            metrics::set_stored_offset(&tp.topic, tp.partition, next);
            true
        }
        Err(e) => {
            tracing::debug!(topic = %tp.topic, partition = tp.partition, error = %e, "offset not stored (partition no longer assigned)");
            false
        }
    }
}

/// Commits `offsets` (next offsets to read) with `metadata` now, whatever
/// is stored, without waiting: the result comes to the context's commit
/// callback. For a commit whose offset is already committed but whose
/// metadata must change (librdkafka's auto commit skips a stored offset
/// equal to the committed one).
pub fn commit_async<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    offsets: &[(TopicPartition, i64)],
    metadata: &str,
) {
    let listed = offsets
        .iter()
        .map(|(tp, next)| (tp.topic.as_str(), tp.partition, *next));
    let sent = offsets_with_metadata(listed, metadata)
        .and_then(|tpl| consumer.commit(&tpl, CommitMode::Async));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "commit not sent; tried again in a few seconds");
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

/// The consumer's group generation (classic) or member epoch (consumer
/// protocol); above 0 once the coordinator has taken it into the group.
/// Under the consumer protocol a member the broker assigns nothing gets no
/// rebalance callback and its statistics stay in join state "init": this is
/// how idem knows such a standby has joined.
pub fn group_generation<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> i32 {
    use rdkafka::bindings as rd;
    // SAFETY: the client pointer lives as long as `consumer`; librdkafka
    // returns a metadata copy (NULL without a group), read and destroyed here.
    unsafe {
        let metadata = rd::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if metadata.is_null() {
            return -1;
        }
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(metadata);
        rd::rd_kafka_consumer_group_metadata_destroy(metadata);
        generation
    }
}

/// A record as fetched, owned (key, value and headers copied out of
/// librdkafka's buffer): what the consumer thread hands the loop and what
/// the tools read back.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TopicRecord {
    pub fn from_message(m: &impl Message) -> TopicRecord {
        TopicRecord {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Headers as borrowed pairs, the form the decoder takes.
    pub fn header_refs(&self) -> Vec<(&str, &[u8])> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SaslMechanism, Secret, SecurityProtocol};

    #[test]
    fn client_ids_name_the_host() {
        for (host, id) in [
            (Some("worker-7\n"), "idem-worker-7"),
            (Some("idem-0.idem.prod.svc"), "idem-idem-0.idem.prod.svc"),
            (Some("a b/c"), "idem-a-b-c"),
            (Some(" "), "idem"),
            (None, "idem"),
        ] {
            assert_eq!(client_id(host), id, "{host:?}");
        }
    }

    #[test]
    fn security_settings_reach_every_client_and_fixed_keys_win() {
        let mut cfg = Config::defaults().kafka;
        cfg.security_protocol = SecurityProtocol::SaslPlaintext;
        cfg.sasl_mechanism = SaslMechanism::Plain;
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

    /// Under the consumer protocol the broker owns the session and the
    /// assignor: idem sends neither (librdkafka refuses `session.timeout.ms`
    /// there, which stopped idem from starting), and says which protocol
    /// it speaks.
    #[test]
    fn the_consumer_protocol_leaves_session_and_assignor_to_the_broker() {
        let mut cfg = Config::defaults().kafka;
        let classic = consumer_config(&cfg);
        assert_eq!(classic.get("group.protocol"), Some("classic"));
        assert_eq!(classic.get("session.timeout.ms"), Some("10000"));
        assert_eq!(
            classic.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        cfg.group_protocol = GroupProtocol::Consumer;
        let consumer = consumer_config(&cfg);
        assert_eq!(consumer.get("group.protocol"), Some("consumer"));
        assert_eq!(consumer.get("session.timeout.ms"), None);
        assert_eq!(consumer.get("partition.assignment.strategy"), None);
        if let Err(e) = consumer.create::<BaseConsumer>() {
            panic!("librdkafka refuses idem's consumer-protocol settings: {e}");
        }
    }
}
