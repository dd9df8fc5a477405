//! `idem top`: a running group's outcome rates and duplicate ratio.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::Config;
use crate::outln;
use crate::tools::top::{self, GroupActivity};

/// Show a running group's outcome rates and duplicate ratio per topic, live
///
/// Reads Redis alone: every `idem run` (0.3.0 or later) publishes its
/// outcome counts with its registration in the members registry every 5 s,
/// since it started and over its last minute. Rates are events per second
/// over that minute, summed over the group's live instances; the duplicate
/// ratio is duplicates among all events (what IdemDuplicateRatioSpike
/// watches; a replay counts `replayed`, not `duplicate`); totals are since
/// each live instance started (equal to its idem_events_total).
///
/// Refreshes every --interval until Ctrl-C; --once prints one table,
/// --json one JSON document (an object: group, members, topics).
///
/// Examples:
///   idem top
///   IDEM__KAFKA__GROUP_ID=orders-view idem top --once
///   idem top --group orders-view --json | jq '.topics[] | {topic, duplicate_ratio}'
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct TopArgs {
    /// The consumer group (default: kafka.group_id).
    #[arg(long)]
    group: Option<String>,
    /// Print one table and exit.
    #[arg(long)]
    once: bool,
    /// Print one JSON document and exit.
    #[arg(long)]
    json: bool,
    /// How often the live view refreshes (e.g. 2s).
    #[arg(long, default_value = "2s", value_parser = super::parse_timeout)]
    interval: Duration,
}

pub async fn run(args: TopArgs, config: Config) -> anyhow::Result<ExitCode> {
    let group = args.group.clone().unwrap_or(config.kafka.group_id.clone());
    if args.json {
        let activity = top::read(&config, &group).await?;
        outln!("{}", serde_json::to_string_pretty(&activity)?);
        return Ok(ExitCode::SUCCESS);
    }
    let live = !args.once;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let activity = top::read(&config, &group).await?;
        if live && terminal {
            // Clear the screen and go home, as top does.
            print!("\x1b[2J\x1b[H");
        }
        outln!("{}", render(&activity));
        if !live {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

/// The table: one row of rates per topic, then the totals.
fn render(a: &GroupActivity) -> String {
    use crate::model::Outcome;
    let mut out = Vec::new();
    let versions: std::collections::BTreeSet<&str> =
        a.members.iter().map(|m| m.version.as_str()).collect();
    out.push(format!(
        "group {}: {} live instance(s) ({}), {} partition(s); rates per second over the last minute",
        a.group,
        a.members.len(),
        versions.into_iter().collect::<Vec<_>>().join(", "),
        a.members.iter().map(|m| m.partitions).sum::<usize>(),
    ));
    if a.members.is_empty() {
        out.push("no instance of this group registers now: is it running (idem run, 0.3.0 or later), with this redis.url and key prefix?".to_string());
        return out.join("\n");
    }
    let mut header = format!("{:24} {:>9} {:>6}", "TOPIC", "EVENTS/S", "DUP%");
    for o in Outcome::ALL {
        header.push_str(&format!(" {:>9}", o.as_str().to_uppercase()));
    }
    out.push(header);
    for t in &a.topics {
        let ratio = t
            .duplicate_ratio
            .map_or("-".to_string(), |r| format!("{:.1}", r * 100.0));
        let mut row = format!("{:24} {:>9.1} {:>6}", t.topic, t.events_per_second, ratio);
        for o in Outcome::ALL {
            row.push_str(&format!(
                " {:>9.1}",
                t.rates.get(o.as_str()).unwrap_or(&0.0)
            ));
        }
        out.push(row);
    }
    out.push(String::new());
    out.push("since each live instance started:".to_string());
    for t in &a.topics {
        let totals: Vec<String> = Outcome::ALL
            .iter()
            .map(|o| format!("{} {}", o.as_str(), t.totals.get(o.as_str()).unwrap_or(&0)))
            .collect();
        out.push(format!("  {}: {}", t.topic, totals.join(", ")));
    }
    out.join("\n")
}
