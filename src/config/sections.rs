//! The document the layers give, one typed section per table, and the small
//! sections that have no module of their own. Each key is declared once, as
//! a field with its doc; its default and comment are in `config/default.toml`
//! (a test holds the two together). `[kafka]` and `[redis]` are in their own
//! files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::*;

/// What the layers say, decoded: one field per table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Document {
    kafka: KafkaConfig,
    redis: RedisConfig,
    dedupe: DedupeConfig,
    event: EventSection,
    state: StateSection,
    dlq: DlqConfig,
    pipeline: PipelineConfig,
    metrics: MetricsConfig,
    shutdown: ShutdownConfig,
    log: LogConfig,
    changelog: ChangelogConfig,
    gateway: GatewayConfig,
    /// `[[effects]]`: none by default (every event merges its data).
    #[serde(default)]
    effects: Vec<super::effects::RawRule>,
}

impl Document {
    /// The checks that span several keys, section by section.
    pub(super) fn checked(self) -> Result<Config, ConfigError> {
        let effects = super::effects::validate(
            self.effects,
            self.state.order,
            &self.dedupe.dense_seq_topics,
        )?;
        Ok(Config {
            kafka: self.kafka.checked()?,
            redis: self.redis.checked()?,
            dedupe: self.dedupe.merged(),
            event: self.event.into_settings(),
            dlq: self.dlq,
            pipeline: self.pipeline,
            metrics: self.metrics,
            shutdown: self.shutdown,
            log: self.log,
            changelog: self.changelog,
            gateway: self.gateway,
            effects,
            explicit: Default::default(),
        })
    }
}

/// How the state hash meets order (`[state]`), for every topic of the
/// keyspace: an entity has one seq space whatever the topic, so one mode.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateSection {
    #[doc = key_doc!("state", "order")]
    #[serde(deserialize_with = "values::choice")]
    order: crate::effects::StateOrder,
}

/// The dedupe window, global and per topic (`[dedupe]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    #[doc = key_doc!("dedupe", "window")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub window: Duration,
    #[doc = key_doc!("dedupe", "topic_windows")]
    #[serde(default, deserialize_with = "values::positive_durations")]
    pub topic_windows: BTreeMap<String, Duration>,
    #[doc = key_doc!("dedupe", "windows")]
    #[serde(default, deserialize_with = "values::window_map")]
    windows: BTreeMap<String, Duration>,
    #[doc = key_doc!("dedupe", "dense_seq_topics")]
    pub dense_seq_topics: Vec<String>,
    #[doc = key_doc!("dedupe", "late_copies_accepted")]
    pub late_copies_accepted: Vec<String>,
}

impl DedupeConfig {
    /// The window that applies to events of `topic`.
    pub fn window_for(&self, topic: &str) -> Duration {
        self.topic_windows
            .get(topic)
            .copied()
            .unwrap_or(self.window)
    }

    /// `windows` folded into `topic_windows` (it wins for a topic in both).
    fn merged(mut self) -> DedupeConfig {
        let windows = std::mem::take(&mut self.windows);
        self.topic_windows.extend(windows);
        self
    }
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

/// `[event]`, decoded; the decoder's own settings type (`EventConfig`) sits
/// below the config in the module order, so it knows no file forms and this
/// section is turned into it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSection {
    #[doc = key_doc!("event", "format")]
    #[serde(deserialize_with = "values::choice")]
    format: EventFormat,
    #[doc = key_doc!("event", "id")]
    #[serde(deserialize_with = "values::pointer")]
    id: String,
    #[doc = key_doc!("event", "entity")]
    #[serde(deserialize_with = "values::pointer")]
    entity: String,
    #[doc = key_doc!("event", "seq")]
    #[serde(deserialize_with = "values::pointer")]
    seq: String,
    #[doc = key_doc!("event", "type")]
    #[serde(rename = "type", deserialize_with = "values::pointer")]
    kind: String,
    #[doc = key_doc!("event", "data")]
    #[serde(deserialize_with = "values::pointer")]
    data: String,
    #[doc = key_doc!("event", "ts")]
    #[serde(deserialize_with = "values::pointer")]
    ts: String,
    #[doc = key_doc!("event", "max_bytes")]
    #[serde(deserialize_with = "values::positive_int")]
    max_bytes: usize,
    #[doc = key_doc!("event", "duplicate_keys")]
    #[serde(deserialize_with = "values::choice")]
    duplicate_keys: DuplicateKeys,
    #[doc = key_doc!("event", "key_mismatch")]
    #[serde(deserialize_with = "values::choice")]
    key_mismatch: KeyMismatch,
}

impl EventSection {
    fn into_settings(self) -> EventConfig {
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

/// `[changelog]`: each applied change published to Kafka through an
/// outbox in Redis (docs/change-stream.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangelogConfig {
    #[doc = key_doc!("changelog", "topics")]
    pub topics: Vec<String>,
    #[doc = key_doc!("changelog", "topic")]
    #[serde(deserialize_with = "values::changelog_topic")]
    pub topic: String,
    #[doc = key_doc!("changelog", "max_outbox")]
    #[serde(deserialize_with = "values::positive_int")]
    pub max_outbox: usize,
}

impl ChangelogConfig {
    /// What `idem check` and `/readyz` say of a changelog topic the brokers
    /// do not know.
    pub fn missing_topic_text(&self, changelog: &str) -> String {
        format!(
            "changelog topic {changelog} does not exist: the changes wait in the outbox (consumption stops at changelog.max_outbox). Create it: `idem topics apply --dir topics` with `changelog = \"{changelog}\"` in its source topic's declaration (docs/change-stream.md)"
        )
    }

    /// The changelog topic of `source`.
    pub fn topic_for(&self, source: &str) -> String {
        self.topic.replace("{topic}", source)
    }

    /// With the changelog on: where it goes, and the rule of a rolling
    /// upgrade (docs/upgrading.md), which `idem run` logs and `idem check`
    /// prints (a member that does not register at all goes unseen).
    pub fn describe(&self, group: &str) -> Option<String> {
        if self.topics.is_empty() {
            return None;
        }
        let to: Vec<String> = self
            .topics
            .iter()
            .map(|t| format!("{t} -> {}", self.topic_for(t)))
            .collect();
        Some(format!(
            "changelog on ({}): every instance of group {group} must run 0.3.0 or later; an older one \
             applies changes without writing them, and no consumer could see the hole (the `group \
             versions` line names the members too old; docs/upgrading.md)",
            to.join(", ")
        ))
    }
}

/// `[gateway]`: `idem gateway`, the HTTP front door (docs/gateway.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[doc = key_doc!("gateway", "listen")]
    #[serde(deserialize_with = "values::listen")]
    pub listen: SocketAddr,
    #[doc = key_doc!("gateway", "topics")]
    pub topics: Vec<String>,
    #[doc = key_doc!("gateway", "tokens_file")]
    pub tokens_file: String,
    #[doc = key_doc!("gateway", "key_window")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub key_window: Duration,
    #[doc = key_doc!("gateway", "lease")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub lease: Duration,
    #[doc = key_doc!("gateway", "produce_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub produce_timeout: Duration,
    #[doc = key_doc!("gateway", "max_body_bytes")]
    #[serde(deserialize_with = "values::positive_int")]
    pub max_body_bytes: usize,
    #[doc = key_doc!("gateway", "rate_per_caller")]
    #[serde(deserialize_with = "values::positive_int")]
    pub rate_per_caller: usize,
    #[doc = key_doc!("gateway", "require_key")]
    pub require_key: bool,
    #[doc = key_doc!("gateway", "max_read_wait")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub max_read_wait: Duration,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[doc = key_doc!("metrics", "listen")]
    #[serde(deserialize_with = "values::listen")]
    pub listen: SocketAddr,
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[doc = key_doc!("shutdown", "drain_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub drain_timeout: Duration,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[doc = key_doc!("log", "format")]
    #[serde(deserialize_with = "values::choice")]
    pub format: LogFormat,
    #[doc = key_doc!("log", "level")]
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}
