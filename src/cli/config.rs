//! `idem config show`: the effective configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{effective, Config, Layer};
use crate::outln;

/// Inspect the configuration idem would run with.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Every effective key, its value and the layer that set it
    ///
    /// The layers: `default` (built in: `idem config defaults` prints them with
    /// their comments), `file` (--config), `env` (an IDEM__… variable) and
    /// `flag` (--timeout, which sets kafka.request_timeout for one run).
    /// Values are TOML (strings quoted, numbers and lists bare), so a line can
    /// be pasted into a config file. Secrets are redacted.
    ///
    /// Example: IDEM__KAFKA__GROUP_ID=orders idem config show | grep group_id
    #[command(verbatim_doc_comment)]
    Show {
        /// Print one JSON document instead of text: an array, one object per key
        /// (key, value, layer).
        #[arg(long)]
        json: bool,
    },
    /// The built-in defaults as a commented TOML file: every key, what it
    /// does, and its default (a starting point for --config)
    ///
    /// Example: idem config defaults > idem.toml
    #[command(verbatim_doc_comment)]
    Defaults,
}

pub async fn run(
    args: ConfigArgs,
    config: Config,
    file: Option<PathBuf>,
    timeout: Option<std::time::Duration>,
) -> anyhow::Result<ExitCode> {
    let json = match args.action {
        ConfigAction::Show { json } => json,
        ConfigAction::Defaults => {
            crate::outln!("{}", crate::config::DEFAULTS.trim_end());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut settings = effective(file.as_deref(), &env)?;
    if timeout.is_some() {
        // The global --timeout is the last layer for the tools' request timeout.
        for s in settings
            .iter_mut()
            .filter(|s| s.key == "kafka.request_timeout")
        {
            s.value = format!(
                "{:?}",
                crate::config::format_duration(config.kafka.request_timeout)
            );
            s.layer = Layer::Flag;
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = settings
            .iter()
            .map(|s| {
                // TOML's strings, numbers, booleans and lists read as JSON.
                let value = serde_json::from_str(&s.value)
                    .unwrap_or_else(|_| serde_json::Value::from(s.value.as_str()));
                serde_json::json!({"key": s.key, "value": value, "layer": s.layer.as_str()})
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    for s in &settings {
        outln!("{:width$} = {}  # {}", s.key, s.value, s.layer.as_str());
    }
    Ok(ExitCode::SUCCESS)
}
