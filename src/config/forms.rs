//! The textual forms of a few config values that a type cannot check
//! (broker lists, the per-topic window map given as one string), and the
//! checks several sections share (secrets from files, a client certificate
//! with its key). Pure functions with their truth tables in `tests.rs`.

use std::collections::BTreeMap;

use super::{is_valid_topic_name, ConfigError, Secret};

/// Checks `kafka.brokers`: `host:port[,host:port…]`, no scheme, a port in
/// 1-65535, an IPv6 address in brackets (`[::1]:9092`).
pub(super) fn broker_list(key: &str, text: &str) -> Result<(), ConfigError> {
    let expected = "host:port[,host:port…] with no scheme (e.g. 127.0.0.1:9092,kafka-2:9092)";
    for broker in text.split(',').map(str::trim) {
        if !is_broker_address(broker) {
            return Err(ConfigError::invalid(key, broker, expected));
        }
    }
    Ok(())
}

fn is_broker_address(broker: &str) -> bool {
    let Some((host, port)) = broker.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        }
    };
    port_ok && host_ok
}

/// Parses `dedupe.windows`, `topic=duration[,topic=duration…]` (e.g.
/// `orders-v2=72h,payments=24h`): the form for the environment, where keys
/// are lower-cased and cannot hold `-` or `.`.
pub(super) fn window_map(key: &str, text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut windows = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let pair = item
            .split_once('=')
            .map(|(t, w)| (t.trim(), w.trim()))
            .filter(|(t, _)| is_valid_topic_name(t));
        let Some((topic, window)) = pair else {
            return Err(ConfigError::invalid(
                key,
                item,
                "topic=duration pairs separated by commas (e.g. orders-v2=72h,payments=24h)",
            ));
        };
        windows.insert(topic.to_string(), window.to_string());
    }
    Ok(windows)
}

/// Warnings about windows set for topics that `kafka.topics` does not name
/// (the same file also serves `replay` and `reconcile`, so not an error),
/// with the environment's folding of `-` and `.` spotted.
pub(super) fn unused_window_warnings(
    windows: &BTreeMap<String, std::time::Duration>,
    topics: &[String],
) -> Vec<String> {
    let folded = |name: &str| name.to_lowercase().replace(['-', '.'], "_");
    windows
        .keys()
        .filter(|t| !topics.contains(t))
        .map(|t| match topics.iter().find(|c| folded(c) == folded(t)) {
            Some(meant) => format!(
                "dedupe window for `{t}` applies to no consumed topic; did you mean `{meant}`? \
                 Environment keys are lower-cased and cannot hold `-` or `.`: \
                 set IDEM__DEDUPE__WINDOWS={meant}=<duration> instead"
            ),
            None => format!(
                "dedupe window for `{t}` applies to no consumed topic (kafka.topics: {})",
                topics.join(",")
            ),
        })
        .collect()
}

/// The candidate nearest to `name` by edit distance, if near enough to be
/// a typo of it (a third of its length, at least 2 edits; 1 for a name of
/// three characters or fewer).
pub(super) fn nearest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let length = name.chars().count();
    let limit = if length <= 3 { 1 } else { (length / 3).max(2) };
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), c.as_str()))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A duration in the largest unit up to hours that divides it evenly
/// (`24h`, `72h`, `90s`, `250ms`; windows are usually written in hours), so
/// it reads back as itself.
pub fn format_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms > 0 && ms % per == 0 {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// A secret given as a file (`file_key` names it): its text, trailing
/// newline trimmed; none when the key is empty.
pub(super) fn secret_file(file_key: &str, file: &str) -> Result<Option<Secret>, ConfigError> {
    if file.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::invalid(
            file_key,
            file,
            &format!("a readable file holding the secret ({e})"),
        )
    })?;
    Ok(Some(Secret(
        text.trim_end_matches(['\n', '\r']).to_string(),
    )))
}

/// A client certificate and its key for mutual TLS: both or neither (each
/// already a readable file). Each argument is (key name, path).
pub(super) fn both_or_neither(cert: (&str, &str), key: (&str, &str)) -> Result<(), ConfigError> {
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
        _ => Ok(()),
    }
}
