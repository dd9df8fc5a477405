//! `idem replay`: move a group's offsets back to read a topic again.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;

use crate::config::{parse_duration, Config};
use crate::tools::replay::{self, ReplayTarget};

/// Move a consumer group's offsets back to read a topic again (dry run by default)
///
/// Prints, per partition, the current and new offset and how many records
/// will be read again; --execute applies it. Refuses while the group has
/// active members (a dry run still shows the plan and exits 0). A move
/// forward would skip records, which would then never be applied: it is
/// refused unless --allow-skip is given, and the plan says how many.
///
/// Replaying is safe for the state: records idem already decided come back
/// `replayed` (their offsets are remembered, whatever the window), and have
/// no effect. Only a record with no offset mark (written before 0.3.0, or
/// on a broker without topic ids) comes back `duplicate` or `stale`.
///
/// Refuses an offset past a partition's end (naming the end); with
/// --execute, an unknown group (a typo) unless --create-group, and a move
/// that would hide a loss of Redis that happened while idem was stopped
/// (start idem first, or replay from the log's start).
///
/// Examples:
///   idem replay --topic orders --to-earliest
///   idem replay --topic orders --since 2h --execute
///   idem replay --topic orders --to-timestamp 2026-11-26T08:00:00Z --partition 3
///   idem replay --topic orders --to-offset 0:1200,1:980 --execute
///   idem replay --topic orders --to-offset 0:5000 --allow-skip --execute
///   idem replay --topic orders --topic payments --shift-by -1000 --execute
///   idem replay --topic orders --to-latest --allow-skip --execute
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "since", "to_timestamp", "to_offset", "shift_by"])))]
pub struct ReplayArgs {
    /// Topic to replay (repeat the flag for several, in one plan; default:
    /// every topic of kafka.topics).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Consumer group (default: kafka.group_id).
    #[arg(long)]
    group: Option<String>,
    /// Only these partitions (repeat the flag); default: all.
    #[arg(long = "partition")]
    partitions: Vec<i32>,
    /// Back to the start of the log.
    #[arg(long)]
    to_earliest: bool,
    /// Forward to the end of the log: every record not yet read is SKIPPED
    /// (never applied); refused unless --allow-skip.
    #[arg(long)]
    to_latest: bool,
    /// Move each partition by N records from its committed offset: negative
    /// goes back (a re-read), positive forward (a skip: --allow-skip).
    /// Held to the log's start and end.
    #[arg(long, allow_hyphen_values = true, value_name = "N")]
    shift_by: Option<i64>,
    /// Back to the first record newer than this long ago, e.g. 30m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Back to the first record at or after this RFC 3339 time, or ms since the epoch.
    #[arg(long)]
    to_timestamp: Option<String>,
    /// Explicit offsets: PARTITION:OFFSET[,PARTITION:OFFSET…].
    #[arg(long)]
    to_offset: Option<String>,
    /// Apply the plan (default: only show it).
    #[arg(long)]
    execute: bool,
    /// Allow moving a partition forward, past records that were never
    /// applied (they are skipped for good).
    #[arg(long)]
    allow_skip: bool,
    /// Allow re-reading records older than the dedupe window that idem has
    /// no record of deciding (before its offset marks, or outside the ranges
    /// it consumed) on a topic whose events have commutative effects
    /// (counters, ledgers, sets): those records count again. Records idem
    /// decided before need no flag: they come back `replayed`
    /// (docs/operations.md).
    #[arg(long)]
    allow_recount: bool,
    /// Refuse no unknown group: create it at the plan's offsets (without
    /// it, a group that has no members and nothing committed is taken for a
    /// typo, and refused).
    #[arg(long)]
    create_group: bool,
    /// Print one JSON document instead of text: the plan (an object), or
    /// with several topics an array of them.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ReplayArgs, config: Config) -> anyhow::Result<ExitCode> {
    let target = replay_target(&args)?;
    let mut topics = args.topics.clone();
    if topics.is_empty() {
        topics = config.kafka.topics.clone();
    }
    let mut seen = std::collections::BTreeSet::new();
    topics.retain(|t| seen.insert(t.clone()));
    if topics.len() > 1 {
        anyhow::ensure!(
            args.partitions.is_empty() && args.to_offset.is_none(),
            "--partition and --to-offset name partitions of one topic: give one --topic with them"
        );
    }
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| config.kafka.group_id.clone());
    let mut plans = Vec::new();
    for topic in &topics {
        plans.push(plan_topic(&config, &args, &group, topic, &target).await?);
    }
    if args.json {
        let json = match plans.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            several => serde_json::to_string_pretty(several)?,
        };
        crate::outln!("{json}");
    } else {
        for plan in &plans {
            print_plan(&group, &plan.topic, plan);
        }
    }
    let refusals = refusals(&config, &args, &group, &plans);
    if !args.execute {
        for refusal in &refusals {
            eprintln!("note: --execute would refuse: {refusal}");
        }
        eprintln!("dry run: nothing changed; add --execute to apply");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(e) = refusals.first() {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(super::EXIT_FAILED));
    }
    for plan in plans {
        execute(&config, plan).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan of one topic, with what Redis says was decided.
async fn plan_topic(
    config: &Config,
    args: &ReplayArgs,
    group: &str,
    topic: &str,
    target: &ReplayTarget,
) -> anyhow::Result<replay::ReplayPlan> {
    let reset = config.kafka.auto_offset_reset;
    let partitions = (!args.partitions.is_empty()).then(|| args.partitions.clone());
    // Only where a re-read could count twice: the window's start, as a time.
    let policy = config.policy(topic);
    let window = policy.window;
    let window_start_ms = policy.has_commutative().then(|| {
        crate::pipeline::unix_millis()
            .saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
    });
    let plan = tokio::task::spawn_blocking({
        let (kafka, group, topic, target) = (
            config.kafka.clone(),
            group.to_string(),
            topic.to_string(),
            target.clone(),
        );
        move || {
            replay::plan(
                &kafka,
                &group,
                &topic,
                partitions.as_deref(),
                &target,
                reset,
                window_start_ms,
            )
        }
    })
    .await??;
    Ok(with_decided(config, topic, plan).await)
}

/// Why `--execute` would refuse the plans, each reason once.
fn refusals(
    config: &Config,
    args: &ReplayArgs,
    group: &str,
    plans: &[replay::ReplayPlan],
) -> Vec<String> {
    let mut refusals = Vec::new();
    if let Some(plan) = plans.iter().find(|p| !p.group_exists) {
        if !args.create_group {
            refusals.push(format!(
                "group {group} does not exist (no members, nothing committed on {}): check the name \
                 (`idem inspect group {group}`), or add --create-group to create it at these offsets",
                plan.topic
            ));
        }
    }
    for plan in plans {
        if plan.total_skipped > 0 && !args.allow_skip {
            refusals.push(format!(
                "the plan moves partition(s) {} of {} forward and would skip {} records that were never applied; \
                 add --allow-skip if that is what you want",
                plan.skipping_partitions().join(", "),
                plan.topic,
                plan.total_skipped
            ));
        }
        if plan.total_recount > 0 && !args.allow_recount {
            refusals.push(format!(
                "the plan re-reads {} events of {} older than the dedupe window ({}) that idem has no \
                 record of deciding (before its offset marks, or outside the ranges it consumed) and whose \
                 commutative effects (counters, ledgers, sets) would count again. \
                 Add --allow-recount if that is what you want (docs/effects.md)",
                plan.total_recount,
                plan.topic,
                crate::config::format_duration(config.dedupe.window_for(&plan.topic))
            ));
        }
    }
    let members: Vec<replay::Member> = plans.first().map(|p| p.members.clone()).unwrap_or_default();
    if let Err(e) = replay::refuse_if_active(group, &members) {
        refusals.push(e.to_string());
    }
    refusals
}

/// Ties the plan to Redis, then commits the partitions it moves.
async fn execute(config: &Config, plan: replay::ReplayPlan) -> anyhow::Result<()> {
    let moved = plan.moves().count();
    if moved == 0 {
        eprintln!(
            "{}: nothing to move, every partition is already there; no commit written",
            plan.topic
        );
        return Ok(());
    }
    // Before Redis is written: the group may have started since the plan.
    let (kafka, checked) = (config.kafka.clone(), plan.clone());
    tokio::task::spawn_blocking(move || replay::refuse_if_still_active(&kafka, &checked)).await??;
    let metadata = crate::tools::replay_tie::tie_to_redis(config, &plan).await?;
    let kafka = config.kafka.clone();
    let topic = plan.topic.clone();
    tokio::task::spawn_blocking(move || replay::execute(&kafka, &plan, &metadata)).await??;
    eprintln!("{topic}: offsets of {moved} partition(s) moved and tied to Redis's state; the group's next run replays from there");
    Ok(())
}

/// The plan with what Redis says was decided (or as it is, with a note,
/// when Redis or the brokers cannot say).
async fn with_decided(
    config: &Config,
    topic: &str,
    plan: replay::ReplayPlan,
) -> replay::ReplayPlan {
    let decided = match decided_ranges(config, topic, &plan).await {
        Ok(decided) => decided,
        Err(e) => {
            eprintln!("note: cannot read what Redis says was decided ({e}); the plan counts every re-read record as new");
            return plan;
        }
    };
    let plan = plan.with_decided(&decided);
    if plan.total_recount == 0 {
        return plan;
    }
    // Which of those records would count again: read them.
    eprintln!(
        "reading the {} re-read records older than the dedupe window to count those whose effects would count again",
        plan.total_recount
    );
    let (narrowed, config) = (plan.clone(), config.clone());
    let counted =
        tokio::task::spawn_blocking(move || replay::recounted_events(&narrowed, &config, &decided))
            .await;
    match counted
        .map_err(anyhow::Error::from)
        .and_then(|counted| counted)
    {
        Ok(counts) => plan.with_recounts(&counts),
        Err(e) => {
            eprintln!("note: cannot read those records ({e}); the plan counts each of them as counting again");
            plan
        }
    }
}

/// Per partition of the plan, the ranges Redis says idem decided in the
/// topic as it is now (its id from the brokers).
async fn decided_ranges(
    config: &Config,
    topic: &str,
    plan: &replay::ReplayPlan,
) -> anyhow::Result<BTreeMap<i32, crate::consumed::DecidedRanges>> {
    let Some(id) = crate::kafka::topic_ids::topic_id_of(&config.kafka, topic).await? else {
        return Ok(BTreeMap::new());
    };
    let conn = crate::store::connect(&config.redis).await?;
    let mut store = crate::store::progress::ProgressStore::new(
        conn,
        crate::store::KeyLayout::new(&config.redis.key_prefix),
    );
    let partitions: Vec<(crate::offsets::TopicPartition, crate::consumed::TopicId)> = plan
        .rows
        .iter()
        .map(|r| {
            (
                crate::offsets::TopicPartition::new(topic, r.partition),
                id.clone(),
            )
        })
        .collect();
    let decided = store.read_decided(&partitions).await?;
    Ok(plan.rows.iter().map(|r| r.partition).zip(decided).collect())
}

/// Where the chosen flag moves the group.
fn replay_target(args: &ReplayArgs) -> anyhow::Result<ReplayTarget> {
    Ok(if args.to_earliest {
        ReplayTarget::Earliest
    } else if args.to_latest {
        ReplayTarget::Latest
    } else if let Some(n) = args.shift_by {
        ReplayTarget::ShiftBy(n)
    } else if let Some(since) = &args.since {
        let d = parse_duration(since).ok_or_else(|| {
            anyhow::anyhow!("--since {since:?}: expected a duration like 30m, 2h or 7d")
        })?;
        ReplayTarget::Timestamp(crate::pipeline::unix_millis() - d.as_millis() as i64)
    } else if let Some(ts) = &args.to_timestamp {
        ReplayTarget::Timestamp(parse_timestamp(ts)?)
    } else {
        let text = args.to_offset.as_deref().unwrap_or_default();
        ReplayTarget::Offsets(
            replay::parse_offsets(text).map_err(|e| anyhow::anyhow!("--to-offset: {e}"))?,
        )
    })
}

/// The plan as a table: per partition the current and new offsets and what
/// is read again, then what would be skipped.
fn print_plan(group: &str, topic: &str, plan: &replay::ReplayPlan) {
    crate::outln!("group {group}, topic {topic}");
    crate::outln!(
        "{:>9} {:>12} {:>12} {:>12} {:>12}",
        "partition",
        "current",
        "new",
        "end",
        "re-read"
    );
    for r in &plan.rows {
        let current = r.current.map_or("-".to_string(), |c| c.to_string());
        crate::outln!(
            "{:>9} {:>12} {:>12} {:>12} {:>12}",
            r.partition,
            current,
            r.new,
            r.end,
            r.reread
        );
    }
    crate::outln!("{} records will be read again", plan.total_reread);
    if plan.total_decided > 0 {
        crate::outln!(
            "{} of them were decided before: they come back `replayed` and change nothing",
            plan.total_decided
        );
    }
    if plan.total_skipped > 0 {
        crate::outln!(
            "{} records will be SKIPPED (never applied): partitions {}",
            plan.total_skipped,
            plan.skipping_partitions().join(", ")
        );
    }
    if plan.total_recount > 0 {
        crate::outln!(
            "{} of them are events older than the dedupe window, outside what idem decided, whose commutative effects (counters, ledgers, sets) would COUNT AGAIN (each id once; invalid records and plain merges count nothing)",
            plan.total_recount
        );
    }
}

/// RFC 3339 (UTC offsets) or ms since the epoch.
fn parse_timestamp(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    anyhow::ensure!(
        crate::event::is_rfc3339(text),
        "--to-timestamp {text:?}: expected RFC 3339 (2026-11-26T08:00:00Z) or ms since the epoch"
    );
    let n = |r: std::ops::Range<usize>| text[r].parse::<i64>().unwrap_or(0);
    let (y, mo, d, h, mi, s) = (n(0..4), n(5..7), n(8..10), n(11..13), n(14..16), n(17..19));
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut ms = ((days * 24 + h) * 60 + mi) * 60_000 + s * 1000;
    let tail = &text[19..];
    let zone = tail.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(frac) = tail.strip_prefix('.') {
        let digits: String = frac
            .chars()
            .take_while(char::is_ascii_digit)
            .take(3)
            .collect();
        ms += format!("{digits:0<3}").parse::<i64>().unwrap_or(0);
    }
    if zone.len() == 6 {
        let sign = if zone.starts_with('-') { 1 } else { -1 };
        ms += sign * (zone[1..3].parse::<i64>()? * 60 + zone[4..6].parse::<i64>()?) * 60_000;
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_timestamp("2026-11-26T08:00:00Z").unwrap(),
            1_795_680_000_000
        );
        assert_eq!(
            parse_timestamp("2026-11-26T09:00:00.250+01:00").unwrap(),
            1_795_680_000_250
        );
        assert_eq!(parse_timestamp("12345").unwrap(), 12345);
        assert!(parse_timestamp("yesterday").is_err());
    }
}
