//! The sections as the layers give them, decoded by serde into typed
//! values (`values.rs`: the `config` crate names the key of a refused
//! value), then the checks that span several keys, one function per
//! section. Each key is declared here once, with its doc; its default and
//! its comment are in `config/default.toml` (a test holds the two together).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::values;
use super::*;

/// librdkafka keys that idem fixes because they protect the delivery guarantee.
const FIXED_LIBRDKAFKA_KEYS: [&str; 13] = [
    "enable.auto.offset.store",
    "enable.auto.commit",
    "bootstrap.servers",
    "group.id",
    // Security settings have their own keys, so that passwords can come from files.
    "security.protocol",
    "sasl.mechanisms",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
];

/// What the layers say, decoded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    kafka: RawKafka,
    redis: RawRedis,
    dedupe: RawDedupe,
    event: RawEvent,
    dlq: DlqConfig,
    pipeline: PipelineConfig,
    metrics: RawMetrics,
    shutdown: RawShutdown,
    log: RawLog,
    /// `[[effects]]`: none by default (every event merges its data).
    #[serde(default)]
    effects: Vec<super::effects::RawRule>,
}

/// `[shutdown]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    /// On SIGTERM/SIGINT, how long in-flight batches may take to finish before the
    /// final commit. What is not finished is not committed (and is redelivered later).
    #[serde(deserialize_with = "values::positive_duration")]
    drain_timeout: Duration,
}

/// `[kafka]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    /// Bootstrap brokers, comma separated host:port.
    #[serde(deserialize_with = "values::brokers")]
    brokers: String,
    /// Consumer group. All idem instances of one pipeline share it.
    #[serde(deserialize_with = "values::non_empty")]
    group_id: String,
    /// Source topics (at least one).
    #[serde(deserialize_with = "values::topics")]
    topics: Vec<String>,
    /// Where a group without a committed offset starts: "earliest" or "latest".
    #[serde(deserialize_with = "values::choice")]
    auto_offset_reset: OffsetReset,
    /// How often the offsets of finished events are committed. Only offsets whose
    /// effects are already in Redis are ever committed, so this trades redelivered
    /// work after a crash against commit traffic; it never affects correctness.
    #[serde(deserialize_with = "values::positive_duration")]
    commit_interval: Duration,
    /// Group session timeout: how long the group waits for a silent instance.
    #[serde(deserialize_with = "values::positive_duration")]
    session_timeout: Duration,
    /// When partitions are revoked in a rebalance, how long idem waits for their
    /// in-flight batches before committing what is done and letting go.
    #[serde(deserialize_with = "values::positive_duration")]
    revoke_timeout: Duration,
    /// How long a tool (topics, inspect, replay, reconcile, dlq, check) and the
    /// start-up checks wait for the brokers to answer one request. The tools'
    /// global --timeout sets it for one run.
    #[serde(deserialize_with = "values::positive_duration")]
    request_timeout: Duration,
    /// Static group membership: a stable id per instance (e.g. the pod name,
    /// IDEM__KAFKA__GROUP_INSTANCE_ID=$POD_NAME). An instance that restarts within
    /// session_timeout gets its partitions back without a rebalance. Empty: dynamic.
    #[serde(deserialize_with = "values::optional_trimmed")]
    group_instance_id: Option<String>,
    /// Security (docs/security.md). security_protocol: "plaintext", "ssl",
    /// "sasl_plaintext" or "sasl_ssl". Every Kafka client idem makes uses these
    /// settings: the consumer, the dead-letter producer and the tools.
    #[serde(deserialize_with = "values::choice")]
    security_protocol: SecurityProtocol,
    /// SASL mechanism: "PLAIN", "SCRAM-SHA-256" or "SCRAM-SHA-512". sasl_username
    /// is required with the sasl protocols.
    #[serde(deserialize_with = "values::choice")]
    sasl_mechanism: SaslMechanism,
    /// Described with `sasl_mechanism` (config/default.toml has one comment for the group).
    sasl_username: String,
    /// The SASL password, inline (better: IDEM__KAFKA__SASL_PASSWORD) or from a file
    /// (sasl_password_file, e.g. a mounted secret). Never logged.
    sasl_password: String,
    /// Described with `sasl_password` (config/default.toml has one comment for the group).
    sasl_password_file: String,
    /// CA bundle (PEM file, or a directory of them) to verify the brokers'
    /// certificates; empty: librdkafka's default; "probe": search the system's usual places.
    #[serde(deserialize_with = "values::ca_location")]
    ssl_ca_location: String,
    /// Mutual TLS: the client certificate and its private key (PEM), both or
    /// neither; the key's password inline or from a file, if the key is encrypted.
    #[serde(deserialize_with = "values::readable_file")]
    ssl_certificate_location: String,
    /// Described with `ssl_certificate_location` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::readable_file")]
    ssl_key_location: String,
    /// Described with `ssl_certificate_location` (config/default.toml has one comment for the group).
    ssl_key_password: String,
    /// Described with `ssl_certificate_location` (config/default.toml has one comment for the group).
    ssl_key_password_file: String,
    /// Extra librdkafka consumer settings, passed as they are (e.g. "fetch.max.bytes",
    /// "ssl.endpoint.identification.algorithm"). Refused here because they protect
    /// the delivery guarantee or have a key of their own above: enable.auto.offset.store,
    /// enable.auto.commit, bootstrap.servers, group.id, security.protocol, sasl.*,
    /// ssl.ca.location, ssl.certificate.location, ssl.key.location, ssl.key.password.
    #[serde(default)]
    librdkafka: BTreeMap<String, serde_json::Value>,
}

/// `[redis]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    /// "standalone" (one Redis) or "cluster" (Redis Cluster: events are grouped by
    /// the hash slot of their entity; MOVED/ASK and failovers are followed).
    #[serde(deserialize_with = "values::choice")]
    mode: RedisMode,
    /// Redis URL: redis://[user:password@]host:port[/db]. For a cluster, seed nodes
    /// separated by commas: redis://10.0.0.1:7000,redis://10.0.0.2:7000
    url: String,
    /// Prefix of every key idem writes, so several pipelines can share one Redis.
    /// Keys look like <prefix>:{<entity>}:state (see docs/redis-layout.md).
    #[serde(deserialize_with = "values::key_prefix")]
    key_prefix: String,
    /// How long one Redis round trip may take before it counts as failed and is retried.
    #[serde(deserialize_with = "values::positive_duration")]
    response_timeout: Duration,
    /// How long to wait for a (re)connection to Redis.
    #[serde(deserialize_with = "values::positive_duration")]
    connect_timeout: Duration,
    /// While no batch runs, how often the epoch marker and the progress records of
    /// every assigned partition are checked, so that a Redis restarted empty or
    /// restored from an older snapshot is noticed (and re-read from the log) even on
    /// an idle topic. Each check is one round trip of three commands per server.
    #[serde(deserialize_with = "values::positive_duration")]
    progress_check_interval: Duration,
    /// When an effect counts as durable, so that its offset may be committed:
    ///   "ack"        when Redis replied. What a Redis crash loses then depends on its
    ///                persistence (AOF everysec loses up to a second of acknowledged writes).
    ///   "fsync"      when the write is on disk: needs appendonly yes + appendfsync always
    ///                (checked at start), or Redis >= 7.2 where idem waits with WAITAOF.
    ///   "replicas:N" when N replicas acknowledged it (WAIT after each batch).
    /// idem checks at start that the server (every master of a cluster) can give the
    /// level and refuses otherwise. On a cluster the wait runs on each master a batch wrote to.
    #[serde(deserialize_with = "values::durability")]
    durability: Durability,
    /// ACL user and password; override any in the URL. The password may come from
    /// a file (password_file, e.g. a mounted secret) and is never logged.
    username: String,
    /// Described with `username` (config/default.toml has one comment for the group).
    password: String,
    /// Described with `username` (config/default.toml has one comment for the group).
    password_file: String,
    /// With rediss:// URLs: a PEM CA bundle to verify the server's certificate
    /// (empty: the system's trust store).
    #[serde(deserialize_with = "values::readable_file")]
    tls_ca_file: String,
    /// Mutual TLS (a server with tls-auth-clients yes): the client certificate and
    /// its private key (PEM), both or neither.
    #[serde(deserialize_with = "values::readable_file")]
    tls_cert_file: String,
    /// Described with `tls_cert_file` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::readable_file")]
    tls_key_file: String,
    /// idem refuses to start unless Redis's maxmemory-policy is "noeviction" (on a
    /// cluster: every master): an allkeys-* policy evicts entity state, and a
    /// volatile-* policy evicts exactly the remembered ids (they carry TTLs), so
    /// redeliveries would be applied again. true starts anyway, with a warning.
    allow_eviction: bool,
}

/// `[dedupe]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedupe {
    /// How long an event id is remembered to reject redeliveries as duplicates.
    /// Ids are remembered for at least this long and at most twice this long.
    /// Events older than the window are still caught by the per-entity sequence (stale).
    #[serde(deserialize_with = "values::positive_duration")]
    window: Duration,
    /// Per-topic windows, overriding `window` for the named topics, e.g.
    ///   payments = "72h"
    /// A window for a topic that kafka.topics does not name is logged at WARN.
    #[serde(default, deserialize_with = "values::positive_durations")]
    topic_windows: BTreeMap<String, Duration>,
    /// Per-topic windows as one string, for the environment (whose keys are
    /// lower-cased and cannot hold `-` or `.`), e.g.
    ///   IDEM__DEDUPE__WINDOWS="orders-v2=72h,payments=24h"
    /// A topic named here wins over the same topic in [dedupe.topic_windows].
    #[serde(default, deserialize_with = "values::window_map")]
    windows: BTreeMap<String, Duration>,
}

/// `event.duplicate_keys`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DuplicateKeys {
    LastWins,
    Reject,
}

/// `event.key_mismatch`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KeyMismatch {
    Count,
    DeadLetter,
}

/// `[event]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    /// Record formats: "auto" reads CloudEvents 1.0 when the record says so (header
    /// content-type: application/cloudevents+json for structured mode, ce_* headers
    /// for binary mode) and idem's envelope otherwise; "idem" or "cloudevents" force one.
    /// See docs/event-contract.md for how CloudEvents attributes map to id, entity and seq.
    #[serde(deserialize_with = "values::choice")]
    format: EventFormat,
    /// JSON pointers (RFC 6901) to the fields of the event envelope.
    #[serde(deserialize_with = "values::pointer")]
    id: String,
    /// Described with `id` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::pointer")]
    entity: String,
    /// Described with `id` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::pointer")]
    seq: String,
    /// Described with `id` (config/default.toml has one comment for the group).
    #[serde(rename = "type", deserialize_with = "values::pointer")]
    kind: String,
    /// Described with `id` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::pointer")]
    data: String,
    /// Described with `id` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::pointer")]
    ts: String,
    /// Records larger than this many bytes are rejected as invalid (and
    /// dead-lettered: the dead-letter producer accepts records of this size plus headers).
    #[serde(deserialize_with = "values::positive_int")]
    max_bytes: usize,
    /// Two equal keys in one JSON object, e.g. {"amount":1,"amount":100}:
    /// "last_wins" keeps the last (what most JSON parsers do; the default, so that
    /// upgrading does not turn an existing producer's records into dead letters), or
    /// "reject" dead-letters the record with reason duplicate_key.
    #[serde(deserialize_with = "values::choice")]
    duplicate_keys: DuplicateKeys,
    /// A record whose Kafka key is not its entity (or has no key) may put the
    /// entity's events on several partitions, where their order is lost and a merge
    /// can keep an older field (docs/guarantees.md). "count" counts them
    /// (idem_key_mismatch_total) and logs now and then; "dead_letter" also
    /// dead-letters them with reason key_mismatch.
    #[serde(deserialize_with = "values::choice")]
    key_mismatch: KeyMismatch,
}

/// `[metrics]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    /// Loopback by default; set "0.0.0.0:9464" to expose it.
    #[serde(deserialize_with = "values::listen")]
    listen: SocketAddr,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// "text" for people, "json" for log pipelines.
    #[serde(deserialize_with = "values::choice")]
    format: LogFormat,
    /// Default level filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    level: String,
}

impl RawConfig {
    /// The checks that span several keys, section by section.
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        Ok(Config {
            kafka: self.kafka.validate()?,
            redis: self.redis.validate()?,
            dedupe: self.dedupe.validate(),
            event: self.event.validate(),
            dlq: self.dlq,
            pipeline: self.pipeline,
            metrics_listen: self.metrics.listen,
            shutdown_drain_timeout: self.shutdown.drain_timeout,
            log_format: self.log.format,
            log_level: self.log.level,
            effects: super::effects::validate(self.effects)?,
        })
    }
}

impl RawKafka {
    fn validate(self) -> Result<KafkaConfig, ConfigError> {
        if self.security_protocol.uses_sasl() && self.sasl_username.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.sasl_username",
                "",
                "a user name (kafka.security_protocol is a sasl protocol)",
            ));
        }
        let (ssl_certificate_location, ssl_key_location) = client_certificate(
            (
                "kafka.ssl_certificate_location",
                self.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", self.ssl_key_location),
        )?;
        Ok(KafkaConfig {
            auto_offset_reset: self.auto_offset_reset,
            commit_interval: self.commit_interval,
            session_timeout: self.session_timeout,
            revoke_timeout: self.revoke_timeout,
            request_timeout: self.request_timeout,
            group_instance_id: self.group_instance_id,
            librdkafka: librdkafka_passthrough(&self.librdkafka)?,
            security_protocol: self.security_protocol,
            sasl_mechanism: self.sasl_mechanism,
            sasl_username: self.sasl_username,
            sasl_password: secret(
                "kafka.sasl_password",
                &self.sasl_password,
                &self.sasl_password_file,
            )?,
            ssl_ca_location: self.ssl_ca_location,
            ssl_certificate_location,
            ssl_key_location,
            ssl_key_password: secret(
                "kafka.ssl_key_password",
                &self.ssl_key_password,
                &self.ssl_key_password_file,
            )?,
            brokers: self.brokers,
            group_id: self.group_id,
            topics: self.topics,
        })
    }
}

/// The `kafka.librdkafka` table as dotted keys, refusing the keys idem fixes.
fn librdkafka_passthrough(
    table: &BTreeMap<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut librdkafka = BTreeMap::new();
    for (key, value) in table {
        flatten_into(key, value, &mut librdkafka)?;
    }
    if let Some(key) = librdkafka
        .keys()
        .find(|key| FIXED_LIBRDKAFKA_KEYS.contains(&key.as_str()))
    {
        return Err(ConfigError::invalid(
            &format!("kafka.librdkafka.{key}"),
            key,
            "a librdkafka key idem does not fix (this one protects the delivery guarantee or has its own idem key)",
        ));
    }
    Ok(librdkafka)
}

impl RawRedis {
    fn validate(self) -> Result<RedisConfig, ConfigError> {
        if let Some(url) = self
            .url
            .split(',')
            .map(str::trim)
            .find(|url| !(url.starts_with("redis://") || url.starts_with("rediss://")))
        {
            return Err(ConfigError::invalid(
                "redis.url",
                redact_url(url),
                "a URL like redis://host:6379 (for a cluster: seed nodes separated by commas)",
            ));
        }
        if self.mode == RedisMode::Standalone && self.url.contains(',') {
            return Err(ConfigError::invalid(
                "redis.url",
                redact_url(&self.url),
                "one URL (several seed nodes need redis.mode = \"cluster\")",
            ));
        }
        let (tls_cert_file, tls_key_file) = client_certificate(
            ("redis.tls_cert_file", self.tls_cert_file),
            ("redis.tls_key_file", self.tls_key_file),
        )?;
        Ok(RedisConfig {
            mode: self.mode,
            url: self.url,
            key_prefix: self.key_prefix,
            response_timeout: self.response_timeout,
            connect_timeout: self.connect_timeout,
            progress_check_interval: self.progress_check_interval,
            password: secret("redis.password", &self.password, &self.password_file)?,
            username: self.username,
            tls_ca_file: self.tls_ca_file,
            tls_cert_file,
            tls_key_file,
            allow_eviction: self.allow_eviction,
            durability: self.durability,
        })
    }
}

impl RawDedupe {
    fn validate(self) -> DedupeConfig {
        let mut topic_windows = self.topic_windows;
        topic_windows.extend(self.windows);
        DedupeConfig {
            window: self.window,
            topic_windows,
        }
    }
}

impl RawEvent {
    fn validate(self) -> EventConfig {
        EventConfig {
            format: self.format,
            fields: FieldMap {
                id: self.id,
                entity: self.entity,
                seq: self.seq,
                kind: self.kind,
                data: self.data,
                ts: self.ts,
            },
            max_bytes: self.max_bytes,
            reject_duplicate_keys: matches!(self.duplicate_keys, DuplicateKeys::Reject),
            dead_letter_key_mismatch: matches!(self.key_mismatch, KeyMismatch::DeadLetter),
        }
    }
}

/// Reads a secret given inline or as a file (the file wins, trailing newline trimmed).
fn secret(key: &str, inline: &str, file: &str) -> Result<Option<Secret>, ConfigError> {
    if !file.is_empty() {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::invalid(
                &format!("{key}_file"),
                file,
                &format!("a readable file holding the secret ({e})"),
            )
        })?;
        return Ok(Some(Secret(
            text.trim_end_matches(['\n', '\r']).to_string(),
        )));
    }
    Ok((!inline.is_empty()).then(|| Secret(inline.to_string())))
}

/// A client certificate and its key for mutual TLS: both or neither (each
/// already a readable file). Each argument is (key name, path).
fn client_certificate(
    cert: (&str, String),
    key: (&str, String),
) -> Result<(String, String), ConfigError> {
    match (cert.1.is_empty(), key.1.is_empty()) {
        (false, true) => Err(ConfigError::invalid(
            key.0,
            "",
            &format!(
                "the client certificate's private key (PEM), since {} is set",
                cert.0
            ),
        )),
        (true, false) => Err(ConfigError::invalid(
            cert.0,
            "",
            &format!("the client certificate (PEM), since {} is set", key.0),
        )),
        _ => Ok((cert.1, key.1)),
    }
}

fn flatten_into(
    key: &str,
    value: &serde_json::Value,
    out: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten_into(&format!("{key}.{k}"), v, out)?;
            }
        }
        serde_json::Value::String(s) => {
            out.insert(key.to_string(), s.clone());
        }
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
            out.insert(key.to_string(), value.to_string());
        }
        other => {
            return Err(ConfigError::invalid(
                &format!("kafka.librdkafka.{key}"),
                other,
                "a string, number or boolean",
            ))
        }
    }
    Ok(())
}
