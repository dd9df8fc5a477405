//! `idem topics`: topics as code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::tools::topics::{self, TopicState};

/// Create and check the topics declared in TOML files (see topics/).
#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(subcommand)]
    action: TopicsAction,
    /// Folder of *.toml topic definitions.
    #[arg(long, global = true, default_value = "topics")]
    dir: PathBuf,
}

#[derive(Debug, Subcommand)]
#[command(verbatim_doc_comment)]
enum TopicsAction {
    /// Create missing topics (and their dead-letter topics) and add missing
    /// partitions. Never deletes a topic or shrinks one.
    ///
    /// Example: idem topics apply --dir topics
    Apply,
    /// Report drift between the declarations and the cluster; exits 1 on drift.
    ///
    /// Example: idem topics check --dir topics
    Check,
}

pub async fn run(args: TopicsArgs, config: Config) -> anyhow::Result<ExitCode> {
    let specs = topics::load_dir(&args.dir)?;
    let kafka = &config.kafka;
    match args.action {
        TopicsAction::Apply => {
            for (name, state) in topics::apply(kafka, &specs).await? {
                match state {
                    TopicState::Created => crate::outln!("{name}: created"),
                    TopicState::PartitionsAdded { from, to } => {
                        crate::outln!("{name}: partitions {from} -> {to}")
                    }
                    _ => crate::outln!("{name}: up to date"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TopicsAction::Check => {
            let mut drift = false;
            for (name, state) in topics::check(kafka, &specs).await? {
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
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
