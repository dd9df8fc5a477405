//! Scenarios about what is in the log: old ids, replays, poison records and
//! dead letters.

use super::*;

pub(super) async fn after_window(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

pub(super) async fn replay_earliest(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "replay-from-earliest", seed, 4_000, 3).await?;
    let n = case.records.len();
    case.produce(0, n).await?;
    let p = case.spawn(&[])?;
    case.catch_up().await?;
    p.terminate().await;
    replay_to_earliest(&case).await?;
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

/// `idem replay --to-earliest --execute` on the case's group, run as the
/// operator runs it (the binary, its Redis tie included), once the group
/// is empty.
async fn replay_to_earliest(case: &Case) -> anyhow::Result<()> {
    let topic = case.topic.as_str();
    let args = [
        "--topic",
        topic,
        "--group",
        topic,
        "--to-earliest",
        "--execute",
    ];
    let start = Instant::now();
    loop {
        let (code, out) = super::tool_cases::tool(case, topic, "replay", &args).await?;
        if code == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            out.contains("active member") && start.elapsed() < Duration::from_secs(60),
            "idem replay failed: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counters, a ledger and a custom effect replayed from earliest once the
/// dedupe window has passed, SIGKILLed mid-replay: the offset marks
/// recognise every record (`replayed`), so no balance moves, no ledger
/// entry is added and no status changes (docs/guarantees.md, "Replays").
pub(super) async fn replay_after_window_counters(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    use crate::payments::{self, PaymentsSpec};
    let mut case = Case::new(&spec, "replay-after-window-counters", seed, 1, 3).await?;
    let file = payments::write_config(&case.env.work_dir.join(&case.topic), &case.topic)?;
    let policy = idem::config::Config::load(Some(&file), &Default::default())?.policy(&case.topic);
    case.records = payments::generate(&PaymentsSpec {
        events: 4_000,
        accounts: 100,
        duplicate_ratio: 0.2,
        out_of_order_ratio: 0.1,
        seed,
        prefix: case.topic.clone(),
    });
    let (model, _, points) = payments::oracle(&case.records, &policy);
    case.model = model;
    case.applied = payments::oracle_applies(&case.records, &policy);
    case.produce(0, case.records.len()).await?;
    let config = file.to_string_lossy().into_owned();
    let extra = [
        ("IDEM_CONFIG", config.as_str()),
        ("IDEM__DEDUPE__WINDOW", "2s"),
    ];
    let p = case.spawn(&extra)?;
    case.catch_up().await?;
    p.terminate().await;
    // Redis remembers an id for at most two windows: past them, only the
    // decided ranges and the offset marks know these records. Without the
    // ranges (as after a lost claim), the marks alone must.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let forgotten = forget_decided_ranges(&case).await?;
    replay_to_earliest(&case).await?;
    let p = case.spawn(&extra)?;
    wait_processing(&p, 1, RECOVERY_BOUND).await?;
    p.kill();
    case.kills += 1;
    let p = case.spawn(&extra)?;
    case.catch_up().await?;
    let mut counted_again = 0;
    for outcome in [Outcome::Applied, Outcome::Late, Outcome::Partial] {
        counted_again += p.outcome(Some(outcome)).await;
    }
    let replayed = p.outcome(Some(Outcome::Replayed)).await;
    p.terminate().await;
    let violations = case.check_commits().await?;
    let (lost, doubled, wrong) = effects_against_oracle(&case, &points).await?;
    case.faults.push(format!(
        "replay from earliest after a 2 s window{}, SIGKILL mid-replay ({} records)",
        if forgotten {
            " with the decided ranges deleted"
        } else {
            ""
        },
        case.records.len()
    ));
    let notes = format!(
        "{replayed} replayed and {counted_again} applied or counted after the kill; accounts off the oracle: {wrong:?}"
    );
    let (mut r, k) = case.finish(None, violations, notes, false).await?;
    r.lost += lost;
    r.doubled += doubled;
    if counted_again != 0 || lost + doubled != 0 {
        r.verdict = "fail".into();
    }
    Ok((r, k))
}

/// Deletes the case's decided ranges (standalone Redis: one hash), so that
/// only the offset marks recognise a replay. Whether it did.
async fn forget_decided_ranges(case: &Case) -> anyhow::Result<bool> {
    if case.redis.is_cluster() {
        return Ok(false);
    }
    let mut conn = case.redis.connect().await?;
    let key = idem::store::KeyLayout::new(&case.topic).decided_key(None);
    let deleted: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
    anyhow::ensure!(deleted == 1, "no decided ranges at {key}");
    Ok(true)
}

/// Balances, ledgers and points against the payments oracle: (accounts
/// below it, accounts above it, a few examples).
async fn effects_against_oracle(
    case: &Case,
    points: &std::collections::BTreeMap<String, u64>,
) -> anyhow::Result<(u64, u64, Vec<String>)> {
    let mut conn = case.redis.connect().await?;
    let layout = idem::store::KeyLayout::new(&case.topic);
    let (mut lost, mut doubled, mut examples) = (0, 0, Vec::new());
    for (entity, want) in &case.model.entities {
        let got = idem::store::commutative::read(
            &mut conn,
            &layout,
            entity,
            &["ledger".to_string()],
            &[],
        )
        .await?;
        let mut want_view = want.commutative_view();
        if let Some(p) = points.get(entity) {
            want_view.counters.insert("points".into(), p.to_string());
        }
        if got == want_view {
            continue;
        }
        let entries =
            |v: &idem::effects::CommutativeView| v.ledgers.values().map(Vec::len).sum::<usize>();
        if entries(&got) > entries(&want_view) {
            doubled += 1;
        } else {
            lost += 1;
        }
        if examples.len() < 3 {
            examples.push(format!(
                "{entity}: redis {:?}, oracle {:?}",
                got.counters, want_view.counters
            ));
        }
    }
    Ok((lost, doubled, examples))
}

pub(super) async fn poison(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

/// Invalid records above librdkafka's default producer limit and above the
/// dead-letter topic's limit (dead-lettered as references): none blocks.
pub(super) async fn oversized_dead_letter(
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

/// Invalid records while the dead-letter topic is missing: their partition
/// is blocked (`/readyz` says so) and nothing past them is committed; once
/// the topic exists each is dead-lettered once.
pub(super) async fn dead_letter_topic_unavailable(
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
pub(super) async fn poison_flood(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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
