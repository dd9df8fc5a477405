//! The scenarios: each a named, repeatable case with a seed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::harness::{self, Env, IdemProcess, PrivateRedis, Sampler};
use super::{ConformanceSpec, Profile, ScenarioResult, RECOVERY_BOUND};
use idem::model::{Model, Outcome};
use idem::tools::sample::{generate, Rng, SampleRecord, SampleSpec};

type Run = fn(
    ConformanceSpec,
    u64,
) -> Pin<Box<dyn Future<Output = anyhow::Result<(ScenarioResult, u32)>> + Send>>;

pub struct Scenario {
    pub name: &'static str,
    pub run: Run,
}

pub fn all(profile: Profile) -> Vec<Scenario> {
    let mut v = vec![
        Scenario {
            name: "sigkill-random",
            run: |s, seed| Box::pin(sigkill_random(s, seed)),
        },
        Scenario {
            name: "sigterm-mid-batch",
            run: |s, seed| Box::pin(sigterm_mid_batch(s, seed)),
        },
        Scenario {
            name: "redis-stalled",
            run: |s, seed| Box::pin(redis_stalled(s, seed)),
        },
        Scenario {
            name: "redis-killed-fsync",
            run: |s, seed| Box::pin(redis_killed(s, seed, "always")),
        },
        Scenario {
            name: "lua-error-mid-batch",
            run: |s, seed| Box::pin(lua_error(s, seed)),
        },
        Scenario {
            name: "duplicates-after-window",
            run: |s, seed| Box::pin(after_window(s, seed)),
        },
        Scenario {
            name: "replay-from-earliest",
            run: |s, seed| Box::pin(replay_earliest(s, seed)),
        },
        Scenario {
            name: "poison-record",
            run: |s, seed| Box::pin(poison(s, seed)),
        },
    ];
    if profile == Profile::Full {
        v.push(Scenario {
            name: "rebalance-storm",
            run: |s, seed| Box::pin(storm(s, seed)),
        });
        v.push(Scenario {
            name: "zombie",
            run: |s, seed| Box::pin(zombie(s, seed)),
        });
        v.push(Scenario {
            name: "redis-killed-ack-everysec",
            run: |s, seed| Box::pin(redis_killed(s, seed, "everysec")),
        });
        v.push(Scenario {
            name: "kafka-broker-restart",
            run: |s, seed| Box::pin(kafka_restart(s, seed)),
        });
        v.push(Scenario {
            name: "oversized-dead-letter",
            run: |s, seed| Box::pin(oversized_dead_letter(s, seed)),
        });
        v.push(Scenario {
            name: "redis-out-of-memory",
            run: |s, seed| Box::pin(redis_oom(s, seed)),
        });
        v.push(Scenario {
            name: "eviction-policy-refused",
            run: |s, seed| Box::pin(eviction_refused(s, seed)),
        });
        v.push(Scenario {
            name: "dead-letter-topic-unavailable",
            run: |s, seed| Box::pin(dead_letter_topic_unavailable(s, seed)),
        });
        v.push(Scenario {
            name: "poison-flood-budget",
            run: |s, seed| Box::pin(poison_flood(s, seed)),
        });
        v.push(Scenario {
            name: "redis-cluster-master-failover",
            run: |s, seed| Box::pin(cluster_failover(s, seed)),
        });
        v.push(Scenario {
            name: "commit-fails-in-rebalance",
            run: |s, seed| Box::pin(commit_fails_in_rebalance(s, seed)),
        });
    }
    v
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

fn kills_for(spec: &ConformanceSpec) -> u32 {
    match spec.profile {
        Profile::Short => 3,
        Profile::Full => 20,
    }
}

async fn sigkill_random(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let kills = kills_for(&spec);
    let events = if spec.profile == Profile::Full {
        60_000
    } else {
        8_000
    };
    let mut case = Case::new(&spec, "sigkill-random", seed, events, 6).await?;
    let sampler = case.sampler();
    let mut rng = Rng::new(seed);
    let slices = kills as usize + 1;
    let per = case.records.len() / slices + 1;
    let mut violations = 0;
    for k in 0..kills as usize {
        case.produce(k * per, ((k + 1) * per).min(case.records.len()))
            .await?;
        let p = case.spawn(&[])?;
        wait_processing(&p, 1, RECOVERY_BOUND).await?;
        // Anywhere: before, inside or after a batch.
        tokio::time::sleep(Duration::from_millis(rng.below(600))).await;
        p.kill();
        case.kills += 1;
        violations += case.check_commits().await?;
    }
    case.produce(kills as usize * per, case.records.len())
        .await?;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    p.terminate().await;
    violations += case.check_commits().await?;
    case.faults
        .push(format!("{kills} SIGKILLs at random moments"));
    case.finish(Some(sampler), violations, String::new(), false)
        .await
}

async fn sigterm_mid_batch(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "sigterm-mid-batch", seed, 10_000, 4).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n).await?;
    let mut violations = 0;
    let mut clean = true;
    for _ in 0..2 {
        let p = case.spawn(&[("IDEM__PIPELINE__BATCH_MAX_EVENTS", "200")])?;
        wait_processing(&p, 1, RECOVERY_BOUND).await?;
        clean &= p.terminate().await;
        violations += case.check_commits().await?;
    }
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    p.terminate().await;
    case.faults
        .push("2 SIGTERMs while batches were in flight".into());
    let notes = if clean {
        String::new()
    } else {
        "idem did not exit 0 after SIGTERM".into()
    };
    let (mut r, k) = case.finish(Some(sampler), violations, notes, false).await?;
    if !clean {
        r.verdict = "fail".into();
    }
    Ok((r, k))
}

async fn redis_stalled(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "redis-stalled", seed, 6_000, 4).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n / 2).await?;
    let p = case.spawn(&[])?;
    wait_processing(&p, 1, RECOVERY_BOUND).await?;
    // Stall Redis (every master of a cluster) for three times the client's timeout.
    let mut conn = case.redis.connect().await?;
    let mut pause = redis::cmd("CLIENT");
    pause.arg("PAUSE").arg(3000).arg("ALL");
    for node in conn.masters().await? {
        conn.query_on(&node, &pause).await?;
    }
    case.produce(n / 2, n).await?;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push("Redis paused 3 s (client timeout 1 s)".into());
    case.finish(Some(sampler), violations, String::new(), false)
        .await
}

async fn redis_killed(
    spec: ConformanceSpec,
    seed: u64,
    fsync: &'static str,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let name = if fsync == "always" {
        "redis-killed-fsync"
    } else {
        "redis-killed-ack-everysec"
    };
    let mut case = Case::new(&spec, name, seed, 20_000, 4).await?;
    let mut redis = case.use_private_redis(fsync).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n).await?;
    let durability = if fsync == "always" { "fsync" } else { "ack" };
    let p = case.spawn(&[("IDEM__REDIS__DURABILITY", durability)])?;
    wait_processing(&p, (n / 3) as u64, RECOVERY_BOUND).await?;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart().await?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults.push(format!("redis-server SIGKILLed mid-stream and restarted (appendfsync {fsync}, durability {durability})"));
    let notes = if fsync == "always" {
        String::new()
    } else {
        "durability = ack with appendfsync everysec: Redis may lose up to 1 s of acknowledged writes, whose offsets may be committed".into()
    };
    case.finish(Some(sampler), violations, notes, fsync != "always")
        .await
}

async fn lua_error(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "lua-error-mid-batch", seed, 6_000, 4).await?;
    // An entity whose first event comes late: its state key is made a string,
    // so the script fails with WRONGTYPE in the middle of a batch.
    let victim = case
        .records
        .iter()
        .skip(case.records.len() / 2)
        .find_map(|r| {
            let e = idem::event::decode(Some(&r.value), &idem::event::FieldMap::default(), 1 << 20)
                .ok()?;
            let first = case.records.iter().position(|x| x.key == r.key)?;
            // Its first event must be an upsert: a delete would remove the injected string.
            let first_is_upsert = idem::event::decode(
                Some(&case.records[first].value),
                &idem::event::FieldMap::default(),
                1 << 20,
            )
            .is_ok_and(|f| f.op == idem::event::Op::Upsert);
            (first > case.records.len() / 2 && first_is_upsert).then_some(e.entity)
        })
        .unwrap_or_else(|| {
            case.model
                .entities
                .keys()
                .last()
                .cloned()
                .unwrap_or_default()
        });
    let state_key = idem::store::KeyLayout::new(&case.topic).state_key(&victim);
    let mut conn = case.redis.connect().await?;
    let _: () = redis::cmd("SET")
        .arg(&state_key)
        .arg("not a hash")
        .query_async(&mut conn)
        .await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n).await?;
    let p = case.spawn(&[])?;
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(case.env.work_dir.join(format!("{}.log", case.topic)))
            .unwrap_or_default();
        if log.contains("WRONGTYPE") {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "the injected script error never happened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _: () = redis::cmd("DEL")
        .arg(&state_key)
        .query_async(&mut conn)
        .await?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push("script error (WRONGTYPE) inside a batch for 2 s".into());
    case.finish(Some(sampler), violations, String::new(), false)
        .await
}

async fn after_window(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "duplicates-after-window", seed, 3_000, 2).await?;
    let n = case.records.len();
    case.produce(0, n).await?;
    let extra = [("IDEM__DEDUPE__WINDOW", "300ms")];
    let p = case.spawn(&extra)?;
    case.catch_up().await?;
    // Wait past two windows, then redeliver a copy of everything.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let copies = case.records.clone();
    let delivered = harness::produce(&case.env, &case.topic, &copies).await?;
    let none_applied = vec![false; copies.len()];
    case.positions
        .extend(harness::positions(&copies, &delivered, &none_applied));
    case.catch_up().await?;
    let applied_again = p.outcome(Some(Outcome::Applied)).await;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push(format!("{n} records redelivered after the window expired"));
    let notes = format!("{applied_again} applied over both passes");
    case.finish(None, violations, notes, false).await
}

async fn replay_earliest(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "replay-from-earliest", seed, 4_000, 3).await?;
    let n = case.records.len();
    case.produce(0, n).await?;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    p.terminate().await;
    let (brokers, group, topic) = (
        case.env.brokers.clone(),
        case.topic.clone(),
        case.topic.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        loop {
            let plan = idem::tools::replay::plan(
                &idem::config::KafkaConfig::for_brokers(&brokers),
                &group,
                &topic,
                None,
                &idem::tools::replay::ReplayTarget::Earliest,
                idem::config::OffsetReset::Earliest,
            )?;
            if plan.members.is_empty() {
                return idem::tools::replay::execute(
                    &idem::config::KafkaConfig::for_brokers(&brokers),
                    &plan,
                );
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "the group never emptied"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await??;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    let applied = p.outcome(Some(Outcome::Applied)).await;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push("offsets moved to earliest, whole topic read again".into());
    let (mut r, k) = case
        .finish(
            None,
            violations,
            format!("{applied} applied on the replay"),
            false,
        )
        .await?;
    if applied != 0 {
        r.verdict = "fail".into();
    }
    Ok((r, k))
}

async fn poison(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "poison-record", seed, 3_000, 2).await?;
    let n = case.records.len();
    // Poison records between the good ones: they go to the dead-letter topic.
    for (i, r) in case.records.clone().iter().enumerate().step_by(97) {
        case.records.insert(
            i,
            SampleRecord {
                key: r.key.clone(),
                value: b"\x00poison{".to_vec(),
            },
        );
    }
    case.applied = harness::oracle_applies(&case.records);
    case.produce(0, case.records.len()).await?;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    let invalid = p.outcome(Some(Outcome::Invalid)).await;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults.push(format!(
        "{} poison records among {n}",
        case.records.len() - n
    ));
    let expected = (case.records.len() - n) as u64;
    case.finish_counting(None, violations, "dead-lettered", invalid, expected)
        .await
}

async fn storm(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "rebalance-storm", seed, 40_000, 12).await?;
    let sampler = case.sampler();
    let mut rng = Rng::new(seed);
    let mut members: Vec<IdemProcess> = (0..3)
        .map(|_| case.spawn(&[]))
        .collect::<anyhow::Result<_>>()?;
    let n = case.records.len();
    let slices = 20;
    for s in 0..slices {
        case.produce(s * n / slices, (s + 1) * n / slices).await?;
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1500))).await;
        let leaving = members.remove(rng.below(members.len() as u64) as usize);
        if s % 2 == 0 {
            leaving.terminate().await;
        } else {
            leaving.kill();
            case.kills += 1;
        }
        members.push(case.spawn(&[])?);
    }
    case.catch_up().await?;
    for m in members {
        m.terminate().await;
    }
    let violations = case.check_commits().await?;
    case.faults.push(format!(
        "{slices} leaves and joins (half SIGTERM, half SIGKILL) among 3 instances"
    ));
    case.finish(Some(sampler), violations, String::new(), false)
        .await
}

async fn zombie(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "zombie", seed, 10_000, 4).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    let extra = [("IDEM__KAFKA__LIBRDKAFKA__MAX.POLL.INTERVAL.MS", "7000")];
    case.produce(0, n / 3).await?;
    let zombie = case.spawn(&extra)?;
    let other = case.spawn(&extra)?;
    wait_processing(&zombie, 1, RECOVERY_BOUND).await?;
    zombie.stop();
    case.produce(n / 3, 2 * n / 3).await?;
    // Past session timeout and max.poll.interval: the group moves on.
    tokio::time::sleep(Duration::from_secs(12)).await;
    zombie.resume();
    case.produce(2 * n / 3, n).await?;
    case.catch_up().await?;
    zombie.terminate().await;
    other.terminate().await;
    let violations = case.check_commits().await?;
    case.faults.push(
        "one instance SIGSTOPped 12 s (session 6 s, max.poll.interval 7 s), then SIGCONT".into(),
    );
    case.finish(Some(sampler), violations, String::new(), false)
        .await
}

async fn kafka_restart(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let (Some(kill), Some(start)) = (spec.kafka_kill_cmd.clone(), spec.kafka_start_cmd.clone())
    else {
        anyhow::bail!("skipped: needs --kafka-kill-cmd and --kafka-start-cmd");
    };
    let mut case = Case::new(&spec, "kafka-broker-restart", seed, 10_000, 4).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n / 2).await?;
    let p = case.spawn(&[])?;
    wait_processing(&p, 1, RECOVERY_BOUND).await?;
    let sh = |cmd: &str| std::process::Command::new("sh").arg("-c").arg(cmd).status();
    anyhow::ensure!(sh(&kill)?.success(), "--kafka-kill-cmd failed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(sh(&start)?.success(), "--kafka-start-cmd failed");
    case.produce(n / 2, n).await?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push("Kafka broker killed and restarted mid-stream".into());
    case.finish(Some(sampler), violations, String::new(), false)
        .await
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

/// Invalid records above librdkafka's default producer limit and above the
/// dead-letter topic's limit (dead-lettered as references): none blocks.
async fn oversized_dead_letter(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "oversized-dead-letter", seed, 3_000, 2).await?;
    // The source topic takes 3 MB records; its dead-letter topic keeps Kafka's default.
    harness::set_topic_config(&case.env, &case.topic, "max.message.bytes", "3000000").await?;
    let n = case.records.len();
    let inserted = insert_bad(&mut case, 500, |i| {
        let mut v = b"{\"not json".to_vec();
        v.resize(if i % 2 == 0 { 1_040_000 } else { 2_000_000 }, b'x');
        v
    });
    let sampler = case.sampler();
    case.produce(0, case.records.len()).await?;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    let invalid = p.outcome(Some(Outcome::Invalid)).await;
    p.terminate().await;
    let violations = case.check_commits().await?;
    let letters = dead_letter_count(&case).await?;
    case.faults.push(format!(
        "{inserted} invalid records of 1,040,000 and 2,000,000 bytes among {n}"
    ));
    anyhow::ensure!(
        invalid == letters,
        "{invalid} records counted invalid but {letters} dead letters"
    );
    case.finish_counting(
        Some(sampler),
        violations,
        "dead letters",
        letters,
        inserted as u64,
    )
    .await
}

/// Redis reaches maxmemory (noeviction) mid-stream: scripts fail with OOM
/// and are retried; once memory is freed, idem catches up.
async fn redis_oom(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "redis-out-of-memory", seed, 8_000, 4).await?;
    let redis = case.use_private_redis("always").await?;
    let mut conn = case.redis.connect().await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1 << 20);
    // Room for a part of the stream only.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 256 * 1024)
        .query_async(&mut conn)
        .await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n).await?;
    let p = case.spawn(&[])?;
    let log = case.env.work_dir.join(format!("{}.log", case.topic));
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("OOM")
    {
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "Redis never ran out of memory"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut conn)
        .await?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push("Redis at maxmemory (noeviction) mid-stream for 2 s: scripts fail with OOM".into());
    let result = case
        .finish(Some(sampler), violations, String::new(), false)
        .await;
    drop(redis);
    result
}

/// A Redis whose maxmemory-policy may evict idem's keys is refused at start
/// (nothing applied, nothing committed); with noeviction idem runs.
async fn eviction_refused(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "eviction-policy-refused", seed, 3_000, 2).await?;
    let redis = case.use_private_redis("always").await?;
    let mut conn = case.redis.connect().await?;
    let policy = |p: &'static str| {
        let mut c = redis::cmd("CONFIG");
        c.arg("SET").arg("maxmemory-policy").arg(p);
        c
    };
    let _: () = policy("volatile-lru").query_async(&mut conn).await?;
    let n = case.records.len();
    case.produce(0, n).await?;
    let refused = case.spawn(&[])?;
    let status = refused.wait_exit(RECOVERY_BOUND).await?;
    let committed =
        harness::committed(&case.env, &case.topic, &case.topic, case.partitions).await?;
    let mut notes = String::new();
    if status.success() || committed.iter().any(|c| *c >= 0) {
        notes = format!("not refused: exit {status}, committed {committed:?}");
    }
    let _: () = policy("noeviction").query_async(&mut conn).await?;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults
        .push("maxmemory-policy volatile-lru at start, then noeviction".into());
    let refused_ok = notes.is_empty();
    let (mut r, k) = case.finish(None, violations, notes, false).await?;
    if !refused_ok {
        r.verdict = "fail".into();
    }
    drop(redis);
    Ok((r, k))
}

/// Invalid records while the dead-letter topic is missing: their partition
/// is blocked (`/readyz` says so) and nothing past them is committed; once
/// the topic exists each is dead-lettered once.
async fn dead_letter_topic_unavailable(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "dead-letter-topic-unavailable", seed, 3_000, 2).await?;
    harness::delete_topic(&case.env, &format!("{}.dlq", case.topic)).await?;
    let n = case.records.len();
    let inserted = insert_bad(&mut case, 300, |_| b"\x00poison{".to_vec());
    let sampler = case.sampler();
    case.produce(0, case.records.len()).await?;
    let p = case.spawn(&[
        ("IDEM__PIPELINE__STALL_TIMEOUT", "2s"),
        ("IDEM__DLQ__SEND_TIMEOUT", "1s"),
    ])?;
    wait_ready_text(
        &p,
        "the partition is reported blocked",
        RECOVERY_BOUND,
        |b| b.contains("blocked by dead_letter"),
    )
    .await?;
    let held = case.check_commits().await?;
    harness::create_topic(&case.env, &case.topic, case.partitions).await?;
    case.catch_up().await?;
    wait_ready_text(&p, "ready again", RECOVERY_BOUND, |b| b == "ready\n").await?;
    p.terminate().await;
    let violations = held + case.check_commits().await?;
    let letters = dead_letter_count(&case).await?;
    case.faults.push(format!(
        "dead-letter topic missing with {inserted} invalid records among {n}, then created"
    ));
    case.finish_counting(
        Some(sampler),
        violations,
        "dead letters",
        letters,
        inserted as u64,
    )
    .await
}

/// A flood of poison trips the dead-letter budget: consumption stops with
/// the reason on /readyz; with the budget raised a restart catches up, and
/// every poison record is dead-lettered exactly once.
async fn poison_flood(spec: ConformanceSpec, seed: u64) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "poison-flood-budget", seed, 3_000, 1).await?;
    let n = case.records.len();
    let flood = 800;
    let at = n / 2;
    for i in 0..flood {
        case.records.insert(
            at + i,
            SampleRecord {
                key: format!("flood-{i}"),
                value: b"\x00poison{".to_vec(),
            },
        );
    }
    case.applied = harness::oracle_applies(&case.records);
    let sampler = case.sampler();
    case.produce(0, case.records.len()).await?;
    let p = case.spawn(&[])?;
    wait_ready_text(&p, "the budget stops consumption", RECOVERY_BOUND, |b| {
        b.contains("dead-letter ratio")
    })
    .await?;
    p.terminate().await;
    let mut violations = case.check_commits().await?;
    let p = case.spawn(&[("IDEM__DLQ__MAX_RATIO", "1.0")])?;
    case.catch_up().await?;
    p.terminate().await;
    violations += case.check_commits().await?;
    let letters = dead_letter_count(&case).await?;
    case.faults.push(format!(
        "{flood} poison records in a row among {n} (dlq.max_ratio 0.5), then a restart with 1.0"
    ));
    case.finish_counting(
        Some(sampler),
        violations,
        "dead letters",
        letters,
        flood as u64,
    )
    .await
}

/// A Redis Cluster master dies mid-stream (durability replicas:1): its
/// replica takes over, idem retries and goes on once the old master rejoins
/// as a replica.
async fn cluster_failover(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "redis-cluster-master-failover", seed, 12_000, 4).await?;
    let mut cluster = harness::PrivateCluster::start(&spec.env.work_dir)
        .map_err(|e| anyhow::anyhow!("skipped: {e}"))?;
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    case.redis = cluster.target();
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n / 2).await?;
    let p = case.spawn(&[("IDEM__REDIS__DURABILITY", "replicas:1")])?;
    wait_processing(&p, 1, RECOVERY_BOUND).await?;
    let (master, replica) = cluster
        .master_and_replica()
        .ok_or_else(|| anyhow::anyhow!("no master with a replica"))?;
    cluster.kill(master);
    case.produce(n / 2, n).await?;
    let start = Instant::now();
    while harness::PrivateCluster::role(replica).0 != "master" {
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "the replica never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.restart(master)?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults.push(
        "a master of a 3×2 cluster SIGKILLed mid-stream (durability replicas:1), restarted once its replica took over".into(),
    );
    let result = case
        .finish(Some(sampler), violations, String::new(), false)
        .await;
    drop(cluster);
    result
}

/// Commits fail during a rebalance: a third instance joins, and the broker
/// is SIGSTOPped for 8 s while the group rebalances (the revoke's
/// synchronous commit and the members' periodic commits time out), then
/// SIGCONTed.
async fn commit_fails_in_rebalance(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let (Some(pause), Some(resume)) = (spec.kafka_pause_cmd.clone(), spec.kafka_resume_cmd.clone())
    else {
        anyhow::bail!("skipped: needs --kafka-pause-cmd and --kafka-resume-cmd");
    };
    let mut case = Case::new(&spec, "commit-fails-in-rebalance", seed, 12_000, 6).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    case.produce(0, n / 2).await?;
    let a = case.spawn(&[])?;
    let b = case.spawn(&[])?;
    let start = Instant::now();
    while a.outcome(None).await + b.outcome(None).await == 0 {
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "neither instance processed anything within {RECOVERY_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sh = |cmd: &str| std::process::Command::new("sh").arg("-c").arg(cmd).status();
    let c = case.spawn(&[])?;
    // The join starts a rebalance; pause the broker while it is under way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    anyhow::ensure!(sh(&pause)?.success(), "--kafka-pause-cmd failed");
    tokio::time::sleep(Duration::from_secs(8)).await;
    anyhow::ensure!(sh(&resume)?.success(), "--kafka-resume-cmd failed");
    case.produce(n / 2, n).await?;
    case.catch_up().await?;
    for m in [a, b, c] {
        m.terminate().await;
    }
    let violations = case.check_commits().await?;
    case.faults.push(
        "a third instance joins; the broker SIGSTOPped 8 s during the rebalance, then SIGCONT"
            .into(),
    );
    case.finish(Some(sampler), violations, String::new(), false)
        .await
}
