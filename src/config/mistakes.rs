//! Decoding the layers so that every mistake is reported at once, the way a
//! person fixes them: each with where its value was set (the file and line,
//! or the environment variable) and, for an unknown key, the nearest known
//! one.
//!
//! serde stops at the first error, so the decoder runs again after each:
//! an unknown key is taken out, a bad value is put back to its default,
//! until the document decodes or a mistake cannot be set aside (then what
//! was found so far is the answer).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::sections::Document;
use super::{forms, ConfigError};

/// One mistake and where its value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mistake {
    pub error: ConfigError,
    /// `idem.toml:12`, `IDEM__KAFKA__TOPIC`, or `None` for a value of no
    /// layer the operator wrote.
    pub place: Option<String>,
}

impl fmt::Display for Mistake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            Some(place) => write!(f, "{} (set in {place})", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

/// Past this many, the rest is not worth listing.
const MAX_MISTAKES: usize = 32;

/// Where the layers came from, to say where a value was set.
pub(super) struct Sources<'a> {
    pub file: Option<&'a Path>,
    /// The file's text, to find the line of a key.
    pub text: Option<&'a str>,
    pub env: &'a HashMap<String, String>,
    /// The built-in defaults, to put a refused value back to.
    pub defaults: &'a config::Value,
}

/// The document of `root`, or every mistake found in it.
pub(super) fn decode(
    mut root: config::Value,
    sources: &Sources<'_>,
) -> Result<(Document, config::Value), Vec<Mistake>> {
    let mut mistakes: Vec<Mistake> = Vec::new();
    loop {
        let error = match Document::deserialize(root.clone()) {
            Ok(document) if mistakes.is_empty() => return Ok((document, root)),
            Ok(_) => return Err(sorted(mistakes)),
            Err(e) => e,
        };
        let (parent, message) = split(error);
        let (key, error, set_aside) = match unknown_field(&message) {
            Some((field, known)) => {
                let key = join(parent.as_deref(), &field);
                let hint = forms::nearest(&field, &known).map(|n| join(parent.as_deref(), n));
                let place = place_of(&root, &key, sources);
                let removed = remove(&mut root, &key).is_some();
                let error = ConfigError::Unknown {
                    key: key.clone(),
                    hint,
                };
                (key, Mistake { error, place }, removed)
            }
            None => {
                let Some(key) = parent else {
                    mistakes.push(Mistake {
                        error: ConfigError::Load(message),
                        place: None,
                    });
                    return Err(sorted(mistakes));
                };
                let place = place_of(&root, &key, sources);
                let set_aside = match lookup(sources.defaults, &key) {
                    Some(default) => replace(&mut root, &key, default.clone()),
                    None => remove(&mut root, &key).is_some(),
                };
                let error = ConfigError::Refused {
                    key: key.clone(),
                    message,
                };
                (key, Mistake { error, place }, set_aside)
            }
        };
        let repeated = mistakes.iter().any(|m| m.error.key() == Some(&key));
        if !repeated {
            mistakes.push(error);
        }
        if !set_aside || repeated || mistakes.len() >= MAX_MISTAKES {
            return Err(sorted(mistakes));
        }
    }
}

/// Where the value at `key` of `root` was set, when a person set it.
pub(super) fn place_of(root: &config::Value, key: &str, sources: &Sources<'_>) -> Option<String> {
    let origin = lookup(root, key)?.origin()?;
    if origin == "the environment" {
        let wanted = format!("IDEM__{}", key.replace('.', "__")).to_uppercase();
        return Some(
            sources
                .env
                .keys()
                .find(|k| k.to_uppercase() == wanted)
                .cloned()
                .unwrap_or(wanted),
        );
    }
    // The file as the operator named it (the origin is a path made relative).
    let file = sources
        .file
        .map_or_else(|| origin.to_string(), |p| p.display().to_string());
    match sources.text.and_then(|t| line_of(t, key)) {
        Some(line) => Some(format!("{file}:{line}")),
        None => Some(file),
    }
}

fn sorted(mut mistakes: Vec<Mistake>) -> Vec<Mistake> {
    mistakes.sort_by(|a, b| a.error.key().cmp(&b.error.key()));
    mistakes
}

/// The key an error is about (`None`: the root) and what it says.
fn split(error: config::ConfigError) -> (Option<String>, String) {
    match error {
        config::ConfigError::At { error, key, .. } => (key, error.to_string()),
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (key, format!("got {unexpected}, expected {expected}")),
        other => (None, other.to_string()),
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`": the field and
/// the known ones.
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let known = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((field.to_string(), known))
}

fn join(parent: Option<&str>, field: &str) -> String {
    match parent {
        Some(p) => format!("{p}.{field}"),
        None => field.to_string(),
    }
}

/// A key path as the config crate spells it: `effects[0].counters[1].field`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(key: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let name = part.split('[').next().unwrap_or("");
        if !name.is_empty() {
            out.push(Segment::Key(name.trim_matches('"').to_string()));
        }
        for index in part.split('[').skip(1) {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

fn lookup<'a>(root: &'a config::Value, key: &str) -> Option<&'a config::Value> {
    let mut value = root;
    for segment in segments(key) {
        value = match (&value.kind, segment) {
            (config::ValueKind::Table(t), Segment::Key(k)) => t.get(&k)?,
            (config::ValueKind::Array(a), Segment::Index(i)) => a.get(i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// The table or array holding `key`, and the last segment.
fn parent_mut<'a>(
    root: &'a mut config::Value,
    key: &str,
) -> Option<(&'a mut config::Value, Segment)> {
    let mut path = segments(key);
    let last = path.pop()?;
    let mut value = root;
    for segment in path {
        value = match (&mut value.kind, segment) {
            (config::ValueKind::Table(t), Segment::Key(k)) => t.get_mut(&k)?,
            (config::ValueKind::Array(a), Segment::Index(i)) => a.get_mut(i)?,
            _ => return None,
        };
    }
    Some((value, last))
}

fn remove(root: &mut config::Value, key: &str) -> Option<config::Value> {
    let (parent, last) = parent_mut(root, key)?;
    match (&mut parent.kind, last) {
        (config::ValueKind::Table(t), Segment::Key(k)) => t.remove(&k),
        (config::ValueKind::Array(a), Segment::Index(i)) if i < a.len() => Some(a.remove(i)),
        _ => None,
    }
}

fn replace(root: &mut config::Value, key: &str, value: config::Value) -> bool {
    let Some((parent, last)) = parent_mut(root, key) else {
        return false;
    };
    match (&mut parent.kind, last) {
        (config::ValueKind::Table(t), Segment::Key(k)) => t.insert(k, value).is_some(),
        _ => false,
    }
}

/// The line (1-based) of a TOML text that sets `key`: a `key = …` line
/// under its table header (`[kafka]`, the n-th `[[effects]]`), a dotted key,
/// or the header of a table `key` names; else the line setting the longest
/// part of it (a value inside an inline table or array).
fn line_of(text: &str, key: &str) -> Option<usize> {
    let wanted = segments(key);
    let mut table: Vec<Segment> = Vec::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut best: Option<(usize, usize)> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let path = if let Some(name) = line.strip_prefix("[[") {
            let name = name.split("]]").next().unwrap_or("").trim();
            let count = arrays.entry(name.to_string()).or_insert(0);
            table = segments(name);
            table.push(Segment::Index(*count));
            *count += 1;
            table.clone()
        } else if let Some(name) = line.strip_prefix('[') {
            table = segments(name.split(']').next().unwrap_or("").trim());
            table.clone()
        } else if let Some((k, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            let mut path = table.clone();
            path.extend(segments(k.trim()));
            path
        } else {
            continue;
        };
        let common = path.iter().zip(&wanted).take_while(|(a, b)| a == b).count();
        if common == wanted.len() && path.len() == wanted.len() {
            return Some(n + 1);
        }
        if common == path.len() && common > best.map_or(0, |b| b.0) {
            best = Some((common, n + 1));
        }
    }
    best.map(|(_, line)| line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_under_its_header_its_array_entry_or_dotted() {
        let text = "# c\n[kafka]\nbrokers = \"x\"\ntopic = [\"a\"]\n\n[[effects]]\ntopic = \"a\"\n[[effects]]\ntopic = \"b\"\ncounters = [{ field = \"amount\" }]\n[redis]\nmode.x = 1\n";
        assert_eq!(line_of(text, "kafka.topic"), Some(4));
        assert_eq!(line_of(text, "effects[1].topic"), Some(9));
        assert_eq!(line_of(text, "effects[0]"), Some(6));
        assert_eq!(line_of(text, "effects[1].counters[0].field"), Some(10));
        assert_eq!(line_of(text, "redis.mode.x"), Some(12));
        assert_eq!(line_of(text, "dedupe.window"), None);
    }

    #[test]
    fn serde_unknown_field_messages_give_the_field_and_the_known_ones() {
        assert_eq!(
            unknown_field("unknown field `topic`, expected one of `brokers`, `topics`"),
            Some(("topic".into(), vec!["brokers".into(), "topics".into()]))
        );
        assert_eq!(
            unknown_field("unknown field `x`, expected `y`"),
            Some(("x".into(), vec!["y".into()]))
        );
        assert_eq!(unknown_field("invalid type"), None);
    }
}
