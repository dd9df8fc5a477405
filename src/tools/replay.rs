//! Moving a consumer group's committed offsets back, to replay a topic.
//!
//! Guarantee: offsets are only moved while the group has no active member
//! (otherwise its members would overwrite them, or fight over them); the
//! plan is shown first and applied only on request. Replaying is safe for
//! the state: a record idem decided before comes back `replayed` (its
//! partition's decided ranges or its entity's offset mark say so, whatever
//! the window); one outside them is `duplicate` inside the window and
//! `stale` after it, where only commutative effects would count again.

use std::collections::{BTreeMap, HashSet};

use crate::kafka::QuietContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, OffsetReset, TopicPolicy};
use crate::consumed::DecidedRanges;
pub use crate::tools::group::Member;
use crate::tools::group::{group_status, GroupStatus};
use crate::tools::topic_reader::{read_ranges, TopicRecord};

/// Where to move the offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayTarget {
    Earliest,
    /// The end of the log: a skip of everything not yet read.
    Latest,
    /// N records from the committed offset (negative: back).
    ShiftBy(i64),
    /// The first offset at or after this time (ms since the epoch).
    Timestamp(i64),
    /// Explicit offsets per partition.
    Offsets(BTreeMap<i32, i64>),
}

/// One partition's move.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlanRow {
    pub partition: i32,
    pub current: Option<i64>,
    pub new: i64,
    pub end: i64,
    /// Records that will be read again (or skipped, if negative).
    pub reread: i64,
    /// Of those, events older than the dedupe window on a topic with
    /// commutative effects that idem did not decide before (outside its
    /// decided ranges) and whose own effects commute, each id once: they
    /// would count again (docs/effects.md).
    pub recount: i64,
    /// Of the re-read records, those in the decided ranges: they come back
    /// `replayed` and change nothing.
    pub decided: i64,
    /// The first offset inside the dedupe window, where it matters.
    #[serde(skip)]
    pub window_start: Option<i64>,
    /// The partition's first offset now.
    #[serde(skip)]
    pub log_start: i64,
    /// The current commit's metadata (idem's names Redis's epoch).
    #[serde(skip)]
    pub metadata: String,
}

/// What `idem replay` would do.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayPlan {
    pub group: String,
    pub topic: String,
    pub rows: Vec<PlanRow>,
    pub total_reread: i64,
    /// Records a forward move skips (never applied).
    pub total_skipped: i64,
    /// Re-read events older than the dedupe window, outside the decided
    /// ranges, whose commutative effects (counters, ledgers, sets) would
    /// apply again; each id once, invalid records and merges not counted.
    pub total_recount: i64,
    /// Re-read records idem decided before: `replayed`, harmless.
    pub total_decided: i64,
    #[serde(skip)]
    pub members: Vec<Member>,
    /// Whether the group exists (members, or something committed).
    pub group_exists: bool,
}

/// The new offset of one partition, clamped to what the log holds. A group
/// without a committed offset would start where `auto_offset_reset` says:
/// the log start (`earliest`) or the end (`latest`).
///
/// | target | log start | end | current | reset    | new | re-read |
/// |--------|-----------|-----|---------|----------|-----|---------|
/// | 0 (earliest) | 100 | 500 | 400   | any      | 100 | 300     |
/// | 700    | 100       | 500 | 400     | any      | 500 | -100 (skip) |
/// | 50     | 100       | 500 | None    | latest   | 100 | 400     |
/// | 300    | 100       | 500 | None    | earliest | 300 | -200 (skip) |
pub fn plan_row(
    partition: i32,
    wanted: i64,
    log_start: i64,
    end: i64,
    current: Option<i64>,
    reset: OffsetReset,
) -> PlanRow {
    let new = wanted.clamp(log_start, end);
    let unset = match reset {
        OffsetReset::Earliest => log_start,
        OffsetReset::Latest => end,
    };
    let from = current.unwrap_or(unset).clamp(log_start, end);
    PlanRow {
        partition,
        current,
        new,
        end,
        reread: from - new,
        recount: 0,
        decided: 0,
        window_start: None,
        log_start,
        metadata: String::new(),
    }
}

/// Of a row's re-read records `[new, from)`, those before `window_start`
/// (the first offset inside the dedupe window): they would count again.
///
/// | new | from | window_start | recount |
/// |-----|------|--------------|---------|
/// | 100 | 400  | 300          | 200     |
/// | 100 | 400  | 50           | 0       |
/// | 100 | 400  | 900          | 300     |
/// | 500 | 400  | 100          | 0 (a skip) |
pub fn recount(new: i64, from: i64, window_start: i64) -> i64 {
    (from.min(window_start) - new).max(0)
}

impl ReplayPlan {
    /// The plan with what Redis says was decided, per partition: re-read
    /// records in a decided range come back `replayed` and count nothing
    /// again, so only the rest of those older than the window recount.
    pub fn with_decided(mut self, decided: &BTreeMap<i32, DecidedRanges>) -> ReplayPlan {
        for row in &mut self.rows {
            let Some(ranges) = decided.get(&row.partition) else {
                continue;
            };
            let from = row.new + row.reread;
            if from <= row.new {
                continue;
            }
            row.decided = (from - row.new) - ranges.uncovered(row.new, from);
            if let Some(window_start) = row.window_start {
                let end = from.min(window_start);
                row.recount = if end > row.new {
                    ranges.uncovered(row.new, end)
                } else {
                    0
                };
            }
        }
        self.total_recount = self.rows.iter().map(|r| r.recount).sum();
        self.total_decided = self.rows.iter().map(|r| r.decided).sum();
        self
    }
}

/// Of each row's re-read records that [`ReplayPlan::with_decided`] counts
/// as recounting (older than the window, outside the decided ranges), the
/// ones that would count again: events whose effects under `config` commute
/// (counters, ledgers, sets, commutative custom effects), each id of an
/// entity once (a later copy is a duplicate of the first within the replay).
/// Invalid records and plain merges count nothing again. Reads those
/// offsets of the log. Blocking.
pub fn recounted_events(
    plan: &ReplayPlan,
    config: &Config,
    decided: &BTreeMap<i32, DecidedRanges>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let ranges: BTreeMap<i32, (i64, i64)> = plan
        .rows
        .iter()
        .filter(|r| r.recount > 0)
        .filter_map(|r| {
            Some((
                r.partition,
                (r.new, (r.new + r.reread).min(r.window_start?)),
            ))
        })
        .collect();
    let none = DecidedRanges::default();
    let mut counts: BTreeMap<i32, i64> = ranges.keys().map(|p| (*p, 0)).collect();
    let mut ids: HashSet<(String, String)> = HashSet::new();
    let policy = config.policy(&plan.topic);
    read_ranges(&config.kafka, &plan.topic, &ranges, |r| {
        let decided = decided.get(&r.partition).unwrap_or(&none);
        if !decided.contains(r.offset) && counts_again(&r, &policy, config, &mut ids) {
            *counts.entry(r.partition).or_default() += 1;
        }
    })?;
    Ok(counts)
}

/// Whether `r`, decided again, would apply commutative effects: it decodes,
/// its effects commute, and its id is new to this replay.
fn counts_again(
    r: &TopicRecord,
    policy: &TopicPolicy,
    config: &Config,
    ids: &mut HashSet<(String, String)>,
) -> bool {
    let headers = r.header_refs();
    let (decoded, _) = crate::event::decode_keyed(
        r.key.as_deref(),
        r.value.as_deref(),
        &headers,
        &config.event,
    );
    let Ok(event) = decoded else {
        return false;
    };
    match policy.plan(&event) {
        Ok(effects) if effects.commutes() => ids.insert((event.entity, event.id)),
        _ => false,
    }
}

impl ReplayPlan {
    /// The plan with each row's recount narrowed to `counts` (rows absent
    /// there keep theirs).
    pub fn with_recounts(mut self, counts: &BTreeMap<i32, i64>) -> ReplayPlan {
        for row in &mut self.rows {
            if let Some(n) = counts.get(&row.partition) {
                row.recount = *n;
            }
        }
        self.total_recount = self.rows.iter().map(|r| r.recount).sum();
        self
    }
}

/// Computes the plan for `topic` (optionally only `partitions`); `reset` is
/// where the group starts on a partition it never committed. Blocking.
pub fn plan(
    kafka: &crate::config::KafkaConfig,
    group: &str,
    topic: &str,
    partitions: Option<&[i32]>,
    target: &ReplayTarget,
    reset: OffsetReset,
    window_start_ms: Option<i64>,
) -> anyhow::Result<ReplayPlan> {
    let status: GroupStatus = group_status(kafka, group, &[topic.to_string()])?;
    let selected: Vec<_> = status
        .partitions
        .iter()
        .filter(|p| partitions.is_none_or(|ps| ps.contains(&p.partition)))
        .collect();
    if let Some(ps) = partitions {
        for p in ps {
            anyhow::ensure!(
                selected.iter().any(|s| s.partition == *p),
                "topic {topic} has no partition {p}"
            );
        }
    }
    let wanted = wanted_offsets(kafka, topic, &selected, target, reset)?;
    let window_start = match window_start_ms {
        Some(ms) => Some(offsets_at(kafka, topic, &selected, ms)?),
        None => None,
    };
    let rows: Vec<PlanRow> = selected
        .iter()
        .filter_map(|p| {
            let mut row = plan_row(
                p.partition,
                *wanted.get(&p.partition)?,
                p.log_start,
                p.end,
                p.committed,
                reset,
            );
            row.metadata = p.metadata.clone();
            if let Some(starts) = &window_start {
                let from = row.new + row.reread;
                row.window_start = Some(starts[&p.partition]);
                row.recount = recount(row.new, from, starts[&p.partition]);
            }
            Some(row)
        })
        .collect();
    Ok(ReplayPlan {
        group: group.to_string(),
        topic: topic.to_string(),
        total_reread: rows.iter().map(|r| r.reread.max(0)).sum(),
        total_skipped: rows.iter().map(|r| (-r.reread).max(0)).sum(),
        total_recount: rows.iter().map(|r| r.recount).sum(),
        total_decided: 0,
        rows,
        group_exists: status.exists(),
        members: status.members,
    })
}

/// Where `target` moves each selected partition, before it is held to the
/// log (`plan_row`); an explicit offset past a partition's end is refused.
fn wanted_offsets(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    selected: &[&crate::tools::group::PartitionLag],
    target: &ReplayTarget,
    reset: OffsetReset,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    Ok(match target {
        ReplayTarget::Earliest => selected
            .iter()
            .map(|p| (p.partition, p.log_start))
            .collect(),
        ReplayTarget::Latest => selected.iter().map(|p| (p.partition, p.end)).collect(),
        ReplayTarget::ShiftBy(n) => selected
            .iter()
            .map(|p| {
                let from = p.committed.unwrap_or(match reset {
                    OffsetReset::Earliest => p.log_start,
                    OffsetReset::Latest => p.end,
                });
                (p.partition, from.saturating_add(*n).max(0))
            })
            .collect(),
        ReplayTarget::Offsets(map) => {
            for (p, o) in map {
                let Some(s) = selected.iter().find(|s| s.partition == *p) else {
                    anyhow::bail!(
                        "--to-offset names partition {p}, which is not selected or does not exist"
                    );
                };
                anyhow::ensure!(
                    *o <= s.end,
                    "--to-offset {p}:{o} is past the end of {topic}/{p}, whose next offset is {}: \
                     give an offset up to {} (or --to-latest to skip to the end)",
                    s.end,
                    s.end
                );
            }
            map.clone()
        }
        ReplayTarget::Timestamp(ms) => offsets_at(kafka, topic, selected, *ms)?,
    })
}

/// Per partition, the first offset at or after `ms` (the end if none).
fn offsets_at(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    selected: &[&crate::tools::group::PartitionLag],
    ms: i64,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer<QuietContext> =
        crate::kafka::base_config(kafka).create_with_context(QuietContext)?;
    let mut tpl = TopicPartitionList::new();
    for p in selected {
        tpl.add_partition_offset(topic, p.partition, Offset::Offset(ms))?;
    }
    let found = consumer.offsets_for_times(tpl, kafka.request_timeout)?;
    Ok(selected
        .iter()
        .map(|p| {
            let o = match found.find_partition(topic, p.partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                // No record at or after that time: nothing to replay.
                _ => p.end,
            };
            (p.partition, o)
        })
        .collect())
}

impl ReplayPlan {
    /// The partitions the plan moves forward.
    pub fn skipping_partitions(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.reread < 0)
            .map(|r| r.partition.to_string())
            .collect()
    }
}

impl ReplayPlan {
    /// The rows whose commit changes (the others are left untouched): a
    /// partition moved, or one the group never committed (it gets a commit
    /// at the plan's offset, where it would have started anyway).
    pub fn moves(&self) -> impl Iterator<Item = &PlanRow> {
        self.rows.iter().filter(|r| r.current != Some(r.new))
    }
}

/// Commits the moved partitions' new offsets for the group with `metadata`
/// (from `tools::replay_tie::tie_to_redis`); the partitions the plan does
/// not move keep their commits. Call [`refuse_if_still_active`] first.
/// Blocking.
pub fn execute(
    kafka: &crate::config::KafkaConfig,
    plan: &ReplayPlan,
    metadata: &str,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<QuietContext> = crate::kafka::base_config(kafka)
        .set("group.id", &plan.group)
        .set("enable.auto.commit", "false")
        .create_with_context(QuietContext)?;
    let moves = plan
        .moves()
        .map(|r| (plan.topic.as_str(), r.partition, r.new));
    let tpl = crate::kafka::offsets_with_metadata(moves, metadata)?;
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
        anyhow::anyhow!(
            "committing the new offsets for group {} failed: {e}",
            plan.group
        )
    })?;
    Ok(())
}

/// Refuses while the group has members now: someone may have started since
/// the plan. Checked before Redis is written. Blocking.
pub fn refuse_if_still_active(
    kafka: &crate::config::KafkaConfig,
    plan: &ReplayPlan,
) -> anyhow::Result<()> {
    let status = group_status(kafka, &plan.group, std::slice::from_ref(&plan.topic))?;
    refuse_if_active(&plan.group, &status.members)
}

/// An error naming the active members and how to stop them.
pub fn refuse_if_active(group: &str, members: &[Member]) -> anyhow::Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = members
        .iter()
        .map(|m| format!("{} on {} (member {})", m.client_id, m.host, m.member_id))
        .collect();
    anyhow::bail!(
        "group {group} has {} active member(s): {}. Stop every idem instance of this group first \
         (SIGTERM them, or scale the deployment to 0), wait until `idem inspect group {group}` shows \
         no members, then run the replay again",
        members.len(),
        names.join(", ")
    )
}

/// Parses `P:O,P:O` into explicit offsets.
pub fn parse_offsets(text: &str) -> Result<BTreeMap<i32, i64>, String> {
    text.split(',')
        .map(|pair| {
            let (p, o) = pair
                .split_once(':')
                .ok_or_else(|| format!("{pair:?} is not PARTITION:OFFSET"))?;
            let p = p
                .trim()
                .parse::<i32>()
                .map_err(|_| format!("bad partition in {pair:?}"))?;
            let o = o
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("bad offset in {pair:?}"))?;
            if p < 0 || o < 0 {
                return Err(format!(
                    "{pair:?}: partition and offset must not be negative"
                ));
            }
            Ok((p, o))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_rows_by_table() {
        use OffsetReset::*;
        let row = |wanted, current, reset| {
            let r = plan_row(0, wanted, 100, 500, current, reset);
            (r.new, r.reread)
        };
        assert_eq!(row(0, Some(400), Latest), (100, 300));
        assert_eq!(row(700, Some(400), Earliest), (500, -100));
        assert_eq!(row(50, None, Latest), (100, 400));
        assert_eq!(row(300, None, Earliest), (300, -200));
        // The case found from outside: committed at 0, moved to 100.
        assert_eq!(
            plan_row(0, 100, 0, 1000, Some(0), Latest).reread,
            -100,
            "a forward move is a skip"
        );
    }

    /// Re-reading 100..400 with the window starting at 300: without ranges
    /// 200 recount; with 0-250 decided, 50 do (250..300), 150 are replayed;
    /// a partition Redis says nothing of keeps its count.
    #[test]
    fn decided_ranges_take_their_records_out_of_the_recount() {
        let mut row = plan_row(0, 100, 0, 500, Some(400), OffsetReset::Earliest);
        row.window_start = Some(300);
        row.recount = recount(row.new, 400, 300);
        let mut other = row.clone();
        other.partition = 1;
        let plan = ReplayPlan {
            group: "g".into(),
            topic: "t".into(),
            total_reread: 600,
            total_skipped: 0,
            total_recount: 400,
            total_decided: 0,
            rows: vec![row, other],
            members: Vec::new(),
            group_exists: true,
        };
        let decided = BTreeMap::from([(0, DecidedRanges::decode("0-250").unwrap())]);
        let plan = plan.with_decided(&decided);
        assert_eq!((plan.rows[0].recount, plan.rows[0].decided), (50, 150));
        assert_eq!((plan.rows[1].recount, plan.rows[1].decided), (200, 0));
        assert_eq!((plan.total_recount, plan.total_decided), (250, 150));
    }

    #[test]
    fn recounts_by_table() {
        for (new, from, window_start, want) in [
            (100, 400, 300, 200),
            (100, 400, 50, 0),
            (100, 400, 900, 300),
            (500, 400, 100, 0),
        ] {
            assert_eq!(
                recount(new, from, window_start),
                want,
                "{new} {from} {window_start}"
            );
        }
    }

    #[test]
    fn offsets_parse() {
        assert_eq!(
            parse_offsets("0:10,3:7").unwrap(),
            BTreeMap::from([(0, 10), (3, 7)])
        );
        assert!(parse_offsets("0=10").is_err());
        assert!(parse_offsets("0:-1").is_err());
    }
}
