//! `idem reconcile`: compare Redis with the log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::tools::reconcile::{self, ReconcileOptions};

/// Compare Redis with the log and report (or repair) divergences
///
/// Reads a topic from its start with a throwaway consumer (never the live
/// group), computes every entity's expected state with the guard's rules, and
/// compares with Redis. Reports divergences by kind (missing_entity,
/// seq_behind, seq_ahead, state_differs, entity_not_in_log; with effects
/// declared effects_differ; offset_mark_ahead, a mark past its entity's
/// last record; each explained in docs/operations.md), writes a JSON
/// report, and exits 1 when it found any: usable from cron and CI.
///
/// --repair rewrites the missing, behind and differing entities, never
/// lowering a seq (seq_ahead, effects_differ and offset_mark_ahead are
/// reported, not touched); add --delete-extra to
/// also delete entities the log does not mention (off by default: retention
/// may have removed their events). The report gives each divergence's
/// fields (field, expected, found) and, where it was not repaired, why.
///
/// Four kinds are reported but are not divergences (exit 0): dense_seqs_differ
/// and field_seqs_differ (the bookkeeping of dense seqs and per-field order
/// differs from the log's, as after declaring a topic dense late or
/// switching the order mode); spans_partitions,
/// an entity whose events are in several partitions, so idem may have applied
/// them in any interleaving (--repair-spanning rewrites them toward their
/// events in seq order); and window_ambiguous, a difference that depends on
/// whether Redis still remembered a reused id (between one and two dedupe
/// windows). Neither is repaired without being asked.
///
/// Examples:
///   idem reconcile --topic orders --report reconcile.json
///   idem reconcile --topic orders --repair
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ReconcileArgs {
    /// A topic to read (repeat the flag for several; default: every topic
    /// of kafka.topics). Every entity the topics' records name is judged
    /// against all of its events in them. Entities no topic read names are
    /// judged (entity_not_in_log) only when every topic that writes the key
    /// prefix was read: kafka.topics, and the topics of every deployment
    /// sharing the prefix (the members registry); --delete-extra refuses
    /// otherwise.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Where to write the JSON report; `-` writes it to stdout (the summary
    /// then goes to stderr). Checked before the topic is read.
    #[arg(long, default_value = "reconcile-report.json")]
    report: PathBuf,
    /// Rewrite diverged entities from the log.
    #[arg(long)]
    repair: bool,
    /// With --repair: delete entities that are not in the log.
    #[arg(long, requires = "repair")]
    delete_extra: bool,
    /// With --repair: also rewrite entities whose events span partitions,
    /// toward their events applied in seq order.
    #[arg(long, requires = "repair")]
    repair_spanning: bool,
}

pub async fn run(args: ReconcileArgs, config: Config) -> anyhow::Result<ExitCode> {
    let mut topics = args.topics.clone();
    if topics.is_empty() {
        topics = config.kafka.topics.clone();
    }
    let mut seen = std::collections::BTreeSet::new();
    topics.retain(|t| seen.insert(t.clone()));
    let opts = ReconcileOptions {
        topics,
        repair: args.repair,
        delete_extra: args.delete_extra,
        repair_spanning: args.repair_spanning,
    };
    let to_stdout = args.report.as_os_str() == "-";
    // Open the report first: reading a large topic and then failing to
    // write the result would waste the whole read.
    let mut file = if to_stdout {
        None
    } else {
        Some(std::fs::File::create(&args.report).map_err(|e| {
            anyhow::anyhow!(
                "cannot write the report to {}: {e}; choose another --report path, or --report - for stdout",
                args.report.display()
            )
        })?)
    };
    let report =
        reconcile::reconcile(&config, &opts, |line| eprintln!("reconcile: {line}")).await?;
    let json = serde_json::to_string_pretty(&report)?;
    match file.as_mut() {
        Some(f) => std::io::Write::write_all(f, json.as_bytes())
            .map_err(|e| anyhow::anyhow!("writing the report to {}: {e}", args.report.display()))?,
        None => crate::outln!("{json}"),
    }
    let summary = |line: String| {
        if to_stdout {
            eprintln!("{line}");
        } else {
            crate::outln!("{line}");
        }
    };
    summary(format!(
        "{}: {} records, {} entities in the log, {} divergences (report: {})",
        report.topic,
        report.records_read,
        report.entities_in_log,
        report.divergence_count(),
        args.report.display()
    ));
    for (kind, n) in &report.by_kind {
        summary(format!(
            "  {:<18} {n}",
            serde_json::to_value(kind)?.as_str().unwrap_or("?")
        ));
    }
    let repaired = report.divergences.iter().filter(|d| d.repaired).count();
    if args.repair {
        summary(format!(
            "repaired {repaired} of {}",
            report.divergence_count()
        ));
    }
    for line in divergence_lines(&report, SHOWN) {
        summary(line);
    }
    Ok(if report.divergence_count() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FOUND)
    })
}

/// Diverged entities printed with their fields (the report has them all).
const SHOWN: usize = 10;

/// The first `shown` divergences, each with its fields (field: expected ->
/// found) and why it was not repaired; then the reasons, counted.
fn divergence_lines(report: &reconcile::ReconcileReport, shown: usize) -> Vec<String> {
    let text = |v: &Option<String>| {
        v.as_deref()
            .map_or("(absent)".to_string(), |v| format!("{v:?}"))
    };
    let diverged: Vec<_> = report
        .divergences
        .iter()
        .filter(|d| d.kind.is_divergence())
        .collect();
    let mut lines = Vec::new();
    for d in diverged.iter().take(shown) {
        let kind = serde_json::to_value(d.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let status = match (d.repaired, d.not_repaired) {
            (true, _) => "repaired".to_string(),
            (false, Some(why)) => format!("not repaired: {why}"),
            (false, None) => String::new(),
        };
        lines.push(format!(
            "  {} {kind} (seq redis {:?}, log {:?}) {status}",
            d.entity, d.redis_seq, d.log_seq
        ));
        for f in &d.fields {
            lines.push(format!(
                "      {}: expected {}, found {}",
                f.field,
                text(&f.expected),
                text(&f.found)
            ));
        }
    }
    if diverged.len() > shown {
        lines.push(format!(
            "  … and {} more in the report",
            diverged.len() - shown
        ));
    }
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for why in diverged.iter().filter_map(|d| d.not_repaired) {
        *reasons.entry(why).or_default() += 1;
    }
    for (why, n) in reasons {
        lines.push(format!("  {n} not repaired: {why}"));
    }
    lines
}
