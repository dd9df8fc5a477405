//! Scenarios that kill, stop or multiply idem and Kafka processes.

use super::*;

pub(super) async fn sigkill_random(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

pub(super) async fn sigterm_mid_batch(
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

pub(super) async fn storm(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

pub(super) async fn zombie(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "zombie", seed, 10_000, 4).await?;
    let sampler = case.sampler();
    let n = case.records.len();
    let extra = [("IDEM__KAFKA__LIBRDKAFKA__MAX.POLL.INTERVAL.MS", "7000")];
    let zombie = case.spawn(&extra)?;
    let other = case.spawn(&extra)?;
    // Both own partitions before anything is produced: otherwise the first
    // to join drains them all, and the zombie has nothing to be stopped in.
    wait_owning(&[&zombie, &other], RECOVERY_BOUND).await?;
    case.produce(0, n / 3).await?;
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

pub(super) async fn kafka_restart(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

/// Commits fail during a rebalance: a third instance joins, and the broker
/// is SIGSTOPped for 8 s while the group rebalances (the revoke's
/// synchronous commit and the members' periodic commits time out), then
/// SIGCONTed.
pub(super) async fn commit_fails_in_rebalance(
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
