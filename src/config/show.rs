//! The layers of the configuration and, for `idem config show`, every
//! effective key with the layer that set it, secrets redacted.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{redact_url, Config, ConfigError, DEFAULTS};

/// Which layers a builder reads.
pub(super) struct Layers {
    defaults: bool,
    file: bool,
    env: bool,
}

impl Layers {
    pub(super) const ALL: Layers = Layers {
        defaults: true,
        file: true,
        env: true,
    };
    /// What the user set: the file and the environment, no defaults.
    pub(super) const USER: Layers = Layers {
        defaults: false,
        file: true,
        env: true,
    };
    /// The built-in defaults alone.
    pub(super) const DEFAULTS: Layers = Layers {
        defaults: true,
        file: false,
        env: false,
    };

    /// The config crate's builder over the chosen layers, later ones winning.
    pub(super) fn builder(
        &self,
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<config::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
        let mut builder = config::Config::builder();
        if self.defaults {
            builder =
                builder.add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        }
        if let (true, Some(path)) = (self.file, file) {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        if self.env {
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
                    .with_list_parse_key("dedupe.dense_seq_topics")
                    .with_list_parse_key("dedupe.late_copies_accepted")
                    .with_list_parse_key("changelog.topics")
                    .with_list_parse_key("gateway.topics")
                    .try_parsing(true)
                    .source(Some(idem_env)),
            );
        }
        Ok(builder)
    }

    /// Every leaf key these layers set, dotted, with its value as text.
    pub(super) fn flat(
        &self,
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let table = self
            .builder(file, env)?
            .build()
            .and_then(|c| c.try_deserialize::<config::Map<String, config::Value>>())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let mut flat = BTreeMap::new();
        for (key, value) in table {
            flatten(&key, value, &mut flat);
        }
        Ok(flat)
    }
}

fn flatten(key: &str, value: config::Value, out: &mut BTreeMap<String, String>) {
    match value.kind {
        config::ValueKind::Table(table) => {
            for (k, v) in table {
                flatten(&format!("{key}.{k}"), v, out);
            }
        }
        // An array of tables (`[[effects]]`, a counter list): one key per
        // element, `effects[0].topic`, so each value stays readable.
        config::ValueKind::Array(items)
            if items
                .iter()
                .any(|v| matches!(v.kind, config::ValueKind::Table(_))) =>
        {
            for (i, v) in items.into_iter().enumerate() {
                flatten(&format!("{key}[{i}]"), v, out);
            }
        }
        kind => {
            out.insert(key.to_string(), toml_text(&kind));
        }
    }
}

/// A leaf value as TOML writes it: strings quoted, numbers and booleans
/// bare, lists in brackets, so `idem config show` can be pasted into a file.
fn toml_text(kind: &config::ValueKind) -> String {
    use config::ValueKind;
    match kind {
        ValueKind::String(s) => quoted(s),
        ValueKind::Nil => quoted(""),
        ValueKind::Float(v) if v.fract() == 0.0 && v.is_finite() => format!("{v:.1}"),
        ValueKind::Array(items) => {
            let items: Vec<String> = items.iter().map(|v| toml_text(&v.kind)).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A TOML basic string (its escapes are JSON's for every character idem's
/// values hold).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Where an effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Default,
    File,
    Env,
    /// A command-line flag (`--timeout`).
    Flag,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Default => "default",
            Layer::File => "file",
            Layer::Env => "env",
            Layer::Flag => "flag",
        }
    }
}

/// One effective key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub layer: Layer,
}

/// Every effective key (after validation: a bad config is the error), the
/// layer that set it, and its value with secrets redacted.
pub fn effective(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<Vec<Setting>, ConfigError> {
    Config::load(file, env)?;
    let merged = Layers::ALL.flat(file, env)?;
    let from_file = Layers {
        defaults: false,
        file: true,
        env: false,
    }
    .flat(file, env)?;
    let from_env = Layers {
        defaults: false,
        file: false,
        env: true,
    }
    .flat(file, env)?;
    Ok(merged
        .into_iter()
        .map(|(key, value)| {
            let layer = if from_env.contains_key(&key) {
                Layer::Env
            } else if from_file.contains_key(&key) {
                Layer::File
            } else {
                Layer::Default
            };
            let value = redacted(&key, value);
            Setting { key, value, layer }
        })
        .collect())
}

/// Passwords and secrets as `***` (when set), URLs without their password
/// (`value` is TOML text, [`toml_text`]).
fn redacted(key: &str, value: String) -> String {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let secret = (leaf.contains("password") || leaf.contains("secret")) && !leaf.ends_with("_file");
    if secret && value != quoted("") {
        quoted("***")
    } else if key == "redis.url" {
        let url: String = serde_json::from_str(&value).unwrap_or(value);
        quoted(&redact_url(&url))
    } else {
        value
    }
}
