//! `idem config show`: the effective configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{effective, Config};
use crate::outln;

/// Inspect the configuration idem would run with.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Every effective key, its value (secrets redacted) and the layer that
    /// set it: `default` (config/default.toml), `file` (--config) or `env`
    /// (an IDEM__… variable).
    ///
    /// Example: IDEM__KAFKA__GROUP_ID=orders idem config show | grep group_id
    #[command(verbatim_doc_comment)]
    Show {
        /// One JSON object per key instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    args: ConfigArgs,
    _config: Config,
    file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let ConfigAction::Show { json } = args.action;
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = effective(file.as_deref(), &env)?;
    if json {
        let rows: Vec<serde_json::Value> = settings
            .iter()
            .map(|s| serde_json::json!({"key": s.key, "value": s.value, "layer": s.layer.as_str()}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    for s in &settings {
        outln!("{:width$} = {:?}  # {}", s.key, s.value, s.layer.as_str());
    }
    Ok(ExitCode::SUCCESS)
}
