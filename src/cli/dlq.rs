//! `idem dlq`: look at and re-drive the dead-letter topic.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::dlq::{tools, REASONS};

/// Inspect the dead-letter topic, and re-publish its records once the cause is fixed.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
    /// Dead-letter topic (default: dlq.topic for the first of kafka.topics).
    #[arg(long, global = true)]
    topic: Option<String>,
}

#[derive(Debug, Subcommand)]
#[command(verbatim_doc_comment)]
enum DlqAction {
    /// Count dead letters by reason and show a few examples of each.
    ///
    /// Example: idem dlq inspect --topic orders.dlq --examples 5
    Inspect {
        /// Examples shown per reason.
        #[arg(long, default_value_t = 3)]
        examples: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish dead letters to their original topic with their original
    /// key, value and headers, so the guard decides again: intents already
    /// applied come back as duplicates, the others are applied once.
    ///
    /// Example: idem dlq redrive --reason too_large --dry-run
    Redrive {
        /// Only records with this reason code (see docs/event-contract.md).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(REASONS))]
        reason: Option<String>,
        /// Count what would be re-published, publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(args: DlqArgs, config: Config) -> anyhow::Result<ExitCode> {
    let topic = args
        .topic
        .unwrap_or_else(|| config.dlq.topic_for(&config.kafka.topics[0]));
    let brokers = config.kafka.brokers.clone();
    match args.action {
        DlqAction::Inspect { examples, json } => {
            let t = topic.clone();
            let report =
                tokio::task::spawn_blocking(move || tools::inspect(&brokers, &t, examples))
                    .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{topic}: {} dead letters", report.records);
            for (reason, n) in &report.by_reason {
                println!("  {reason:<18} {n}");
            }
            for e in &report.examples {
                println!(
                    "\n[{}] from {} (dead letter {})\n  {}\n  value: {}",
                    e.reason, e.original, e.dlq_offset, e.message, e.value_preview
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Redrive { reason, dry_run } => {
            let t = topic.clone();
            let report = tokio::task::spawn_blocking(move || {
                tools::redrive(&brokers, &t, reason.as_deref(), dry_run, |n| {
                    eprintln!("redrive: {n} records re-published so far");
                })
            })
            .await??;
            let verb = if dry_run {
                "would re-publish"
            } else {
                "re-published"
            };
            println!(
                "read {} dead letters from {topic}; {} skipped by --reason",
                report.read, report.skipped
            );
            for (t, n) in &report.by_topic {
                println!("  {verb} {n} to {t}");
            }
            if report.failed > 0 {
                println!("{} records were not delivered; run the redrive again (the guard makes repeats safe)", report.failed);
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
