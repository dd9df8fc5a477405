//! `idem-testbench handover`: how long partitions go without an owner when
//! the group changes, under each group protocol at equal timeouts, measured
//! in the same run (rounds alternate the protocols).
//!
//! Per round and protocol, on a fresh topic with a steady trickle of
//! records: three instances settle, then a fourth joins, one leaves with
//! SIGTERM and one is SIGKILLed. After each change every live instance's
//! `idem_assigned_partitions` is read every 50 ms for a fixed window: the
//! longest stretch with a partition unowned, the partition-seconds
//! unowned, and when the group settled (every partition owned, a newcomer
//! holding some, for good). Then records/s through a rebalance storm
//! against the same backlog without one.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::conformance::harness::{self, Env, IdemProcess};
use crate::process::signal;
use crate::services::unique_stream;
use idem::config::GroupProtocol;
use idem::tools::sample::Rng;

/// Options of a run.
#[derive(Debug, Clone)]
pub struct HandoverSpec {
    pub env: Env,
    pub partitions: i32,
    pub rounds: u32,
    /// Records of each storm backlog (and of its baseline without a storm).
    pub storm_records: usize,
}

/// The membership changes measured, in running order.
pub const CHANGES: [&str; 3] = ["join", "sigterm", "sigkill"];

/// What one membership change cost.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Gap {
    pub protocol: String,
    pub change: String,
    /// The longest stretch with at least one partition unowned, seconds.
    pub unowned_window_seconds: f64,
    /// Unowned partitions integrated over the window, partition-seconds.
    pub unowned_partition_seconds: f64,
    /// From the change until every partition was owned for good (and a
    /// newcomer held some), seconds; None if not within the window.
    pub settled_seconds: Option<f64>,
}

/// One sample: seconds since the change, partitions owned by all live
/// instances, and whether the change's goal holds (a newcomer owns some).
pub type Sample = (f64, u64, bool);

/// Summarises the samples of one change (pure, so it is tested alone).
pub fn summarize(samples: &[Sample], partitions: u64) -> (f64, f64, Option<f64>) {
    let (mut window, mut longest, mut area) = (None::<f64>, 0f64, 0f64);
    let mut settled = None;
    for (i, &(t, owned, goal)) in samples.iter().enumerate() {
        let next_t = samples.get(i + 1).map_or(t, |s| s.0);
        area += partitions.saturating_sub(owned) as f64 * (next_t - t);
        match (owned < partitions, window) {
            (true, None) => window = Some(t),
            (false, Some(start)) => {
                longest = longest.max(t - start);
                window = None;
            }
            _ => {}
        }
        let whole = owned >= partitions && goal;
        match (whole, settled) {
            (true, None) => settled = Some(t),
            (false, Some(_)) => settled = None,
            _ => {}
        }
    }
    if let (Some(start), Some(last)) = (window, samples.last()) {
        longest = longest.max(last.0 - start);
    }
    (longest, area, settled)
}

/// Records/s of a backlog, with and without a storm.
#[derive(Debug, Clone, Serialize)]
pub struct StormRate {
    pub protocol: String,
    pub baseline_records_per_second: f64,
    pub storm_records_per_second: f64,
    pub storm_changes: u32,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct HandoverReport {
    pub partitions: i32,
    pub rounds: u32,
    pub gaps: Vec<Gap>,
    pub storms: Vec<StormRate>,
}

impl HandoverReport {
    /// Medians over the rounds, with the range, one row per protocol and change.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "{} partitions, 3 instances, {} round(s) alternating the protocols; medians over the rounds (range in brackets).\n\n| change | protocol | longest with a partition unowned | partition-seconds unowned | settled after |\n|---|---|---|---|---|\n",
            self.partitions, self.rounds
        );
        for change in CHANGES {
            for protocol in PROTOCOLS.map(GroupProtocol::as_str) {
                let rows: Vec<&Gap> = self
                    .gaps
                    .iter()
                    .filter(|g| g.change == change && g.protocol == protocol)
                    .collect();
                let settled: Vec<f64> = rows.iter().filter_map(|g| g.settled_seconds).collect();
                let never = rows.len() - settled.len();
                s.push_str(&format!(
                    "| {change} | {protocol} | {} | {} | {}{} |\n",
                    spread(rows.iter().map(|g| g.unowned_window_seconds).collect(), "s"),
                    spread(
                        rows.iter().map(|g| g.unowned_partition_seconds).collect(),
                        ""
                    ),
                    spread(settled, "s"),
                    if never > 0 {
                        format!(", {never} never")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        s.push_str("\n| protocol | records/s, no changes | records/s through the storm | ratio | changes |\n|---|---|---|---|---|\n");
        for protocol in PROTOCOLS.map(GroupProtocol::as_str) {
            let rows: Vec<&StormRate> = self
                .storms
                .iter()
                .filter(|r| r.protocol == protocol)
                .collect();
            let ratios = rows
                .iter()
                .map(|r| r.storm_records_per_second / r.baseline_records_per_second)
                .collect();
            s.push_str(&format!(
                "| {protocol} | {} | {} | {} | {} |\n",
                spread(
                    rows.iter().map(|r| r.baseline_records_per_second).collect(),
                    ""
                ),
                spread(
                    rows.iter().map(|r| r.storm_records_per_second).collect(),
                    ""
                ),
                spread(ratios, "×"),
                rows.iter()
                    .map(|r| r.storm_changes.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        s
    }
}

/// "median unit [min–max]" (just the value for one round).
fn spread(mut values: Vec<f64>, unit: &str) -> String {
    if values.is_empty() {
        return "–".into();
    }
    values.sort_by(f64::total_cmp);
    let fmt = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let median = values[values.len() / 2];
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    if values.len() == 1 {
        format!("{}{unit}", fmt(median))
    } else {
        format!(
            "{}{unit} [{}–{}]",
            fmt(median),
            fmt(values[0]),
            fmt(values[values.len() - 1])
        )
    }
}

const PROTOCOLS: [GroupProtocol; 2] = [GroupProtocol::Classic, GroupProtocol::Consumer];
/// Longer than the 6 s session and a rebalance after it.
const WINDOW: Duration = Duration::from_secs(25);

/// Runs every round; prints a line per measurement.
pub async fn run(spec: &HandoverSpec) -> anyhow::Result<HandoverReport> {
    std::fs::create_dir_all(&spec.env.work_dir)?;
    let mut report = HandoverReport {
        partitions: spec.partitions,
        rounds: spec.rounds,
        ..HandoverReport::default()
    };
    for round in 0..spec.rounds {
        for protocol in PROTOCOLS {
            let env = Env {
                group_protocol: protocol,
                ..spec.env.clone()
            };
            for gap in changes(&env, spec.partitions, round).await? {
                eprintln!(
                    "[handover] round {} {}: {} unowned {:.2} s ({:.1} partition-s), settled {}",
                    round + 1,
                    gap.protocol,
                    gap.change,
                    gap.unowned_window_seconds,
                    gap.unowned_partition_seconds,
                    gap.settled_seconds
                        .map_or("never".into(), |s| format!("{s:.2} s"))
                );
                report.gaps.push(gap);
            }
            let storm = storm(&env, spec, round).await?;
            eprintln!(
                "[handover] round {} {}: {:.0} records/s without a storm, {:.0} through {} changes",
                round + 1,
                storm.protocol,
                storm.baseline_records_per_second,
                storm.storm_records_per_second,
                storm.storm_changes
            );
            report.storms.push(storm);
        }
    }
    Ok(report)
}

async fn fresh_topic(env: &Env, what: &str, partitions: i32) -> anyhow::Result<String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let topic = format!("handover-{what}-{}-{stamp}", env.group_protocol.as_str());
    harness::create_topic(env, &topic, partitions).await?;
    Ok(topic)
}

fn spawn(env: &Env, topic: &str) -> anyhow::Result<IdemProcess> {
    IdemProcess::spawn(env, topic, topic, topic, &env.redis, &[])
}

/// Join, SIGTERM and SIGKILL on a group of three, records trickling in.
async fn changes(env: &Env, partitions: i32, round: u32) -> anyhow::Result<Vec<Gap>> {
    let topic = fresh_topic(env, "gaps", partitions).await?;
    let records = unique_stream(&topic, 60_000, 1_000, 7 + u64::from(round));
    let trickle = {
        let (env, topic) = (env.clone(), topic.clone());
        tokio::spawn(async move {
            for slice in records.chunks(100) {
                if harness::produce(&env, &topic, slice).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut members = (0..3)
        .map(|_| spawn(env, &topic))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let p = partitions as u64;
    let settled = watch(&members, &[], None, p, Duration::from_secs(60), true).await;
    anyhow::ensure!(
        settled.2.is_some(),
        "three instances did not settle within 60 s"
    );
    let mut gaps = Vec::new();
    for change in CHANGES {
        let (leaving, newcomer) = match change {
            "join" => {
                members.push(spawn(env, &topic)?);
                (None, Some(members.len() - 1))
            }
            "sigterm" => {
                let p = members.remove(0);
                signal(p.pid(), "-TERM");
                (Some(p), None)
            }
            _ => {
                members.remove(0).kill();
                (None, None)
            }
        };
        let leavers: Vec<&IdemProcess> = leaving.iter().collect();
        let (window, area, settled) = watch(&members, &leavers, newcomer, p, WINDOW, false).await;
        if let Some(p) = leaving {
            p.wait_exit(Duration::from_secs(40)).await?;
        }
        gaps.push(Gap {
            protocol: env.group_protocol.as_str().into(),
            change: change.into(),
            unowned_window_seconds: window,
            unowned_partition_seconds: area,
            settled_seconds: settled,
        });
    }
    trickle.abort();
    for m in members {
        m.terminate().await;
    }
    harness::delete_topic(env, &topic).await?;
    Ok(gaps)
}

/// Samples ownership every 50 ms for `window` (or, with `until_settled`,
/// until it first settles) and summarises it.
async fn watch(
    members: &[IdemProcess],
    leaving: &[&IdemProcess],
    newcomer: Option<usize>,
    partitions: u64,
    window: Duration,
    until_settled: bool,
) -> (f64, f64, Option<f64>) {
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    while start.elapsed() < window {
        let t = start.elapsed().as_secs_f64();
        let mut owned = 0;
        for m in members.iter().chain(leaving.iter().copied()) {
            owned += m.owned_partitions().await;
        }
        let goal = match newcomer {
            Some(i) => members[i].owned_partitions().await > 0,
            None => true,
        };
        samples.push((t, owned, goal));
        if until_settled && owned >= partitions && goal {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    summarize(&samples, partitions)
}

/// A backlog consumed by three instances: once without changes, once while
/// one instance every 2 s leaves (SIGTERM and SIGKILL in turn) and is
/// replaced at once.
async fn storm(env: &Env, spec: &HandoverSpec, round: u32) -> anyhow::Result<StormRate> {
    let mut rates = [0f64; 2];
    let mut changes = 0;
    for (i, with_storm) in [false, true].into_iter().enumerate() {
        let topic = fresh_topic(
            env,
            if with_storm { "storm" } else { "calm" },
            spec.partitions,
        )
        .await?;
        let records = unique_stream(&topic, spec.storm_records, 1_000, 100 + u64::from(round));
        harness::produce(env, &topic, &records).await?;
        let end = harness::end_offsets(env, &topic, spec.partitions).await?;
        let started = Instant::now();
        let mut members = (0..3)
            .map(|_| spawn(env, &topic))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut rng = Rng::new(0x57 + u64::from(round));
        let mut next_change = Instant::now() + Duration::from_secs(2);
        loop {
            let committed = harness::committed(env, &topic, &topic, spec.partitions).await?;
            if harness::is_caught_up(&committed, &end) {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "{topic} did not catch up within 600 s"
            );
            if with_storm && Instant::now() >= next_change {
                let leaving = members.remove(rng.below(members.len() as u64) as usize);
                if changes % 2 == 0 {
                    leaving.terminate().await;
                } else {
                    leaving.kill();
                }
                changes += 1;
                members.push(spawn(env, &topic)?);
                next_change = Instant::now() + Duration::from_secs(2);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rates[i] = records.len() as f64 / started.elapsed().as_secs_f64();
        for m in members {
            m.terminate().await;
        }
        harness::delete_topic(env, &topic).await?;
    }
    Ok(StormRate {
        protocol: env.group_protocol.as_str().into(),
        baseline_records_per_second: rates[0],
        storm_records_per_second: rates[1],
        storm_changes: changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dip_gives_its_window_area_and_settling_time() {
        // 4 partitions: whole, two missing for 1 s, one missing for 0.5 s, whole.
        let samples = [
            (0.0, 4, true),
            (0.5, 2, true),
            (1.5, 3, true),
            (2.0, 4, true),
            (3.0, 4, true),
        ];
        let (window, area, settled) = summarize(&samples, 4);
        assert!((window - 1.5).abs() < 1e-9);
        assert!((area - (2.0 + 0.5)).abs() < 1e-9);
        assert_eq!(settled, Some(2.0));
    }

    #[test]
    fn settling_waits_for_the_newcomer_and_a_dip_at_the_end_is_open() {
        let joining = [(0.0, 4, false), (1.0, 4, true), (2.0, 3, true)];
        let (window, _, settled) = summarize(&joining, 4);
        assert_eq!(
            settled, None,
            "it dipped again after the newcomer got partitions"
        );
        assert!(
            (window - 0.0).abs() < 1e-9,
            "an open dip lasts until the last sample"
        );
        let late = [(0.0, 4, false), (1.0, 4, false), (2.0, 4, true)];
        assert_eq!(summarize(&late, 4).2, Some(2.0));
    }
}
