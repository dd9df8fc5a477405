//! `idem check`: preflight of everything `idem run` needs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::outln;
use crate::tools::check::{self, Status};

/// Check everything `idem run` needs, without consuming or writing anything
///
/// One line per check: the configuration (and its warnings), the brokers
/// (waiting up to --timeout, i.e. kafka.request_timeout, for an answer, and
/// whether they serve kafka.group_protocol),
/// each source topic and its dead-letter topic, the declared topics
/// (--topics DIR: partitions and settings), and Redis: reachable, eviction
/// policy, durability level, persistence.
///
/// Exit status: 0 every check passed (warnings allowed), 1 a check failed,
/// 2 the configuration is invalid (the error names the key).
///
/// Example:
///   IDEM__KAFKA__TOPICS=orders idem check --topics topics
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CheckArgs {
    /// Also compare the topics declared in this directory with the cluster.
    #[arg(long, value_name = "DIR")]
    topics: Option<PathBuf>,
    /// Print one JSON document instead of text: an array, one object per check.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: CheckArgs, config: Config) -> anyhow::Result<ExitCode> {
    let checks = check::run(
        &config,
        config.kafka.request_timeout,
        args.topics.as_deref(),
    )
    .await;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        let width = checks.iter().map(|c| c.what.len()).max().unwrap_or(0);
        for c in &checks {
            outln!("{:4} {:width$}  {}", c.status.as_str(), c.what, c.detail);
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        if !args.json {
            outln!("{failed} check(s) failed");
        }
        ExitCode::from(super::EXIT_FOUND)
    })
}
