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
        )?
        .with_changelog(&self.changelog.topics);
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
    /// How a late event meets the state hash, for the whole keyspace (redis.key_prefix).
    /// "per_entity": an event not newer than its entity's seq writes no state (stale).
    /// "per_field": each field keeps the seq that wrote it (hash <base>:field_seqs), so an
    /// older event still writes the fields no newer event wrote; a replace or delete removes
    /// older fields. The state then equals in-order application whatever the arrival order.
    /// Ordered custom effects are refused in this mode. See docs/effects.md.
    #[serde(deserialize_with = "values::choice")]
    order: crate::effects::StateOrder,
}

/// The dedupe window, global and per topic (`[dedupe]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// How long an event id is remembered to reject redeliveries as duplicates.
    /// Ids are remembered for at least this long and at most twice this long.
    /// Events older than the window are still caught by the per-entity sequence (stale).
    #[serde(deserialize_with = "values::positive_duration")]
    pub window: Duration,
    /// Per-topic windows, overriding `window` for the named topics, e.g.
    ///   payments = "72h"
    /// A window for a topic that kafka.topics does not name is logged at WARN.
    #[serde(default, deserialize_with = "values::positive_durations")]
    pub topic_windows: BTreeMap<String, Duration>,
    /// Per-topic windows as one string, for the environment (whose keys are
    /// lower-cased and cannot hold `-` or `.`), e.g.
    ///   IDEM__DEDUPE__WINDOWS="orders-v2=72h,payments=24h"
    /// A topic named here wins over the same topic in [dedupe.topic_windows].
    #[serde(default, deserialize_with = "values::window_map")]
    windows: BTreeMap<String, Duration>,
    /// Topics whose events number each entity's seqs densely (1, 2, 3, ... without
    /// gaps: an outbox, a per-account counter), e.g. ["payments"]. For them a seq
    /// decided once is recognised forever, so a copy at a new offset after the window
    /// is a duplicate, and another event at a decided seq a conflict (seq_reused).
    /// See docs/guarantees.md, "Dense seqs".
    pub dense_seq_topics: Vec<String>,
    /// Topics with counters, ledgers or sets whose copies arriving after the dedupe
    /// window you accept to count again (the producers never re-send that late),
    /// e.g. ["deposits"]. Silences the warning `idem check` and `idem run` give for
    /// each topic with such effects that is not in dense_seq_topics.
    /// See docs/effects.md, "Copies after the window".
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
    /// Source topics whose applied changes are published, e.g. ["orders"]; empty: none.
    /// The guard script writes each change (applied, late or partial; never a duplicate,
    /// a stale event or a conflict) to an outbox in Redis in the same step as the change,
    /// and the relay publishes it to the topic's changelog. Turn it on only once every
    /// instance of the group runs a version that knows it (docs/upgrading.md).
    pub topics: Vec<String>,
    /// The changelog topic of each; "{topic}" is replaced by the source topic.
    /// Declare it in topics/ (changelog = ...).
    #[serde(deserialize_with = "values::changelog_topic")]
    pub topic: String,
    /// The most entries an outbox holds before consumption waits for the relay (the
    /// changelog topic is missing, the brokers refuse): one outbox on a standalone
    /// Redis, one per slot on a cluster. /readyz says so meanwhile; a batch may pass
    /// it by its own changes. Redis memory, not the log, is what this bounds.
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

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    /// Loopback by default; set "0.0.0.0:9464" to expose it.
    #[serde(deserialize_with = "values::listen")]
    pub listen: SocketAddr,
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, how long in-flight batches may take to finish before the
    /// final commit. What is not finished is not committed (and is redelivered later).
    #[serde(deserialize_with = "values::positive_duration")]
    pub drain_timeout: Duration,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "text" for people, "json" for log pipelines.
    #[serde(deserialize_with = "values::choice")]
    pub format: LogFormat,
    /// Default level filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}
