//! The value forms of the settings, decoded by serde where a field is read
//! (`#[serde(deserialize_with = "…")]`): durations, counts, choices,
//! pointers, addresses, topic names. The `config` crate names the key of a
//! refused value, so no form here spells a key: each says what it got and
//! what it expected ("got \"soon\", expected a duration such as …").

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::de::{DeserializeOwned, Error, IntoDeserializer};
use serde::{Deserialize, Deserializer};

use super::{
    is_valid_topic_name, parse_durability, parse_duration, ConfigError, Durability, Secret,
};

pub(super) const DURATION_FORM: &str =
    "a duration such as \"250ms\", \"5s\", \"2m\", \"24h\" or \"7d\"";

/// The refusal of a value, as every form words it.
fn refuse<E: Error>(value: impl fmt::Display, expected: &str) -> E {
    E::custom(format!("got {:?}, expected {expected}", value.to_string()))
}

/// A refusal a shared check made (it names a key of its own): its value
/// and expected form, worded like every other.
pub(super) fn refused<E: Error>(e: ConfigError) -> E {
    match e {
        ConfigError::Invalid {
            value, expected, ..
        } => refuse(value, &expected),
        other => E::custom(other),
    }
}

/// A duration, zero allowed.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).ok_or_else(|| refuse(&text, DURATION_FORM))
}

/// A duration greater than zero.
pub fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    match parse_duration(&text) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(refuse(
            &text,
            &format!("{DURATION_FORM}, greater than zero"),
        )),
    }
}

/// Per topic, a duration greater than zero.
pub fn positive_durations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, Duration>, D::Error> {
    #[derive(Deserialize)]
    struct Positive(#[serde(deserialize_with = "positive_duration")] Duration);
    let map = std::collections::BTreeMap::<String, Positive>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, Positive(v))| (k, v)).collect())
}

/// A whole number greater than zero.
pub fn positive_int<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    usize::try_from(n)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| refuse(n, "a positive whole number"))
}

/// A whole number greater than zero, as a count.
pub fn positive_count<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroUsize, D::Error> {
    let n = positive_int(d)?;
    Ok(NonZeroUsize::new(n).expect("positive_int is positive"))
}

/// A share greater than 0 and at most 1.
pub fn share<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let x = f64::deserialize(d)?;
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(refuse(
            x,
            "a share greater than 0 and at most 1.0 (1.0 disables the budget)",
        ))
    }
}

/// One of an enum's names, decoded by its serde attributes; the expected
/// form is serde's list of the names (`` `text` or `json` ``).
pub fn choice<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    T::deserialize(text.as_str().into_deserializer()).map_err(|e: serde::de::value::Error| {
        let message = e.to_string();
        let names = message
            .split_once(", expected ")
            .map_or(message.as_str(), |(_, names)| names);
        refuse(&text, names)
    })
}

/// `ack`, `fsync` or `replicas:N`.
pub fn durability<'de, D: Deserializer<'de>>(d: D) -> Result<Durability, D::Error> {
    let text = String::deserialize(d)?;
    parse_durability(&text)
        .ok_or_else(|| refuse(&text, "\"ack\", \"fsync\" or \"replicas:N\" with N ≥ 1"))
}

/// A listen address.
pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|_| refuse(&text, "an address like 127.0.0.1:9464"))
}

/// A JSON pointer (RFC 6901).
pub fn pointer<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    if text.starts_with('/') {
        Ok(text)
    } else {
        Err(refuse(
            &text,
            "a JSON pointer (RFC 6901) such as \"/id\" or \"/meta/id\"",
        ))
    }
}

/// A string that is not blank.
pub fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim().is_empty() {
        Err(refuse(&text, "a non-empty string"))
    } else {
        Ok(text)
    }
}

/// An optional string: blank is none, the rest trimmed.
pub fn optional_trimmed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    Ok(Some(text.trim().to_string()).filter(|s| !s.is_empty()))
}

/// The brokers: `host:port` entries separated by commas.
pub fn brokers<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = non_empty(d)?;
    super::forms::broker_list("kafka.brokers", &text).map_err(refused)?;
    Ok(text)
}

/// At least one topic, each a valid Kafka topic name.
pub fn topics<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let topics = Vec::<String>::deserialize(d)?;
    if topics.is_empty() {
        return Err(refuse("[]", "a list of at least one topic name"));
    }
    if let Some(topic) = topics.iter().find(|t| !is_valid_topic_name(t)) {
        return Err(refuse(
            topic,
            "topic names of 1-249 characters from [a-zA-Z0-9._-]",
        ));
    }
    Ok(topics)
}

/// A dead-letter topic name, optionally with `{topic}` for the source topic.
pub fn dlq_topic<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    topic_template(d, "{topic}.dlq")
}

/// A changelog topic: as [`dlq_topic`].
pub fn changelog_topic<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    topic_template(d, "{topic}.changes")
}

/// A topic name, optionally with `{topic}` for the source topic.
fn topic_template<'de, D: Deserializer<'de>>(d: D, example: &str) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    if !text.contains("{topic}") && !is_valid_topic_name(&text)
        || !is_valid_topic_name(&text.replace("{topic}", "x"))
    {
        return Err(refuse(
            &text,
            &format!(
                "a topic name, optionally with {{topic}} for the source topic, e.g. \"{example}\""
            ),
        ));
    }
    Ok(text)
}

/// A key prefix: not blank, without the braces of a hash tag.
pub fn key_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = non_empty(d)?;
    if text.contains(['{', '}']) {
        return Err(refuse(
            &text,
            "a prefix without `{` or `}` (they would change the Redis Cluster hash tag)",
        ));
    }
    Ok(text)
}

/// Empty, or the path of a readable file.
pub fn readable_file<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let path = String::deserialize(d)?;
    if !path.is_empty() && !std::path::Path::new(&path).is_file() {
        return Err(refuse(&path, "the path of a readable file"));
    }
    Ok(path)
}

/// librdkafka's CA location: a file, a directory of CA files, or "probe"
/// (search the system's usual locations).
pub fn ca_location<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let path = String::deserialize(d)?;
    if path == "probe" || std::path::Path::new(&path).is_dir() {
        return Ok(path);
    }
    readable_file(path.into_deserializer())
}

/// `topic=duration,…` in one string (for the environment), each duration
/// greater than zero.
pub fn window_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, Duration>, D::Error> {
    let text = String::deserialize(d)?;
    let mut out = std::collections::BTreeMap::new();
    for (topic, window) in super::forms::window_map("dedupe.windows", &text).map_err(refused)? {
        let duration = positive_duration(window.as_str().into_deserializer())
            .map_err(|e: serde::de::value::Error| D::Error::custom(format!("({topic}) {e}")))?;
        out.insert(topic, duration);
    }
    Ok(out)
}

/// A secret given inline: empty is none.
pub fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let text = String::deserialize(d)?;
    Ok((!text.is_empty()).then(|| Secret::new(text)))
}
