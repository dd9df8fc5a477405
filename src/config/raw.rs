//! The raw layer: what the files and variables say, before validation, and
//! the validation itself, one function per section.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::Path;

use serde::de::{DeserializeOwned, IntoDeserializer};
use serde::Deserialize;

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

/// What the layers say, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    kafka: RawKafka,
    redis: RawRedis,
    dedupe: RawDedupe,
    event: RawEvent,
    dlq: RawDlq,
    pipeline: RawPipeline,
    metrics: RawMetrics,
    shutdown: RawShutdown,
    log: RawLog,
    /// `[[effects]]`: none by default (every event merges its data).
    #[serde(default)]
    effects: Vec<super::effects::RawRule>,
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
    request_timeout: String,
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
    progress_check_interval: String,
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
    /// `topic=duration,…`; wins over `topic_windows` for the same topic.
    #[serde(default)]
    windows: String,
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

impl RawConfig {
    /// Checks every section; the first bad value is the error.
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        Ok(Config {
            kafka: self.kafka.validate()?,
            redis: self.redis.validate()?,
            dedupe: self.dedupe.validate()?,
            event: self.event.validate()?,
            dlq: self.dlq.validate()?,
            pipeline: self.pipeline.validate()?,
            metrics_listen: self.metrics.listen.parse().map_err(|_| {
                ConfigError::invalid(
                    "metrics.listen",
                    &self.metrics.listen,
                    "an address like 127.0.0.1:9464",
                )
            })?,
            shutdown_drain_timeout: positive_duration(
                "shutdown.drain_timeout",
                &self.shutdown.drain_timeout,
            )?,
            log_format: choice("log.format", &self.log.format)?,
            log_level: self.log.level,
            effects: super::effects::validate(self.effects)?,
        })
    }
}

impl RawKafka {
    fn validate(self) -> Result<KafkaConfig, ConfigError> {
        non_empty("kafka.brokers", &self.brokers)?;
        forms::broker_list("kafka.brokers", &self.brokers)?;
        non_empty("kafka.group_id", &self.group_id)?;
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.topics",
                "[]",
                "a list of at least one topic name",
            ));
        }
        if let Some(topic) = self.topics.iter().find(|t| !is_valid_topic_name(t)) {
            return Err(ConfigError::invalid(
                "kafka.topics",
                topic,
                "topic names of 1-249 characters from [a-zA-Z0-9._-]",
            ));
        }
        let security_protocol: SecurityProtocol =
            choice("kafka.security_protocol", &self.security_protocol)?;
        if security_protocol.uses_sasl() && self.sasl_username.is_empty() {
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
            auto_offset_reset: choice("kafka.auto_offset_reset", &self.auto_offset_reset)?,
            commit_interval: positive_duration("kafka.commit_interval", &self.commit_interval)?,
            session_timeout: positive_duration("kafka.session_timeout", &self.session_timeout)?,
            revoke_timeout: positive_duration("kafka.revoke_timeout", &self.revoke_timeout)?,
            request_timeout: positive_duration("kafka.request_timeout", &self.request_timeout)?,
            group_instance_id: Some(self.group_instance_id.trim().to_string())
                .filter(|s| !s.is_empty()),
            librdkafka: librdkafka_passthrough(&self.librdkafka)?,
            security_protocol,
            sasl_mechanism: choice("kafka.sasl_mechanism", &self.sasl_mechanism)?,
            sasl_username: self.sasl_username,
            sasl_password: secret(
                "kafka.sasl_password",
                &self.sasl_password,
                &self.sasl_password_file,
            )?,
            // librdkafka also takes a directory of CA files, or "probe"
            // (search the system's usual locations).
            ssl_ca_location: match self.ssl_ca_location.as_str() {
                "probe" => self.ssl_ca_location,
                path if Path::new(path).is_dir() => self.ssl_ca_location,
                _ => readable_file("kafka.ssl_ca_location", self.ssl_ca_location)?,
            },
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
        let mode: RedisMode = choice("redis.mode", &self.mode)?;
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
        if mode == RedisMode::Standalone && self.url.contains(',') {
            return Err(ConfigError::invalid(
                "redis.url",
                redact_url(&self.url),
                "one URL (several seed nodes need redis.mode = \"cluster\")",
            ));
        }
        non_empty("redis.key_prefix", &self.key_prefix)?;
        if self.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "redis.key_prefix",
                &self.key_prefix,
                "a prefix without `{` or `}` (they would change the Redis Cluster hash tag)",
            ));
        }
        let (tls_cert_file, tls_key_file) = client_certificate(
            ("redis.tls_cert_file", self.tls_cert_file),
            ("redis.tls_key_file", self.tls_key_file),
        )?;
        Ok(RedisConfig {
            mode,
            url: self.url,
            key_prefix: self.key_prefix,
            response_timeout: positive_duration("redis.response_timeout", &self.response_timeout)?,
            connect_timeout: positive_duration("redis.connect_timeout", &self.connect_timeout)?,
            progress_check_interval: positive_duration(
                "redis.progress_check_interval",
                &self.progress_check_interval,
            )?,
            password: secret("redis.password", &self.password, &self.password_file)?,
            username: self.username,
            tls_ca_file: readable_file("redis.tls_ca_file", self.tls_ca_file)?,
            tls_cert_file,
            tls_key_file,
            allow_eviction: self.allow_eviction,
            durability: parse_durability(&self.durability).ok_or_else(|| {
                ConfigError::invalid(
                    "redis.durability",
                    &self.durability,
                    "\"ack\", \"fsync\" or \"replicas:N\" with N ≥ 1",
                )
            })?,
        })
    }
}

impl RawDedupe {
    fn validate(self) -> Result<DedupeConfig, ConfigError> {
        let mut topic_windows = BTreeMap::new();
        for (topic, window) in &self.topic_windows {
            let key = format!("dedupe.topic_windows.{topic}");
            topic_windows.insert(topic.clone(), positive_duration(&key, window)?);
        }
        for (topic, window) in forms::window_map("dedupe.windows", &self.windows)? {
            let duration = positive_duration(&format!("dedupe.windows ({topic})"), &window)?;
            topic_windows.insert(topic, duration);
        }
        Ok(DedupeConfig {
            window: positive_duration("dedupe.window", &self.window)?,
            topic_windows,
        })
    }
}

/// `event.duplicate_keys`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum DuplicateKeys {
    LastWins,
    Reject,
}

/// `event.key_mismatch`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum KeyMismatch {
    Count,
    DeadLetter,
}

impl RawEvent {
    fn validate(self) -> Result<EventConfig, ConfigError> {
        let fields = FieldMap {
            id: pointer("event.id", &self.id)?,
            entity: pointer("event.entity", &self.entity)?,
            seq: pointer("event.seq", &self.seq)?,
            kind: pointer("event.type", &self.kind)?,
            data: pointer("event.data", &self.data)?,
            ts: pointer("event.ts", &self.ts)?,
        };
        let duplicate_keys: DuplicateKeys = choice("event.duplicate_keys", &self.duplicate_keys)?;
        let key_mismatch: KeyMismatch = choice("event.key_mismatch", &self.key_mismatch)?;
        Ok(EventConfig {
            format: choice("event.format", &self.format)?,
            fields,
            max_bytes: positive_int("event.max_bytes", self.max_bytes)?,
            reject_duplicate_keys: matches!(duplicate_keys, DuplicateKeys::Reject),
            dead_letter_key_mismatch: matches!(key_mismatch, KeyMismatch::DeadLetter),
        })
    }
}

impl RawDlq {
    fn validate(self) -> Result<DlqConfig, ConfigError> {
        if !self.topic.contains("{topic}") && !is_valid_topic_name(&self.topic)
            || !is_valid_topic_name(&self.topic.replace("{topic}", "x"))
        {
            return Err(ConfigError::invalid(
                "dlq.topic",
                &self.topic,
                "a topic name, optionally with {topic} for the source topic, e.g. \"{topic}.dlq\"",
            ));
        }
        if !(self.max_ratio > 0.0 && self.max_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "dlq.max_ratio",
                self.max_ratio,
                "a share greater than 0 and at most 1.0 (1.0 disables the budget)",
            ));
        }
        Ok(DlqConfig {
            topic: self.topic,
            max_ratio: self.max_ratio,
            ratio_window: positive_int("dlq.ratio_window", self.ratio_window)?,
            send_timeout: positive_duration("dlq.send_timeout", &self.send_timeout)?,
        })
    }
}

impl RawPipeline {
    fn validate(self) -> Result<PipelineConfig, ConfigError> {
        Ok(PipelineConfig {
            batch_max_events: positive_count("pipeline.batch_max_events", self.batch_max_events)?,
            batch_linger: duration("pipeline.batch_linger", &self.batch_linger)?,
            events_per_script: positive_count(
                "pipeline.events_per_script",
                self.events_per_script,
            )?,
            retry_initial_backoff: positive_duration(
                "pipeline.retry_initial_backoff",
                &self.retry_initial_backoff,
            )?,
            retry_max_backoff: positive_duration(
                "pipeline.retry_max_backoff",
                &self.retry_max_backoff,
            )?,
            stall_timeout: positive_duration("pipeline.stall_timeout", &self.stall_timeout)?,
        })
    }
}

/// One of an enum's names, decoded by its serde attributes; the expected
/// form is serde's list of the names (`` `text` or `json` ``).
fn choice<T: DeserializeOwned>(key: &str, value: &str) -> Result<T, ConfigError> {
    T::deserialize(value.into_deserializer()).map_err(|e: serde::de::value::Error| {
        let message = e.to_string();
        let names = message
            .split_once(", expected ")
            .map_or(message.as_str(), |(_, names)| names);
        ConfigError::invalid(key, value, names)
    })
}

fn positive_count(key: &str, value: i64) -> Result<NonZeroUsize, ConfigError> {
    Ok(NonZeroUsize::new(positive_int(key, value)?).expect("positive_int is positive"))
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
