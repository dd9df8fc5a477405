//! Typed settings: `config/default.toml` (compiled in), an optional file and
//! `IDEM__SECTION__KEY` variables, validated once at start.
//!
//! Guarantee: a `Config` that exists is valid. Every rejected value names its
//! key, the value and the expected form, so the operator knows what to fix.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use crate::event::settings::{EventConfig, EventFormat, FieldMap};

const DEFAULTS: &str = include_str!("../config/default.toml");

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

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value is present but not of the expected form.
    #[error("config key `{key}`: got {value:?}, expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    /// The layers could not be read or merged (unknown key, wrong type, unreadable file).
    #[error("config: {0}")]
    Load(String),
}

impl ConfigError {
    fn invalid(key: &str, value: impl fmt::Display, expected: &str) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// The key this error is about, when it names one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Load(_) => None,
        }
    }
}

/// A password: never printed (Debug shows `***`), read from the config, the
/// environment or a file (`…_file` keys).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself: pass it to a client, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
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

/// An optional path key: empty, or a file that exists.
fn readable_file(key: &str, path: String) -> Result<String, ConfigError> {
    if !path.is_empty() && !Path::new(&path).is_file() {
        return Err(ConfigError::invalid(
            key,
            &path,
            "the path of a readable file",
        ));
    }
    Ok(path)
}

/// A client certificate and its key for mutual TLS: both readable files,
/// or neither. Each argument is (key name, path).
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
        _ => Ok((readable_file(cert.0, cert.1)?, readable_file(key.0, key.1)?)),
    }
}

/// Where a group without committed offsets starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Kafka connection and group settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub auto_offset_reset: OffsetReset,
    pub commit_interval: Duration,
    pub session_timeout: Duration,
    /// How long a revoke waits for in-flight batches of the revoked partitions.
    pub revoke_timeout: Duration,
    /// Static group membership id (e.g. the pod name), if any.
    pub group_instance_id: Option<String>,
    /// Passthrough librdkafka settings, already checked against the fixed keys.
    pub librdkafka: BTreeMap<String, String>,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with a sasl_* protocol).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: Option<Secret>,
    /// CA bundle to verify the brokers' certificates (ssl protocols).
    pub ssl_ca_location: String,
    /// Client certificate and key for mutual TLS (both or neither).
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    pub ssl_key_password: Option<Secret>,
}

impl KafkaConfig {
    /// The default settings pointed at `brokers`: the tests' and the test
    /// bench's own clients (plaintext, no credentials).
    pub fn for_brokers(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_string(),
            ..Config::defaults().kafka
        }
    }
}

/// When an effect counts as durable, so that its offset may be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// When Redis replied (its persistence settings decide what a crash loses).
    #[default]
    Ack,
    /// When `n` replicas acknowledged the batch (`WAIT`).
    Replicas(u32),
    /// When the batch is on disk: `appendfsync always`, or `WAITAOF` (Redis ≥ 7.2).
    Fsync,
}

/// One Redis or a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
}

/// Redis connection settings and key layout.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// One URL, or for a cluster comma-separated seed node URLs.
    pub url: String,
    pub key_prefix: String,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
    pub durability: Durability,
    /// ACL user and password (override any in the URL).
    pub username: String,
    pub password: Option<Secret>,
    /// PEM CA bundle to verify the server's certificate with `rediss://`
    /// (empty: the system's trust store).
    pub tls_ca_file: String,
    /// Client certificate and key (PEM) for servers that require mutual TLS
    /// (`tls-auth-clients yes`); both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Start even if Redis's `maxmemory-policy` may evict idem's keys
    /// (anything but `noeviction`): the operator accepts lost dedupe memory.
    pub allow_eviction: bool,
}

impl RedisConfig {
    /// The default settings pointed at `url` in `mode`: the tools' and
    /// tests' own connections (no credentials, no TLS).
    pub fn for_url(url: &str, mode: RedisMode) -> RedisConfig {
        RedisConfig {
            mode,
            url: url.to_string(),
            ..Config::defaults().redis
        }
    }
}

/// The dedupe window, global and per topic.
#[derive(Debug, Clone)]
pub struct DedupeConfig {
    pub window: Duration,
    pub topic_windows: BTreeMap<String, Duration>,
}

impl DedupeConfig {
    /// The window that applies to events of `topic`.
    pub fn window_for(&self, topic: &str) -> Duration {
        self.topic_windows
            .get(topic)
            .copied()
            .unwrap_or(self.window)
    }
}

/// Dead-letter settings.
#[derive(Debug, Clone)]
pub struct DlqConfig {
    /// Topic name template; `{topic}` is the source topic.
    pub topic: String,
    pub max_ratio: f64,
    pub ratio_window: usize,
    pub send_timeout: Duration,
}

impl DlqConfig {
    /// The dead-letter topic of `source`.
    pub fn topic_for(&self, source: &str) -> String {
        self.topic.replace("{topic}", source)
    }
}

/// Batching and retry settings of the processing loop.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub batch_max_events: NonZeroUsize,
    pub batch_linger: Duration,
    pub events_per_script: NonZeroUsize,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    /// A partition with records in flight and no progress for this long is
    /// "blocked": `/readyz` turns 503 and `idem_partition_blocked` names it.
    pub stall_timeout: Duration,
}

/// The validated configuration of one idem process.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub dedupe: DedupeConfig,
    pub event: EventConfig,
    pub dlq: DlqConfig,
    pub pipeline: PipelineConfig,
    pub metrics_listen: SocketAddr,
    /// How long a graceful shutdown waits for in-flight batches.
    pub shutdown_drain_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
}

// The raw layer: what the files and variables say, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    kafka: RawKafka,
    redis: RawRedis,
    dedupe: RawDedupe,
    event: RawEvent,
    dlq: RawDlq,
    pipeline: RawPipeline,
    metrics: RawMetrics,
    shutdown: RawShutdown,
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    drain_timeout: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    group_id: String,
    topics: Vec<String>,
    auto_offset_reset: String,
    commit_interval: String,
    session_timeout: String,
    revoke_timeout: String,
    group_instance_id: String,
    security_protocol: String,
    sasl_mechanism: String,
    sasl_username: String,
    sasl_password: String,
    sasl_password_file: String,
    ssl_ca_location: String,
    ssl_certificate_location: String,
    ssl_key_location: String,
    ssl_key_password: String,
    ssl_key_password_file: String,
    /// Nested maps appear when a key's dots were read as path separators
    /// (environment variables); they are flattened back into dotted keys.
    #[serde(default)]
    librdkafka: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    mode: String,
    url: String,
    key_prefix: String,
    response_timeout: String,
    connect_timeout: String,
    durability: String,
    username: String,
    password: String,
    password_file: String,
    tls_ca_file: String,
    tls_cert_file: String,
    tls_key_file: String,
    allow_eviction: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedupe {
    window: String,
    #[serde(default)]
    topic_windows: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDlq {
    topic: String,
    max_ratio: f64,
    ratio_window: i64,
    send_timeout: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    format: String,
    id: String,
    entity: String,
    seq: String,
    #[serde(rename = "type")]
    kind: String,
    data: String,
    ts: String,
    max_bytes: i64,
    duplicate_keys: String,
    key_mismatch: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    batch_max_events: i64,
    batch_linger: String,
    events_per_script: i64,
    retry_initial_backoff: String,
    retry_max_backoff: String,
    stall_timeout: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
    level: String,
}

impl Config {
    /// Loads the layers: built-in defaults, then `file` if given, then the
    /// `IDEM__…` entries of `env` (passed in so tests need not touch the process env).
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let idem_env: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("IDEM__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("IDEM")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("kafka.topics")
                .try_parsing(true)
                .source(Some(idem_env)),
        );
        let raw: RawConfig = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        raw.validate()
    }

    /// Loads the built-in defaults only (useful for tools and tests).
    pub fn defaults() -> Config {
        Config::load(None, &HashMap::new()).expect("built-in defaults are valid")
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let k = self.kafka;
        non_empty("kafka.brokers", &k.brokers)?;
        non_empty("kafka.group_id", &k.group_id)?;
        if k.topics.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.topics",
                "[]",
                "a list of at least one topic name",
            ));
        }
        for topic in &k.topics {
            if !is_valid_topic_name(topic) {
                return Err(ConfigError::invalid(
                    "kafka.topics",
                    topic,
                    "topic names of 1-249 characters from [a-zA-Z0-9._-]",
                ));
            }
        }
        let auto_offset_reset = match k.auto_offset_reset.as_str() {
            "earliest" => OffsetReset::Earliest,
            "latest" => OffsetReset::Latest,
            other => {
                return Err(ConfigError::invalid(
                    "kafka.auto_offset_reset",
                    other,
                    "\"earliest\" or \"latest\"",
                ))
            }
        };
        let mut librdkafka = BTreeMap::new();
        for (key, value) in &k.librdkafka {
            flatten_into(key, value, &mut librdkafka)?;
        }
        for key in librdkafka.keys() {
            if FIXED_LIBRDKAFKA_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::invalid(
                    &format!("kafka.librdkafka.{key}"),
                    key,
                    "a librdkafka key idem does not fix (this one protects the delivery guarantee or has its own idem key)",
                ));
            }
        }

        let r = self.redis;
        let mode = match r.mode.as_str() {
            "standalone" => RedisMode::Standalone,
            "cluster" => RedisMode::Cluster,
            other => {
                return Err(ConfigError::invalid(
                    "redis.mode",
                    other,
                    "\"standalone\" or \"cluster\"",
                ))
            }
        };
        for url in r.url.split(',').map(str::trim) {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::invalid(
                    "redis.url",
                    redact_url(url),
                    "a URL like redis://host:6379 (for a cluster: seed nodes separated by commas)",
                ));
            }
        }
        if mode == RedisMode::Standalone && r.url.contains(',') {
            return Err(ConfigError::invalid(
                "redis.url",
                redact_url(&r.url),
                "one URL (several seed nodes need redis.mode = \"cluster\")",
            ));
        }
        non_empty("redis.key_prefix", &r.key_prefix)?;
        if r.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "redis.key_prefix",
                &r.key_prefix,
                "a prefix without `{` or `}` (they would change the Redis Cluster hash tag)",
            ));
        }

        let window = positive_duration("dedupe.window", &self.dedupe.window)?;
        let mut topic_windows = BTreeMap::new();
        for (topic, w) in &self.dedupe.topic_windows {
            let key = format!("dedupe.topic_windows.{topic}");
            topic_windows.insert(topic.clone(), positive_duration(&key, w)?);
        }

        let e = self.event;
        let fields = FieldMap {
            id: pointer("event.id", &e.id)?,
            entity: pointer("event.entity", &e.entity)?,
            seq: pointer("event.seq", &e.seq)?,
            kind: pointer("event.type", &e.kind)?,
            data: pointer("event.data", &e.data)?,
            ts: pointer("event.ts", &e.ts)?,
        };
        let max_bytes = positive_int("event.max_bytes", e.max_bytes)?;
        let reject_duplicate_keys = match e.duplicate_keys.as_str() {
            "last_wins" => false,
            "reject" => true,
            other => {
                return Err(ConfigError::invalid(
                    "event.duplicate_keys",
                    other,
                    "\"last_wins\" or \"reject\"",
                ))
            }
        };
        let dead_letter_key_mismatch = match e.key_mismatch.as_str() {
            "count" => false,
            "dead_letter" => true,
            other => {
                return Err(ConfigError::invalid(
                    "event.key_mismatch",
                    other,
                    "\"count\" or \"dead_letter\"",
                ))
            }
        };
        let format = match e.format.as_str() {
            "auto" => EventFormat::Auto,
            "idem" => EventFormat::Idem,
            "cloudevents" => EventFormat::CloudEvents,
            other => {
                return Err(ConfigError::invalid(
                    "event.format",
                    other,
                    "\"auto\", \"idem\" or \"cloudevents\"",
                ))
            }
        };
        let d = self.dlq;
        if !d.topic.contains("{topic}") && !is_valid_topic_name(&d.topic)
            || !is_valid_topic_name(&d.topic.replace("{topic}", "x"))
        {
            return Err(ConfigError::invalid(
                "dlq.topic",
                &d.topic,
                "a topic name, optionally with {topic} for the source topic, e.g. \"{topic}.dlq\"",
            ));
        }
        if !(d.max_ratio > 0.0 && d.max_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "dlq.max_ratio",
                d.max_ratio,
                "a share greater than 0 and at most 1.0 (1.0 disables the budget)",
            ));
        }
        let dlq = DlqConfig {
            topic: d.topic,
            max_ratio: d.max_ratio,
            ratio_window: positive_int("dlq.ratio_window", d.ratio_window)?,
            send_timeout: positive_duration("dlq.send_timeout", &d.send_timeout)?,
        };

        let p = self.pipeline;
        let pipeline = PipelineConfig {
            batch_max_events: NonZeroUsize::new(positive_int(
                "pipeline.batch_max_events",
                p.batch_max_events,
            )?)
            .expect("positive"),
            batch_linger: duration("pipeline.batch_linger", &p.batch_linger)?,
            events_per_script: NonZeroUsize::new(positive_int(
                "pipeline.events_per_script",
                p.events_per_script,
            )?)
            .expect("positive"),
            retry_initial_backoff: positive_duration(
                "pipeline.retry_initial_backoff",
                &p.retry_initial_backoff,
            )?,
            retry_max_backoff: positive_duration(
                "pipeline.retry_max_backoff",
                &p.retry_max_backoff,
            )?,
            stall_timeout: positive_duration("pipeline.stall_timeout", &p.stall_timeout)?,
        };

        let metrics_listen = self.metrics.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "metrics.listen",
                &self.metrics.listen,
                "an address like 127.0.0.1:9464",
            )
        })?;
        let log_format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::invalid(
                    "log.format",
                    other,
                    "\"text\" or \"json\"",
                ))
            }
        };

        let (kafka_cert, kafka_key) = client_certificate(
            (
                "kafka.ssl_certificate_location",
                k.ssl_certificate_location.clone(),
            ),
            ("kafka.ssl_key_location", k.ssl_key_location.clone()),
        )?;
        let (redis_cert, redis_key) = client_certificate(
            ("redis.tls_cert_file", r.tls_cert_file.clone()),
            ("redis.tls_key_file", r.tls_key_file.clone()),
        )?;
        Ok(Config {
            kafka: KafkaConfig {
                brokers: k.brokers,
                group_id: k.group_id,
                topics: k.topics,
                auto_offset_reset,
                commit_interval: positive_duration("kafka.commit_interval", &k.commit_interval)?,
                session_timeout: positive_duration("kafka.session_timeout", &k.session_timeout)?,
                revoke_timeout: positive_duration("kafka.revoke_timeout", &k.revoke_timeout)?,
                group_instance_id: Some(k.group_instance_id.trim().to_string())
                    .filter(|s| !s.is_empty()),
                librdkafka,
                security_protocol: match k.security_protocol.as_str() {
                    p @ ("plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl") => p.to_string(),
                    other => {
                        return Err(ConfigError::invalid(
                            "kafka.security_protocol",
                            other,
                            "\"plaintext\", \"ssl\", \"sasl_plaintext\" or \"sasl_ssl\"",
                        ))
                    }
                },
                sasl_mechanism: match k.sasl_mechanism.as_str() {
                    m @ ("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => m.to_string(),
                    other => {
                        return Err(ConfigError::invalid(
                            "kafka.sasl_mechanism",
                            other,
                            "\"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\"",
                        ))
                    }
                },
                sasl_username: match k.sasl_username.as_str() {
                    "" if k.security_protocol.starts_with("sasl") => {
                        return Err(ConfigError::invalid(
                            "kafka.sasl_username",
                            "",
                            "a user name (kafka.security_protocol is a sasl protocol)",
                        ))
                    }
                    _ => k.sasl_username,
                },
                sasl_password: secret(
                    "kafka.sasl_password",
                    &k.sasl_password,
                    &k.sasl_password_file,
                )?,
                // librdkafka also takes a directory of CA files, or "probe"
                // (search the system's usual locations).
                ssl_ca_location: match k.ssl_ca_location.as_str() {
                    "probe" => k.ssl_ca_location,
                    path if Path::new(path).is_dir() => k.ssl_ca_location,
                    _ => readable_file("kafka.ssl_ca_location", k.ssl_ca_location)?,
                },
                ssl_certificate_location: kafka_cert,
                ssl_key_location: kafka_key,
                ssl_key_password: secret(
                    "kafka.ssl_key_password",
                    &k.ssl_key_password,
                    &k.ssl_key_password_file,
                )?,
            },
            redis: RedisConfig {
                mode,
                url: r.url,
                key_prefix: r.key_prefix,
                response_timeout: positive_duration("redis.response_timeout", &r.response_timeout)?,
                connect_timeout: positive_duration("redis.connect_timeout", &r.connect_timeout)?,
                username: r.username.clone(),
                password: secret("redis.password", &r.password, &r.password_file)?,
                tls_ca_file: readable_file("redis.tls_ca_file", r.tls_ca_file.clone())?,
                tls_cert_file: redis_cert,
                tls_key_file: redis_key,
                allow_eviction: r.allow_eviction,
                durability: parse_durability(&r.durability).ok_or_else(|| {
                    ConfigError::invalid(
                        "redis.durability",
                        &r.durability,
                        "\"ack\", \"fsync\" or \"replicas:N\" with N ≥ 1",
                    )
                })?,
            },
            dedupe: DedupeConfig {
                window,
                topic_windows,
            },
            event: EventConfig {
                format,
                fields,
                max_bytes,
                reject_duplicate_keys,
                dead_letter_key_mismatch,
            },
            dlq,
            pipeline,
            metrics_listen,
            shutdown_drain_timeout: positive_duration(
                "shutdown.drain_timeout",
                &self.shutdown.drain_timeout,
            )?,
            log_format,
            log_level: self.log.level,
        })
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

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::invalid(key, value, "a non-empty string"))
    } else {
        Ok(())
    }
}

fn positive_int(key: &str, value: i64) -> Result<usize, ConfigError> {
    usize::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ConfigError::invalid(key, value, "a positive whole number"))
}

fn pointer(key: &str, value: &str) -> Result<String, ConfigError> {
    if value.starts_with('/') {
        Ok(value.to_string())
    } else {
        Err(ConfigError::invalid(
            key,
            value,
            "a JSON pointer (RFC 6901) such as \"/id\" or \"/meta/id\"",
        ))
    }
}

const DURATION_FORM: &str = "a duration such as \"250ms\", \"5s\", \"2m\", \"24h\" or \"7d\"";

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or_else(|| ConfigError::invalid(key, value, DURATION_FORM))
}

fn positive_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    match parse_duration(value) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::invalid(
            key,
            value,
            &format!("{DURATION_FORM}, greater than zero"),
        )),
    }
}

/// Parses `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
///
/// | input    | result        |
/// |----------|---------------|
/// | `"250ms"`| 250 ms        |
/// | `"5s"`   | 5 s           |
/// | `"24h"`  | 86 400 s      |
/// | `"5"`    | None (no unit)|
/// | `"-1s"`  | None          |
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(millis_per_unit).map(Duration::from_millis)
}

/// Parses `ack`, `fsync` or `replicas:N`.
pub fn parse_durability(text: &str) -> Option<Durability> {
    match text {
        "ack" => Some(Durability::Ack),
        "fsync" => Some(Durability::Fsync),
        other => other
            .strip_prefix("replicas:")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n >= 1)
            .map(Durability::Replicas),
    }
}

/// Kafka's own rule for topic names.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A URL with any password replaced, safe for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.kafka.topics, vec!["events"]);
        assert_eq!(c.dedupe.window, Duration::from_secs(86_400));
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn environment_overrides_defaults() {
        let c = Config::load(
            None,
            &env(&[
                ("IDEM__KAFKA__GROUP_ID", "orders-view"),
                ("IDEM__KAFKA__TOPICS", "orders,payments"),
                ("IDEM__DEDUPE__WINDOW", "72h"),
                ("IDEM__PIPELINE__EVENTS_PER_SCRIPT", "16"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.group_id, "orders-view");
        assert_eq!(c.kafka.topics, vec!["orders", "payments"]);
        assert_eq!(c.dedupe.window, Duration::from_secs(72 * 3600));
        assert_eq!(c.pipeline.events_per_script.get(), 16);
    }

    #[test]
    fn file_layer_sits_between_defaults_and_env() {
        let dir = std::env::temp_dir().join(format!("idem-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[kafka]\ngroup_id = \"from-file\"\n[dedupe.topic_windows]\npayments = \"72h\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&path), &HashMap::new()).unwrap();
        assert_eq!(c.kafka.group_id, "from-file");
        assert_eq!(
            c.dedupe.window_for("payments"),
            Duration::from_secs(72 * 3600)
        );
        assert_eq!(c.dedupe.window_for("other"), Duration::from_secs(24 * 3600));
        let c = Config::load(Some(&path), &env(&[("IDEM__KAFKA__GROUP_ID", "env")])).unwrap();
        assert_eq!(c.kafka.group_id, "env");
    }

    /// Each bad value names exactly its key.
    #[test]
    fn invalid_values_name_their_key() {
        let table: &[(&str, &str, &str)] = &[
            ("IDEM__KAFKA__GROUP_ID", " ", "kafka.group_id"),
            ("IDEM__KAFKA__BROKERS", "", "kafka.brokers"),
            ("IDEM__KAFKA__TOPICS", "bad topic", "kafka.topics"),
            (
                "IDEM__KAFKA__AUTO_OFFSET_RESET",
                "smallest",
                "kafka.auto_offset_reset",
            ),
            ("IDEM__KAFKA__COMMIT_INTERVAL", "1", "kafka.commit_interval"),
            (
                "IDEM__KAFKA__SESSION_TIMEOUT",
                "0s",
                "kafka.session_timeout",
            ),
            (
                "IDEM__KAFKA__LIBRDKAFKA__ENABLE.AUTO.OFFSET.STORE",
                "true",
                "kafka.librdkafka.enable.auto.offset.store",
            ),
            ("IDEM__REDIS__URL", "http://x", "redis.url"),
            (
                "IDEM__REDIS__TLS_CA_FILE",
                "/nonexistent/ca.pem",
                "redis.tls_ca_file",
            ),
            (
                "IDEM__REDIS__TLS_KEY_FILE",
                "Cargo.toml",
                "redis.tls_cert_file",
            ),
            (
                "IDEM__KAFKA__SSL_CA_LOCATION",
                "/nonexistent/ca.pem",
                "kafka.ssl_ca_location",
            ),
            (
                "IDEM__KAFKA__SSL_CERTIFICATE_LOCATION",
                "Cargo.toml",
                "kafka.ssl_key_location",
            ),
            (
                "IDEM__KAFKA__SECURITY_PROTOCOL",
                "sasl_ssl",
                "kafka.sasl_username",
            ),
            (
                "IDEM__KAFKA__LIBRDKAFKA__SSL.KEY.PASSWORD",
                "pw",
                "kafka.librdkafka.ssl.key.password",
            ),
            ("IDEM__REDIS__KEY_PREFIX", "a{b", "redis.key_prefix"),
            (
                "IDEM__REDIS__RESPONSE_TIMEOUT",
                "soon",
                "redis.response_timeout",
            ),
            ("IDEM__DEDUPE__WINDOW", "-5s", "dedupe.window"),
            ("IDEM__DEDUPE__WINDOW", "0ms", "dedupe.window"),
            (
                "IDEM__DEDUPE__TOPIC_WINDOWS__PAYMENTS",
                "3 weeks",
                "dedupe.topic_windows.payments",
            ),
            ("IDEM__EVENT__ID", "id", "event.id"),
            ("IDEM__EVENT__MAX_BYTES", "0", "event.max_bytes"),
            (
                "IDEM__PIPELINE__BATCH_MAX_EVENTS",
                "-1",
                "pipeline.batch_max_events",
            ),
            (
                "IDEM__PIPELINE__EVENTS_PER_SCRIPT",
                "0",
                "pipeline.events_per_script",
            ),
            (
                "IDEM__PIPELINE__BATCH_LINGER",
                "5 parsecs",
                "pipeline.batch_linger",
            ),
            ("IDEM__METRICS__LISTEN", "localhost", "metrics.listen"),
            ("IDEM__LOG__FORMAT", "xml", "log.format"),
            (
                "IDEM__SHUTDOWN__DRAIN_TIMEOUT",
                "never",
                "shutdown.drain_timeout",
            ),
            ("IDEM__KAFKA__REVOKE_TIMEOUT", "0s", "kafka.revoke_timeout"),
        ];
        for (var, value, key) in table {
            let err = Config::load(None, &env(&[(var, value)])).unwrap_err();
            assert_eq!(err.key(), Some(*key), "{var}={value:?} gave {err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::load(None, &env(&[("IDEM__KAFKA__GROUPID", "x")])).unwrap_err();
        assert!(err.to_string().contains("groupid"), "{err}");
        let err = Config::load(None, &env(&[("IDEM__NOPE__X", "1")])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn durations_parse_by_table() {
        let table: &[(&str, Option<u64>)] = &[
            ("250ms", Some(250)),
            ("5s", Some(5_000)),
            ("2m", Some(120_000)),
            ("24h", Some(86_400_000)),
            ("7d", Some(604_800_000)),
            ("0s", Some(0)),
            ("5", None),
            ("s", None),
            ("-1s", None),
            ("1.5s", None),
            ("1w", None),
        ];
        for (text, millis) in table {
            assert_eq!(
                parse_duration(text),
                millis.map(Duration::from_millis),
                "{text}"
            );
        }
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let path = std::env::temp_dir().join(format!("idem-secret-{}", std::process::id()));
        std::fs::write(&path, "s3cret-value\n").unwrap();
        let c = Config::load(
            None,
            &env(&[
                ("IDEM__REDIS__PASSWORD_FILE", path.to_str().unwrap()),
                ("IDEM__KAFKA__SASL_PASSWORD", "kafka-pw"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.redis.password.as_ref().map(Secret::expose),
            Some("s3cret-value")
        );
        assert_eq!(
            c.kafka.sasl_password.as_ref().map(Secret::expose),
            Some("kafka-pw")
        );
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("s3cret-value") && !printed.contains("kafka-pw"),
            "{printed}"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://u:secret@h:6379"),
            "redis://u:***@h:6379"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
