//! The scenarios: each a named, repeatable case with a seed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::harness::{self, Env, IdemProcess, PrivateRedis, Sampler};
use super::{ConformanceSpec, Profile, ScenarioResult, RECOVERY_BOUND};
use idem::model::{Model, Outcome};
use idem::tools::sample::{generate, Rng, SampleRecord, SampleSpec};

mod log_cases;
mod process_faults;
mod redis_faults;
mod tool_cases;

use log_cases::*;
use process_faults::*;
use redis_faults::*;

type Run = fn(
    ConformanceSpec,
    u64,
) -> Pin<Box<dyn Future<Output = anyhow::Result<(ScenarioResult, u32)>> + Send>>;

pub struct Scenario {
    pub name: &'static str,
    pub run: Run,
}

/// The scenarios of `profile`, in running order.
pub fn all(profile: Profile) -> Vec<Scenario> {
    // (name, only in the full profile, run)
    let table: [(&'static str, bool, Run); 22] = [
        ("sigkill-random", false, |s, seed| {
            Box::pin(sigkill_random(s, seed))
        }),
        ("sigterm-mid-batch", false, |s, seed| {
            Box::pin(sigterm_mid_batch(s, seed))
        }),
        ("redis-stalled", false, |s, seed| {
            Box::pin(redis_stalled(s, seed))
        }),
        ("redis-killed-fsync", false, |s, seed| {
            Box::pin(redis_killed(s, seed, "always"))
        }),
        ("lua-error-mid-batch", false, |s, seed| {
            Box::pin(lua_error(s, seed))
        }),
        ("duplicates-after-window", false, |s, seed| {
            Box::pin(after_window(s, seed))
        }),
        ("replay-from-earliest", false, |s, seed| {
            Box::pin(replay_earliest(s, seed))
        }),
        ("poison-record", false, |s, seed| Box::pin(poison(s, seed))),
        ("replay-after-window-counters", true, |s, seed| {
            Box::pin(replay_after_window_counters(s, seed))
        }),
        ("rebalance-storm", true, |s, seed| Box::pin(storm(s, seed))),
        ("zombie", true, |s, seed| Box::pin(zombie(s, seed))),
        ("redis-killed-ack-everysec", true, |s, seed| {
            Box::pin(redis_killed(s, seed, "everysec"))
        }),
        ("kafka-broker-restart", true, |s, seed| {
            Box::pin(kafka_restart(s, seed))
        }),
        ("oversized-dead-letter", true, |s, seed| {
            Box::pin(oversized_dead_letter(s, seed))
        }),
        ("redis-out-of-memory", true, |s, seed| {
            Box::pin(redis_oom(s, seed))
        }),
        ("eviction-policy-refused", true, |s, seed| {
            Box::pin(eviction_refused(s, seed))
        }),
        ("dead-letter-topic-unavailable", true, |s, seed| {
            Box::pin(dead_letter_topic_unavailable(s, seed))
        }),
        ("poison-flood-budget", true, |s, seed| {
            Box::pin(poison_flood(s, seed))
        }),
        ("redis-restarted-empty", true, |s, seed| {
            Box::pin(redis_state_lost(s, seed, false))
        }),
        ("redis-snapshot-restored", true, |s, seed| {
            Box::pin(redis_state_lost(s, seed, true))
        }),
        ("redis-cluster-master-failover", true, |s, seed| {
            Box::pin(cluster_failover(s, seed))
        }),
        ("commit-fails-in-rebalance", true, |s, seed| {
            Box::pin(commit_fails_in_rebalance(s, seed))
        }),
    ];
    table
        .into_iter()
        .chain(tool_cases::table())
        .filter(|(_, full_only, _)| profile == Profile::Full || !full_only)
        .map(|(name, _, run)| Scenario { name, run })
        .collect()
}

/// What every scenario sets up: a fresh topic, group and prefix, a seeded
/// stream and its oracle.
struct Case {
    env: Env,
    name: String,
    topic: String,
    partitions: i32,
    records: Vec<SampleRecord>,
    model: Model,
    redis: harness::RedisTarget,
    positions: harness::Positions,
    applied: Vec<bool>,
    recovery: Duration,
    faults: Vec<String>,
    kills: u32,
}

impl Case {
    async fn new(
        spec: &ConformanceSpec,
        name: &str,
        seed: u64,
        events: usize,
        partitions: i32,
    ) -> anyhow::Result<Case> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let topic = format!("conf-{name}-{stamp}");
        harness::create_topic(&spec.env, &topic, partitions).await?;
        let records = generate(&SampleSpec {
            events,
            entities: 200,
            duplicate_ratio: 0.2,
            out_of_order_ratio: 0.05,
            delete_ratio: 0.02,
            data_bytes: 16,
            seed,
            prefix: topic.clone(),
            zipf: None,
        });
        let model = harness::oracle(&records);
        let applied = harness::oracle_applies(&records);
        Ok(Case {
            env: spec.env.clone(),
            name: name.to_string(),
            topic,
            partitions,
            records,
            model,
            redis: spec.env.redis.clone(),
            positions: HashMap::new(),
            applied,
            recovery: Duration::ZERO,
            faults: Vec::new(),
            kills: 0,
        })
    }

    fn spawn(&self, extra: &[(&str, &str)]) -> anyhow::Result<IdemProcess> {
        IdemProcess::spawn(
            &self.env,
            &self.topic,
            &self.topic,
            &self.topic,
            &self.redis,
            extra,
        )
    }

    async fn produce(&mut self, from: usize, to: usize) -> anyhow::Result<()> {
        let slice = &self.records[from..to];
        let delivered = harness::produce(&self.env, &self.topic, slice).await?;
        self.positions.extend(harness::positions(
            slice,
            &delivered,
            &self.applied[from..to],
        ));
        Ok(())
    }

    fn sampler(&self) -> Sampler {
        Sampler::start(
            &self.env,
            &self.redis,
            &self.topic,
            &self.topic,
            &self.topic,
            self.partitions,
            self.model.entities.keys().cloned().collect(),
        )
    }

    /// I4 while no idem runs.
    async fn check_commits(&self) -> anyhow::Result<u64> {
        harness::commits_ahead_of_effects(
            &self.env,
            &self.redis,
            &self.topic,
            &self.topic,
            self.partitions,
            &self.topic,
            &self.positions,
        )
        .await
    }

    async fn catch_up(&mut self) -> anyhow::Result<()> {
        let took = harness::wait_caught_up(
            &self.env,
            &self.topic,
            &self.topic,
            self.partitions,
            RECOVERY_BOUND,
        )
        .await?;
        self.recovery = self.recovery.max(took);
        Ok(())
    }

    async fn finish(
        self,
        sampler: Option<Sampler>,
        mut commit_violations: u64,
        notes: String,
        loss_expected: bool,
    ) -> anyhow::Result<(ScenarioResult, u32)> {
        let (seq_decreases, commit_decreases) = match sampler {
            Some(s) => s.finish().await?,
            None => (0, 0),
        };
        commit_violations += commit_decreases;
        let (lost, doubled, examples) =
            harness::lost_and_doubled(&self.redis, &self.topic, &self.model).await?;
        let notes = if examples.is_empty() {
            notes
        } else {
            format!("{notes} {}", examples.join("; "))
        };
        let result = ScenarioResult {
            scenario: self.name.clone(),
            seed: 0,
            records: self.records.len(),
            faults: self.faults.join(", "),
            lost,
            doubled,
            seq_decreases,
            commit_violations,
            max_recovery_seconds: self.recovery.as_secs_f64(),
            verdict: String::new(),
            notes,
        }
        .judge(loss_expected);
        Ok((result, self.kills))
    }
}

impl Case {
    /// Points the case at a private redis-server of its own (AOF with
    /// `fsync`), which the scenario may kill or reconfigure; the scenario is
    /// skipped where redis-server is not installed.
    async fn use_private_redis(&mut self, fsync: &'static str) -> anyhow::Result<PrivateRedis> {
        let redis = PrivateRedis::start(&self.env.work_dir, fsync)
            .await
            .map_err(|e| anyhow::anyhow!("skipped: {e}"))?;
        self.redis = redis.target();
        Ok(redis)
    }

    /// `finish`, with a count the scenario checks itself: the verdict fails
    /// unless `got == want`.
    async fn finish_counting(
        self,
        sampler: Option<Sampler>,
        violations: u64,
        what: &str,
        got: u64,
        want: u64,
    ) -> anyhow::Result<(ScenarioResult, u32)> {
        let (mut r, k) = self
            .finish(sampler, violations, format!("{got} {what}"), false)
            .await?;
        if got != want {
            r.verdict = "fail".into();
            r.notes.push_str(&format!(" (expected {want})"));
        }
        Ok((r, k))
    }
}

async fn wait_processing(p: &IdemProcess, at_least: u64, bound: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while p.outcome(None).await < at_least {
        anyhow::ensure!(
            start.elapsed() < bound,
            "idem processed nothing within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Until every process owns a partition: a scenario that watches one
/// instance produces only then, or the first to join takes (and drains)
/// every partition before the other is assigned any.
async fn wait_owning(processes: &[&IdemProcess], bound: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let mut owned = Vec::new();
        for p in processes {
            owned.push(p.owned_partitions().await);
        }
        if owned.iter().all(|&n| n >= 1) {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < bound,
            "not every instance owned a partition within {bound:?} (owned: {owned:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kills_for(spec: &ConformanceSpec) -> u32 {
    match spec.profile {
        Profile::Short => 3,
        Profile::Full => 20,
    }
}

/// Reads /readyz of `p` until `check` accepts its body, at most `bound`.
async fn wait_ready_text(
    p: &IdemProcess,
    what: &str,
    bound: Duration,
    check: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let body = idem::metrics::fetch_local(p.port, "/readyz")
            .await
            .unwrap_or_default();
        if check(&body) {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < bound,
            "{what} within {bound:?}; /readyz: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Inserts `n` copies of `bad` records among the case's records, every `step`.
fn insert_bad(case: &mut Case, step: usize, bad: impl Fn(usize) -> Vec<u8>) -> usize {
    let mut inserted = 0;
    for (i, r) in case.records.clone().iter().enumerate().step_by(step).rev() {
        case.records.insert(
            i,
            SampleRecord {
                key: r.key.clone(),
                value: bad(inserted),
            },
        );
        inserted += 1;
    }
    case.applied = harness::oracle_applies(&case.records);
    inserted
}

/// The number of records in the case's dead-letter topic.
async fn dead_letter_count(case: &Case) -> anyhow::Result<u64> {
    let (brokers, dlq) = (case.env.brokers.clone(), format!("{}.dlq", case.topic));
    tokio::task::spawn_blocking(move || {
        idem::tools::dead_letters::read_all(
            &idem::config::KafkaConfig::for_brokers(&brokers),
            &dlq,
            |_| {},
        )
    })
    .await?
}
