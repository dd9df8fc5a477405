//! `idem topics`: topics as code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::tools::topics::{self, TopicState};

/// Create and check the topics declared in TOML files (see topics/)
///
/// Examples:
///   idem topics apply --dir topics --dry-run
///   idem topics apply --dir topics
///   idem topics check --dir topics --json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct TopicsArgs {
    #[command(subcommand)]
    action: TopicsAction,
    /// Folder of *.toml topic definitions.
    #[arg(long, global = true, default_value = "topics")]
    dir: PathBuf,
    /// Print one JSON document instead of text: an array, one object per topic.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
#[command(verbatim_doc_comment)]
enum TopicsAction {
    /// Create what is missing and change what differs, after showing the plan
    ///
    /// Creates missing topics (and their dead-letter topics), adds missing
    /// partitions and sets declared settings that differ.
    ///
    /// Never deletes a topic; cannot shrink one (Kafka cannot remove
    /// partitions: the plan says so and the exit status is 1). A settings
    /// change keeps the topic's other explicit settings.
    ///
    /// Plan lines: `+` create, `~` change, `!` cannot change, `=` up to date.
    ///
    /// Example:
    ///   idem topics apply --dir topics --dry-run
    #[command(verbatim_doc_comment)]
    Apply {
        /// Only show the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Report drift between the declarations and the cluster (exit 1 on drift)
    ///
    /// Example:
    ///   idem topics check --dir topics
    #[command(verbatim_doc_comment)]
    Check,
}

pub async fn run(args: TopicsArgs, config: Config) -> anyhow::Result<ExitCode> {
    let specs = topics::load_dir(&args.dir)?;
    let kafka = &config.kafka;
    match args.action {
        TopicsAction::Apply { dry_run } => {
            let plan = topics::apply(kafka, &specs, !dry_run).await?;
            let cannot = plan
                .iter()
                .any(|(_, state)| matches!(state, TopicState::CannotShrink { .. }));
            if args.json {
                crate::outln!("{}", json_rows(&plan)?);
            } else {
                for (name, state) in &plan {
                    crate::outln!("{}", plan_line(name, state));
                }
            }
            if dry_run {
                eprintln!("dry run: nothing changed; run without --dry-run to apply");
            }
            Ok(if cannot {
                ExitCode::from(super::EXIT_FOUND)
            } else {
                ExitCode::SUCCESS
            })
        }
        TopicsAction::Check => {
            let report = topics::check(kafka, &specs).await?;
            if args.json {
                crate::outln!("{}", json_rows(&report)?);
                let drift = report.iter().any(|(_, s)| *s != TopicState::UpToDate);
                return Ok(if drift {
                    ExitCode::from(super::EXIT_FOUND)
                } else {
                    ExitCode::SUCCESS
                });
            }
            let mut drift = false;
            for (name, state) in report {
                match state {
                    TopicState::UpToDate => crate::outln!("{name}: ok"),
                    TopicState::Missing => {
                        drift = true;
                        crate::outln!("{name}: missing (run `idem topics apply`)");
                    }
                    TopicState::PartitionDrift { declared, actual } => {
                        drift = true;
                        crate::outln!("{name}: {actual} partitions, declared {declared}");
                    }
                    TopicState::ConfigDrift {
                        key,
                        declared,
                        actual,
                    } => {
                        drift = true;
                        crate::outln!("{name}: {key} = {actual:?}, declared {declared:?}");
                    }
                    other => crate::outln!("{name}: {other:?}"),
                }
            }
            Ok(if drift {
                ExitCode::from(super::EXIT_FOUND)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// What adding partitions does to the entities (said with each such plan
/// line; docs/operations.md, "Adding partitions").
const PARTITIONS_MOVE_KEYS: &str =
    "note: keys then map to other partitions. An entity whose key moves has its new events read\n\
in parallel with its older ones still unread in the old partition, so its order across the move\n\
holds only for commutative effects (counters, ledgers, sets), under state.order = \"per_field\",\n\
and on dense topics (dedupe.dense_seq_topics): elsewhere an older event read after a newer one\n\
is `stale` and its fields are lost. To keep every entity's order, stop the producers and let idem\n\
reach lag 0 before adding partitions (docs/operations.md, \"Adding partitions\").";

/// One line of `topics apply`'s plan.
fn plan_line(name: &str, state: &TopicState) -> String {
    match state {
        TopicState::Created => format!("+ {name}: create"),
        TopicState::PartitionsAdded { from, to } => format!(
            "~ {name}: partitions {from} -> {to}\n  {}",
            PARTITIONS_MOVE_KEYS.replace('\n', "\n  ")
        ),
        TopicState::ConfigSet { key, from, to } => format!("~ {name}: {key} {from:?} -> {to:?}"),
        TopicState::CannotShrink { declared, actual } => format!(
            "! {name}: has {actual} partitions, declared {declared}: Kafka cannot remove partitions (recreate the topic, or declare {actual})"
        ),
        TopicState::UpToDate => format!("= {name}: up to date"),
        other => format!("? {name}: {other:?}"),
    }
}

/// `[{"topic": …, "state": "created" | "config_set" | …, …}]`.
fn json_rows(rows: &[(String, TopicState)]) -> anyhow::Result<String> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(topic, state)| {
            let mut row = serde_json::to_value(state)?;
            row["topic"] = serde_json::Value::from(topic.as_str());
            if matches!(state, TopicState::PartitionsAdded { .. }) {
                row["note"] = serde_json::Value::from(PARTITIONS_MOVE_KEYS.replace('\n', " "));
            }
            Ok(row)
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(serde_json::to_string_pretty(&rows)?)
}
