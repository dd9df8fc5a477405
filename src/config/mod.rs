//! Typed settings: `config/default.toml` (compiled in), an optional file and
//! `IDEM__SECTION__KEY` variables, validated once at start.
//!
//! Guarantee: a `Config` that exists is valid. Every rejected value names its
//! key, the value and the expected form, so the operator knows what to fix.
//!
//! Layout: this file holds the loader, the errors and the forms shared by
//! sections; `kafka.rs` and `redis.rs` their sections, `sections.rs` the
//! document and the small sections, `values.rs` the value forms, `effects.rs`
//! the `[[effects]]` rules. Every key is a field of its section's struct,
//! decoded by serde, then checked across keys once (`checked`).

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use crate::event::settings::{EventConfig, EventFormat, FieldMap};

/// A key's doc, written once: its comment in config/default.toml, which
/// build.rs copies to a file per key. A field names its own key (a test
/// holds each to its section and name; a key without a comment does not build).
macro_rules! key_doc {
    ($section:literal, $key:literal) => {
        include_str!(concat!(
            env!("OUT_DIR"),
            "/config-docs/",
            $section,
            ".",
            $key,
            ".md"
        ))
    };
}

mod effects;
mod forms;
mod kafka;
mod mistakes;
mod policy;
mod redis;
mod sections;
mod show;
#[cfg(test)]
mod tests;
mod values;

pub use forms::format_duration;
pub use kafka::{GroupProtocol, KafkaConfig, OffsetReset, SaslMechanism, SecurityProtocol};
pub use mistakes::Mistake;
pub use policy::{Policies, TopicPolicy};
pub use redis::{Durability, RedisConfig, RedisMode};
pub use sections::{
    ChangelogConfig, DedupeConfig, GatewayConfig, LogConfig, LogFormat, MetricsConfig,
    ShutdownConfig,
};
use show::Layers;
pub use show::{effective, Layer, Setting};

/// The built-in defaults: config/default.toml, commented (`idem config defaults`).
pub const DEFAULTS: &str = include_str!("../../config/default.toml");

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
    /// A value its decoder refused (`got …, expected …`), at the key the
    /// layers read it from.
    #[error("config key `{key}`: {message}")]
    Refused { key: String, message: String },
    /// A key idem does not read, with the nearest one it does.
    #[error("config key `{key}` is not one idem knows{}", unknown_hint(.hint))]
    Unknown { key: String, hint: Option<String> },
    /// The layers could not be read or merged (an unreadable file, bad TOML).
    #[error("config: {0}")]
    Load(String),
    /// Every mistake the layers hold, each with where it was set.
    #[error("{}", describe_mistakes(.0))]
    Mistakes(Vec<Mistake>),
}

fn unknown_hint(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!(": did you mean `{h}`?"),
        None => " (config/default.toml lists every key)".to_string(),
    }
}

fn describe_mistakes(mistakes: &[Mistake]) -> String {
    match mistakes {
        [one] => one.to_string(),
        many => {
            let lines: Vec<String> = many.iter().map(|m| format!("  {m}")).collect();
            format!(
                "{} mistakes in the configuration:\n{}",
                many.len(),
                lines.join("\n")
            )
        }
    }
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
            ConfigError::Invalid { key, .. }
            | ConfigError::Refused { key, .. }
            | ConfigError::Unknown { key, .. } => Some(key),
            ConfigError::Mistakes(m) => m.first().and_then(|m| m.error.key()),
            ConfigError::Load(_) => None,
        }
    }

    /// The (first) mistake itself, without where it was set.
    pub fn first(&self) -> &ConfigError {
        match self {
            ConfigError::Mistakes(m) if !m.is_empty() => m[0].error.first(),
            other => other,
        }
    }

    /// The mistakes as one error: a lone one without a place as itself.
    fn from_mistakes(mut mistakes: Vec<Mistake>) -> Self {
        if mistakes.len() == 1 && mistakes[0].place.is_none() {
            return mistakes.remove(0).error;
        }
        ConfigError::Mistakes(mistakes)
    }

    /// The `config` crate's error as idem's: a refused value keeps the key
    /// it names (typed: `At`/`Type` carry it), anything else is a load error.
    fn from_layers(e: config::ConfigError) -> Self {
        match e {
            config::ConfigError::At {
                error,
                key: Some(key),
                ..
            } => ConfigError::Refused {
                key,
                message: error.to_string(),
            },
            config::ConfigError::Type {
                unexpected,
                expected,
                key: Some(key),
                ..
            } => ConfigError::Refused {
                key,
                message: format!("got {unexpected}, expected {expected}"),
            },
            other => ConfigError::Load(other.to_string()),
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

/// Dead-letter settings (`[dlq]`), decoded as they are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    #[doc = key_doc!("dlq", "topic")]
    #[serde(deserialize_with = "values::dlq_topic")]
    pub topic: String,
    #[doc = key_doc!("dlq", "max_ratio")]
    #[serde(deserialize_with = "values::share")]
    pub max_ratio: f64,
    #[doc = key_doc!("dlq", "ratio_window")]
    #[serde(deserialize_with = "values::positive_int")]
    pub ratio_window: usize,
    #[doc = key_doc!("dlq", "send_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub send_timeout: Duration,
}

impl DlqConfig {
    /// The dead-letter topic of `source`.
    pub fn topic_for(&self, source: &str) -> String {
        self.topic.replace("{topic}", source)
    }
}

/// Batching and retry settings of the processing loop (`[pipeline]`),
/// decoded as they are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    #[doc = key_doc!("pipeline", "batch_max_events")]
    #[serde(deserialize_with = "values::positive_count")]
    pub batch_max_events: NonZeroUsize,
    #[doc = key_doc!("pipeline", "batch_linger")]
    #[serde(deserialize_with = "values::duration")]
    pub batch_linger: Duration,
    #[doc = key_doc!("pipeline", "events_per_script")]
    #[serde(deserialize_with = "values::positive_count")]
    pub events_per_script: NonZeroUsize,
    #[doc = key_doc!("pipeline", "retry_initial_backoff")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub retry_initial_backoff: Duration,
    #[doc = key_doc!("pipeline", "retry_max_backoff")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub retry_max_backoff: Duration,
    #[doc = key_doc!("pipeline", "stall_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
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
    pub metrics: MetricsConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub changelog: ChangelogConfig,
    pub gateway: GatewayConfig,
    /// What events do, per topic and type (docs/effects.md).
    pub effects: crate::effects::EffectsConfig,
    /// The keys a file or the environment set (the rest are defaults).
    pub explicit: std::collections::BTreeSet<String>,
}

impl Config {
    /// Loads the layers: built-in defaults, then `file` if given, then the
    /// `IDEM__…` entries of `env` (passed in so tests need not touch the process env).
    /// Every mistake is reported at once, each with where it was set.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let merged = Layers::ALL
            .builder(file, env)?
            .build()
            .map_err(ConfigError::from_layers)?;
        let defaults = Layers::DEFAULTS
            .builder(None, env)?
            .build()
            .map_err(ConfigError::from_layers)?;
        let text = file.and_then(|p| std::fs::read_to_string(p).ok());
        let sources = mistakes::Sources {
            file,
            text: text.as_deref(),
            env,
            defaults: &defaults.cache,
        };
        let (document, root) =
            mistakes::decode(merged.cache, &sources).map_err(ConfigError::from_mistakes)?;
        let mut config = document.checked().map_err(|error| {
            let place = error
                .key()
                .and_then(|k| mistakes::place_of(&root, k, &sources));
            ConfigError::from_mistakes(vec![Mistake { error, place }])
        })?;
        config.explicit = Layers::USER.flat(file, env)?.into_keys().collect();
        Ok(config)
    }

    /// Settings that are valid but probably not what was meant; `idem run`
    /// logs each at WARN. A window for a topic not consumed changes what no
    /// event does (and the same file may serve `replay --topic` on another
    /// topic), so it only warns; see [`Config::refusals`].
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings =
            forms::unused_window_warnings(&self.dedupe.topic_windows, &self.kafka.topics);
        warnings.extend(self.kafka.group_protocol_warnings(&self.explicit));
        warnings.extend(self.late_copy_warnings());
        warnings
    }

    /// One warning per consumed topic whose events count (counters, a
    /// ledger, sets) without a dense seq to recognise a copy after the
    /// window, unless `dedupe.late_copies_accepted` names it.
    fn late_copy_warnings(&self) -> Vec<String> {
        let counting: std::collections::BTreeSet<&String> = self
            .effects
            .rules
            .iter()
            .filter(|r| !r.counters.is_empty() || r.ledger.is_some() || !r.sets.is_empty())
            .map(|r| &r.topic)
            .filter(|t| !self.dedupe.dense_seq_topics.contains(t))
            .filter(|t| !self.dedupe.late_copies_accepted.contains(t))
            .collect();
        counting
            .into_iter()
            .map(|topic| {
                format!(
                    "topic {topic} has counters, a ledger or sets and is not in dedupe.dense_seq_topics: \
                     a producer's copy that arrives after its dedupe window ({}) counts again. \
                     Declaring it in dedupe.dense_seq_topics recognises such a copy forever by its seq, \
                     but is only right when its producers number each entity's events 1, 2, 3, … \
                     (otherwise every gap closes and dead-letters `seq_gap_closed`). If copies never \
                     come that late, accept it: dedupe.late_copies_accepted = [\"{topic}\"] \
                     (docs/effects.md, \"Copies after the window\")",
                    format_duration(self.dedupe.window_for(topic))
                )
            })
            .collect()
    }

    /// Settings naming a topic that idem does not consume where that would
    /// change what an event does (an `[[effects]]` rule, a dense-seq topic):
    /// a typo there silently merges deposits into the state instead of
    /// counting them, so `idem run` refuses to start and `idem check` fails.
    /// Each names its key, the consumed topics and the nearest one.
    pub fn refusals(&self) -> Vec<String> {
        let topics = &self.kafka.topics;
        let refuse = |key: String, topic: &str| {
            let hint = forms::nearest(topic, topics)
                .map(|t| format!("did you mean `{t}`? "))
                .unwrap_or_default();
            format!(
                "{key} = `{topic}` names a topic idem does not consume (kafka.topics: {}): {hint}\
                 its events would be processed without it. Fix the name or add the topic to kafka.topics",
                topics.join(",")
            )
        };
        let mut refusals: Vec<String> = self
            .effects
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| !topics.contains(&r.topic))
            .map(|(i, r)| refuse(format!("effects[{i}].topic"), &r.topic))
            .collect();
        refusals.extend(
            self.dedupe
                .dense_seq_topics
                .iter()
                .filter(|t| !topics.contains(t))
                .map(|t| refuse("dedupe.dense_seq_topics".into(), t)),
        );
        refusals.extend(
            self.changelog
                .topics
                .iter()
                .filter(|t| !topics.contains(t))
                .map(|t| refuse("changelog.topics".into(), t)),
        );
        refusals.extend(self.changelog.topics.iter().filter_map(|t| {
            let out = self.changelog.topic_for(t);
            (topics.contains(&out) || out == self.dlq.topic_for(t)).then(|| {
                format!(
                    "changelog.topic = `{}` makes `{out}` the changelog of `{t}`, but `{out}` is \
                     consumed or is a dead-letter topic: idem would read its own changes back. \
                     Use another name, e.g. \"{{topic}}.changes\"",
                    self.changelog.topic
                )
            })
        }));
        refusals
    }

    /// Each consumed topic with its dedupe window, e.g. `orders=24h,payments=72h`.
    pub fn effective_windows(&self) -> String {
        self.kafka
            .topics
            .iter()
            .map(|t| format!("{t}={}", format_duration(self.dedupe.window_for(t))))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Loads the built-in defaults only (useful for tools and tests).
    pub fn defaults() -> Config {
        Config::load(None, &HashMap::new()).expect("built-in defaults are valid")
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

/// A URL, or a comma-separated list of them (a cluster's seed nodes), with
/// any password replaced: safe for logs and errors.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}
