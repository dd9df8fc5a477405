//! `idem dlq`: look at and re-drive the dead-letter topic.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::event::Reason;
use crate::tools::topic_reader::MissingTopic;
use crate::tools::{dead_letters, redrive};

/// Inspect the dead-letter topic, and re-publish its records once the cause is fixed
///
/// Examples:
///   idem dlq inspect
///   idem dlq inspect --topic orders.dlq --json
///   idem dlq redrive --reason too_large --execute
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
    /// Dead-letter topic (default: the dead-letter topic of the first of
    /// kafka.topics, by dlq.topic).
    #[arg(long, global = true)]
    topic: Option<String>,
}

#[derive(Debug, Subcommand)]
#[command(verbatim_doc_comment)]
enum DlqAction {
    /// Count dead letters by reason and show a few examples of each
    ///
    /// Each source record (topic, partition, offset) counts once, whatever
    /// copies the dead-letter topic holds.
    ///
    /// Example:
    ///   idem dlq inspect --topic orders.dlq --examples 5
    #[command(verbatim_doc_comment)]
    Inspect {
        /// Examples shown per reason.
        #[arg(long, default_value_t = 3)]
        examples: usize,
        /// Print one JSON document instead of text: an object (counts by reason, examples).
        #[arg(long)]
        json: bool,
    },
    /// Re-publish dead letters to their original topics (a dry run unless --execute)
    ///
    /// Each goes back with its original key, value and headers, so the guard
    /// decides again: intents already applied come back as duplicates, the
    /// others are applied once.
    ///
    /// A dry run by default: it re-checks every dead letter against the
    /// current config (the decoder, the effect planning: amounts, scales,
    /// pointers) and Redis's dedupe window (an id still remembered with
    /// another payload stays a conflict), and says what --execute would
    /// publish. What would be rejected again is never re-published (it
    /// would come straight back), nor are references (too large for the
    /// dead-letter topic). Each source record is published once, whatever
    /// copies the topic holds. --execute remembers what it published (a
    /// Redis set, <key_prefix>:redriven:{<dlq topic>}), so running it twice
    /// publishes each source record at most once.
    ///
    /// Examples:
    ///   idem dlq redrive --reason too_large
    ///   idem dlq redrive --reason too_large --execute
    #[command(verbatim_doc_comment)]
    Redrive {
        /// Only records with this reason code (see docs/event-contract.md).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Reason::NAMES))]
        reason: Option<String>,
        /// Publish (default: only report what would be published).
        #[arg(long)]
        execute: bool,
        /// The default now; accepted so that older scripts keep working.
        #[arg(long, hide = true, conflicts_with = "execute")]
        dry_run: bool,
        /// Print one JSON document instead of text: an object, the report (or the plan).
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: DlqArgs, config: Config) -> anyhow::Result<ExitCode> {
    let chosen = args.topic.is_none();
    let topic = args
        .topic
        .unwrap_or_else(|| config.dlq.topic_for(&config.kafka.topics[0]));
    act(args.action, &config, &topic)
        .await
        .map_err(|e| match e.downcast_ref::<MissingTopic>() {
            Some(missing) if chosen && missing.0 == topic => anyhow::anyhow!(
                "topic {topic} does not exist. It is the dead-letter topic of `{source}` \
                 (the first of kafka.topics) by dlq.topic = {template:?}: name the dead-letter \
                 topic with --topic, or the source topics with kafka.topics \
                 (IDEM__KAFKA__TOPICS=orders)",
                source = config.kafka.topics[0],
                template = config.dlq.topic,
            ),
            _ => e,
        })
}

async fn act(action: DlqAction, config: &Config, topic: &str) -> anyhow::Result<ExitCode> {
    let kafka = config.kafka.clone();
    match action {
        DlqAction::Inspect { examples, json } => {
            let t = topic.to_string();
            let report =
                tokio::task::spawn_blocking(move || dead_letters::inspect(&kafka, &t, examples))
                    .await??;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_inspection(topic, &report);
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Redrive {
            reason,
            execute,
            dry_run: _,
            json,
        } => {
            let report = redrive::redrive(config, topic, reason.as_deref(), execute, |n| {
                eprintln!("redrive: {n} records so far");
            })
            .await?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report)?);
                let failed = report.failed > 0;
                return Ok(if failed {
                    ExitCode::from(super::EXIT_FAILED)
                } else {
                    ExitCode::SUCCESS
                });
            }
            Ok(print_redrive(topic, &report, execute))
        }
    }
}

/// What the dead-letter topic holds: counts by reason, then the examples.
fn print_inspection(topic: &str, report: &dead_letters::Inspection) {
    crate::outln!(
        "{topic}: {} dead letters of {} source records (counted below once each)",
        report.records,
        report.sources
    );
    let copies = report.records - report.sources;
    if copies > 0 {
        crate::outln!("  {copies} are further copies of a source record (dead-lettered again when re-read outside idem's decided ranges: docs/operations.md); a redrive publishes each source record once");
    }
    for (reason, n) in &report.by_reason {
        crate::outln!("  {reason:<18} {n}");
    }
    for e in &report.examples {
        crate::outln!(
            "\n[{}] from {} (dead letter {})\n  {}\n  value: {}",
            e.reason,
            e.original,
            e.dlq_offset,
            e.message,
            e.value_preview
        );
    }
}

/// What a redrive did (or would do); failure if some copies were not delivered.
fn print_redrive(topic: &str, report: &redrive::Redrive, execute: bool) -> ExitCode {
    let verb = if execute {
        "re-published"
    } else {
        "would re-publish"
    };
    crate::outln!(
        "read {} dead letters from {topic}; {} skipped by --reason",
        report.read,
        report.skipped
    );
    for (t, n) in &report.by_topic {
        crate::outln!("  {verb} {n} to {t}");
    }
    if report.by_topic.is_empty() {
        crate::outln!("  {verb} 0");
    }
    if report.already_redriven > 0 {
        crate::outln!(
            "  {} already re-published by an earlier --execute (not again)",
            report.already_redriven
        );
    }
    if report.copies > 0 {
        crate::outln!(
            "  {} further copies of a source record met above (each source record is published once)",
            report.copies
        );
    }
    for (code, n) in &report.still_invalid {
        crate::outln!("  {n} would be rejected again ({code}): not re-published; fix the producer or the config first");
    }
    if report.already_applied > 0 {
        crate::outln!(
            "  {} already applied (the dedupe window remembers their id with this payload): not re-published",
            report.already_applied
        );
    }
    if report.references > 0 {
        crate::outln!(
            "  {} were dead-lettered as references (too large for the dead-letter topic): re-publish them from the original topic/partition/offset in their headers",
            report.references
        );
    }
    if !execute {
        eprintln!("dry run: nothing published; add --execute to publish");
    }
    if report.failed > 0 {
        crate::outln!(
            "{} records were not delivered; run the redrive again (only those are published again)",
            report.failed
        );
        return ExitCode::from(super::EXIT_FAILED);
    }
    ExitCode::SUCCESS
}
