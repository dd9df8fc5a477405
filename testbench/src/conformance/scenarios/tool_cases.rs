//! Scenarios where the operator's tools act between the data path's
//! faults: every tool that writes offsets or state runs as the operator
//! runs it (the binary), and the result is held to the same oracle.

use super::*;

/// The scenarios of this file: (name, only in the full profile, run).
pub(super) fn table() -> [(&'static str, bool, Run); 5] {
    [
        ("tools-replay-then-redis-fault", true, |s, seed| {
            Box::pin(replay_then_redis_fault(s, seed))
        }),
        ("tools-reconcile-during-traffic", true, |s, seed| {
            Box::pin(reconcile_during_traffic(s, seed))
        }),
        (
            "tools-changelog-snapshot-during-traffic",
            true,
            |s, seed| Box::pin(changelog_snapshot_during_traffic(s, seed)),
        ),
        ("tools-dlq-redrive-during-rebalance", true, |s, seed| {
            Box::pin(dlq_redrive_during_rebalance(s, seed))
        }),
        ("tools-topics-apply-adds-partitions", true, |s, seed| {
            Box::pin(topics_apply_adds_partitions(s, seed))
        }),
    ]
}

/// Runs `idem <subcommand> <args>` for the case (its brokers, Redis, key
/// prefix and group; `topics` as kafka.topics; `env` more settings) to its
/// end: the exit code and what it printed.
pub(super) async fn tool_with(
    case: &Case,
    topics: &str,
    subcommand: &'static str,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(i32, String)> {
    let mut cmd = crate::process::IdemCommand::new(
        &case.env.idem_exe,
        &case.env.brokers,
        topics,
        &case.topic,
    )
    .clean_env()
    .redis(&case.redis.url, case.redis.mode, &case.topic)
    .subcommand(subcommand)
    .args(args);
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// `tool_with` without more settings.
pub(super) async fn tool(
    case: &Case,
    topics: &str,
    subcommand: &'static str,
    args: &[&str],
) -> anyhow::Result<(i32, String)> {
    tool_with(case, topics, subcommand, args, &[]).await
}

/// `tool`, which must exit 0.
async fn tool_ok(case: &Case, subcommand: &'static str, args: &[&str]) -> anyhow::Result<String> {
    let topic = case.topic.clone();
    let (code, out) = tool(case, &topic, subcommand, args).await?;
    anyhow::ensure!(code == 0, "idem {subcommand} {args:?} exited {code}: {out}");
    Ok(out)
}

/// `idem replay --execute` of the case's topic and group with `target`.
async fn replay(case: &Case, target: &[&str]) -> anyhow::Result<String> {
    let topic = case.topic.clone();
    let mut args = vec!["--topic", topic.as_str(), "--group", topic.as_str()];
    args.extend_from_slice(target);
    args.push("--execute");
    tool_ok(case, "replay", &args).await
}

/// What the operator does while the group is stopped, before a Redis fault.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// `idem replay --to-timestamp <now>`: a plan that moves nothing.
    NoOpReplay,
    /// `idem replay --shift-by -N`: a backward move.
    BackwardReplay,
    /// The group's commits written again by a plain Kafka client.
    PlainCommit,
    /// The next chunk produced while stopped, then `idem replay
    /// --to-latest --allow-skip`: those records are skipped.
    ForwardSkip,
}

/// What happens to Redis once idem runs again.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Killed and restarted empty.
    Lost,
    /// Killed and restarted on a snapshot saved when idem started.
    Restored,
}

/// Every writing action of replay, and a plain client's commit, each
/// followed by a Redis loss or a snapshot restore under the next run: the
/// state must end equal to the whole log's (records skipped before a loss
/// are applied by the rewind to 0: docs/guarantees.md, "A skip, then a
/// loss").
pub(super) async fn replay_then_redis_fault(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let rounds = [
        (Action::NoOpReplay, Fault::Lost),
        (Action::BackwardReplay, Fault::Restored),
        (Action::PlainCommit, Fault::Lost),
        (Action::ForwardSkip, Fault::Lost),
    ];
    let mut case = Case::new(&spec, "tools-replay-then-redis-fault", seed, 6_000, 3).await?;
    let mut redis = case.use_private_redis("none").await?;
    let chunk = case.records.len() / (rounds.len() + 1);
    case.produce(0, chunk).await?;
    let extra = [("IDEM__REDIS__DURABILITY", "ack")];
    let p = case.spawn(&extra)?;
    case.catch_up().await?;
    p.terminate().await;
    for (i, (action, fault)) in rounds.into_iter().enumerate() {
        let from = chunk * (i + 1);
        let to = if i + 1 == rounds.len() {
            case.records.len()
        } else {
            from + chunk
        };
        act(&mut case, action, from, to).await?;
        let p = case.spawn(&extra)?;
        wait_owning(&[&p], RECOVERY_BOUND).await?;
        wait_tied(&case).await?;
        let saved = save_snapshot(&redis).await?;
        if !matches!(action, Action::ForwardSkip) {
            // Half the chunk past the snapshot, so a restore is behind.
            let before = p.outcome(None).await;
            case.produce(from, to).await?;
            wait_processing(&p, before + (chunk / 2) as u64, RECOVERY_BOUND).await?;
        }
        redis.kill();
        let rdb = redis.dir().join("dump.rdb");
        if fault == Fault::Restored {
            std::fs::copy(&saved, &rdb)?;
        } else {
            let _ = std::fs::remove_file(&rdb);
        }
        redis.restart().await?;
        wait_repaired(&p).await?;
        case.catch_up().await?;
        p.terminate().await;
        case.faults
            .push(format!("{action:?} then Redis {fault:?}").to_lowercase());
    }
    let violations = case.check_commits().await?;
    case.finish(None, violations, String::new(), false).await
}

/// Does `action` while the group is stopped; `from..to` is the next chunk.
async fn act(case: &mut Case, action: Action, from: usize, to: usize) -> anyhow::Result<()> {
    match action {
        Action::NoOpReplay => {
            let now = idem::pipeline::unix_millis().to_string();
            let out = replay(case, &["--to-timestamp", &now]).await?;
            anyhow::ensure!(
                out.contains("nothing to move"),
                "the no-op replay moved something: {out}"
            );
        }
        Action::BackwardReplay => {
            replay(case, &["--shift-by", "-300"]).await?;
        }
        Action::PlainCommit => {
            let offsets =
                harness::committed(&case.env, &case.topic, &case.topic, case.partitions).await?;
            harness::commit_plain(&case.env, &case.topic, &case.topic, &offsets).await?;
        }
        Action::ForwardSkip => {
            case.produce(from, to).await?;
            replay(case, &["--to-latest", "--allow-skip"]).await?;
        }
    }
    Ok(())
}

/// Until every commit of the case's group carries idem's metadata: the
/// bootstrap of a plain commit is tied to Redis (a loss before the tie is
/// an ambiguous start, refused by design).
async fn wait_tied(case: &Case) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let metadata =
            harness::committed_metadata(&case.env, &case.topic, &case.topic, case.partitions)
                .await?;
        // A partition without a commit (-1) has nothing to tie.
        if metadata
            .iter()
            .all(|(offset, m)| *offset < 0 || m.starts_with("idem.v1 epoch="))
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "the group's commits were not tied to Redis: {metadata:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Until `p` (started before the fault) rewound and re-read back to its
/// commits (`/readyz` ready): a loss under an idle partition is
/// noticed at the next progress check, and a caught-up group's commits do
/// not say when the re-read ends.
async fn wait_repaired(p: &IdemProcess) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let text = p.metrics().await.unwrap_or_default();
        let rewinds = crate::exposition::sum(&text, "idem_redis_rewinds_total", &[]);
        let ready = idem::metrics::fetch_local(p.port, "/readyz")
            .await
            .is_some_and(|b| b == "ready\n");
        if rewinds >= 1.0 && ready {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "idem did not repair the loss within {RECOVERY_BOUND:?} (rewinds {rewinds}, ready {ready})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `SAVE`s the private server and copies its snapshot aside.
async fn save_snapshot(redis: &PrivateRedis) -> anyhow::Result<std::path::PathBuf> {
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await?;
    let saved = redis.dir().join("tools-snapshot.rdb");
    std::fs::copy(redis.dir().join("dump.rdb"), &saved)?;
    Ok(saved)
}

/// Two topics write one key prefix; `idem reconcile --repair` (then with
/// `--delete-extra`) runs while records arrive, the second while the whole
/// second topic does. Repairs never lower a seq, the extras check reads
/// both topics and leaves entities written after its read began, so
/// nothing is lost, doubled or deleted.
pub(super) async fn reconcile_during_traffic(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "tools-reconcile-during-traffic", seed, 4_000, 2).await?;
    let second = format!("{}-b", case.topic);
    harness::create_topic(&case.env, &second, 2).await?;
    let on_second = generate(&SampleSpec {
        events: 2_000,
        entities: 100,
        duplicate_ratio: 0.2,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.02,
        data_bytes: 16,
        seed: seed + 1,
        prefix: second.clone(),
        zipf: None,
    });
    case.model
        .entities
        .extend(harness::oracle(&on_second).entities);
    let topics = format!("{},{}", case.topic, second);
    let p = IdemProcess::spawn(
        &case.env,
        &topics,
        &case.topic,
        &case.topic,
        &case.redis,
        &[],
    )?;
    let n = case.records.len();
    // Each run while records arrive: the first while the first topic's
    // first half is produced, the second (--delete-extra) while the whole
    // second topic is, so that its entities appear in Redis after the run's
    // read began (they must not be taken for extras).
    let first_half = case.records[..n / 2].to_vec();
    let runs: [(&[&str], &str, Vec<SampleRecord>); 2] = [
        (&["--repair"], case.topic.as_str(), first_half),
        (
            &["--repair", "--delete-extra"],
            second.as_str(),
            on_second.clone(),
        ),
    ];
    let mut repairs = 0;
    let mut first_delivered = Vec::new();
    for (i, (flags, topic, records)) in runs.into_iter().enumerate() {
        let producing = {
            let (env, topic) = (case.env.clone(), topic.to_string());
            tokio::spawn(async move { harness::produce(&env, &topic, &records).await })
        };
        let report = case.env.work_dir.join(format!("{}-{i}.json", case.topic));
        let report = report.to_string_lossy().into_owned();
        let mut args = flags.to_vec();
        args.extend(["--report", report.as_str()]);
        let (code, out) = tool(&case, &topics, "reconcile", &args).await?;
        anyhow::ensure!(code <= 1, "reconcile failed ({code}): {out}");
        let delivered = producing.await??;
        if i == 0 {
            first_delivered = delivered;
        }
        repairs += 1;
    }
    let rest = harness::produce(&case.env, &case.topic, &case.records[n / 2..]).await?;
    let (first, second_half) = case.records.split_at(n / 2);
    let (applied_first, applied_second) = case.applied.split_at(n / 2);
    let mut positions = harness::positions(first, &first_delivered, applied_first);
    positions.extend(harness::positions(second_half, &rest, applied_second));
    case.positions.extend(positions);
    case.catch_up().await?;
    harness::wait_caught_up(&case.env, &case.topic, &second, 2, RECOVERY_BOUND).await?;
    p.terminate().await;
    case.faults.push(format!(
        "{repairs} reconcile --repair runs (the second with --delete-extra) during traffic on two topics sharing a prefix"
    ));
    let violations = case.check_commits().await?;
    case.finish(None, violations, String::new(), false).await
}

/// `idem changelog snapshot --execute` while the source takes traffic: the
/// snapshot writes each entity's current state under its next version, in
/// the entity's slot, beside the guard's own changes; the state must stay
/// exact and every change published (the outbox drains).
pub(super) async fn changelog_snapshot_during_traffic(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(
        &spec,
        "tools-changelog-snapshot-during-traffic",
        seed,
        6_000,
        3,
    )
    .await?;
    harness::create_topic(&case.env, &format!("{}.changes", case.topic), 3).await?;
    let topic = case.topic.clone();
    let extra = [("IDEM__CHANGELOG__TOPICS", topic.as_str())];
    let p = case.spawn(&extra)?;
    let n = case.records.len();
    case.produce(0, n / 2).await?;
    wait_processing(&p, (n / 4) as u64, RECOVERY_BOUND).await?;
    let produce_rest = {
        let (env, records) = (case.env.clone(), case.records[n / 2..].to_vec());
        let topic = topic.clone();
        tokio::spawn(async move { harness::produce(&env, &topic, &records).await })
    };
    let (code, out) = tool_with(
        &case,
        &topic,
        "changelog",
        &["snapshot", "--topic", &topic, "--execute"],
        &extra,
    )
    .await?;
    anyhow::ensure!(code == 0, "idem changelog snapshot failed ({code}): {out}");
    let delivered = produce_rest.await??;
    case.positions.extend(harness::positions(
        &case.records[n / 2..],
        &delivered,
        &case.applied[n / 2..],
    ));
    case.catch_up().await?;
    wait_outbox_drained(&p).await?;
    p.terminate().await;
    case.faults
        .push("idem changelog snapshot --execute while half the stream arrived".into());
    let violations = case.check_commits().await?;
    case.finish(None, violations, String::new(), false).await
}

/// Until the relay published every change (idem_changelog_outbox_entries 0).
async fn wait_outbox_drained(p: &IdemProcess) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let text = p.metrics().await.unwrap_or_default();
        let waiting: f64 = text
            .lines()
            .filter(|l| l.starts_with("idem_changelog_outbox_entries"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if text.contains("idem_changelog_outbox_entries") && waiting == 0.0 {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < RECOVERY_BOUND,
            "the outbox did not drain within {RECOVERY_BOUND:?} ({waiting} entries)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A "bug" (`event.max_bytes` too small) dead-letters every third record
/// as `too_large`; after the fix, `idem dlq redrive --reason too_large
/// --execute` runs while a second instance joins the group (a rebalance).
/// Each re-published intent is decided once, after its entity's other
/// events: the oracle applies the stream in that order.
pub(super) async fn dlq_redrive_during_rebalance(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "tools-dlq-redrive-during-rebalance", seed, 1, 3).await?;
    // No copies: a copy of an enlarged record would be a conflict.
    case.records = generate(&SampleSpec {
        events: 3_000,
        entities: 150,
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.0,
        data_bytes: 16,
        seed,
        prefix: case.topic.clone(),
        zipf: None,
    });
    let big: Vec<bool> = (0..case.records.len()).map(|i| i % 3 == 0).collect();
    for (r, _) in case.records.iter_mut().zip(&big).filter(|(_, b)| **b) {
        let mut v: serde_json::Value = serde_json::from_slice(&r.value)?;
        v["data"]["blob"] = serde_json::Value::String("z".repeat(400));
        r.value = serde_json::to_vec(&v)?;
    }
    redriven_last(&mut case, &big);
    let n = case.records.len();
    case.produce(0, n).await?;
    let p = case.spawn(&[("IDEM__EVENT__MAX_BYTES", "300")])?;
    case.catch_up().await?;
    p.terminate().await;

    let first = case.spawn(&[])?;
    wait_owning(&[&first], RECOVERY_BOUND).await?;
    let second = case.spawn(&[])?;
    let dlq = format!("{}.dlq", case.topic);
    let topic = case.topic.clone();
    let (code, out) = tool(
        &case,
        &topic,
        "dlq",
        &[
            "redrive",
            "--reason",
            "too_large",
            "--topic",
            &dlq,
            "--execute",
        ],
    )
    .await?;
    anyhow::ensure!(code == 0, "idem dlq redrive failed ({code}): {out}");
    let redriven = big.iter().filter(|b| **b).count();
    anyhow::ensure!(
        out.contains(&format!("re-published {redriven} to")),
        "the redrive did not re-publish every too_large record: {out}"
    );
    case.catch_up().await?;
    first.terminate().await;
    second.terminate().await;
    case.faults.push(format!(
        "{redriven} too_large dead letters re-driven while a second instance joined"
    ));
    let violations = case.check_commits().await?;
    case.finish(None, violations, String::new(), false).await
}

/// The case's oracle with the `big` records (re-driven) applied after
/// every other: each entity's re-driven events come after its others, in
/// their order, as the redrive re-publishes them.
fn redriven_last(case: &mut Case, big: &[bool]) {
    let n = case.records.len();
    let order: Vec<usize> = (0..n)
        .filter(|i| !big[*i])
        .chain((0..n).filter(|i| big[*i]))
        .collect();
    let reordered: Vec<SampleRecord> = order.iter().map(|i| case.records[*i].clone()).collect();
    let applies = harness::oracle_applies(&reordered);
    let mut applied = vec![false; n];
    for (k, i) in order.iter().enumerate() {
        applied[*i] = applies[k];
    }
    case.model = harness::oracle(&reordered);
    case.applied = applied;
}

/// `idem topics apply` grows the topic from 2 to 5 partitions while it
/// takes traffic, under `state.order = "per_field"`: entities' later
/// events land on other partitions than their earlier ones, and the state
/// must still equal its events applied in seq order. The consumer learns of
/// the new partitions at librdkafka's metadata refresh (set to 1 s here; 5
/// minutes by default: docs/operations.md). Compared: state and tombstone
/// of every entity; applied counts and I4 depend on arrival order in this
/// mode (a late event is `partial`), so they are not.
pub(super) async fn topics_apply_adds_partitions(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let mut case = Case::new(&spec, "tools-topics-apply-adds-partitions", seed, 6_000, 2).await?;
    let topic = case.topic.clone();
    let dir = case.env.work_dir.join(&topic);
    let declared = dir.join("topics");
    std::fs::create_dir_all(&declared)?;
    let config = dir.join("per-field.toml");
    std::fs::write(
        &config,
        "[state]\norder = \"per_field\"\n\n[kafka.librdkafka]\n\"topic.metadata.refresh.interval.ms\" = \"1000\"\n",
    )?;
    std::fs::write(
        declared.join("topic.toml"),
        format!("[[topic]]\nname = \"{topic}\"\npartitions = 5\nreplication_factor = 1\ndead_letter = \"{topic}.dlq\"\n"),
    )?;
    let config = config.to_string_lossy().into_owned();
    let p = case.spawn(&[("IDEM_CONFIG", config.as_str())])?;
    let n = case.records.len();
    case.produce(0, n / 2).await?;
    wait_processing(&p, (n / 4) as u64, RECOVERY_BOUND).await?;
    let declared = declared.to_string_lossy().into_owned();
    let (code, out) = tool(&case, &topic, "topics", &["apply", "--dir", &declared]).await?;
    anyhow::ensure!(code == 0, "idem topics apply failed ({code}): {out}");
    case.partitions = 5;
    case.produce(n / 2, n).await?;
    case.catch_up().await?;
    p.terminate().await;
    // Per-field order makes the state equal each entity's events applied in
    // seq order, whatever their arrival (docs/effects.md).
    let mut in_seq_order = case.records.clone();
    in_seq_order.sort_by_cached_key(|r| {
        idem::event::decode(Some(&r.value), &Default::default(), 1 << 20).map_or(0, |e| e.seq)
    });
    let want = harness::oracle(&in_seq_order);
    let views = harness::read_views(&case.redis, &topic, want.entities.keys()).await?;
    let wrong: Vec<&String> = want
        .entities
        .iter()
        .filter(|(name, want)| {
            let got = &views[*name];
            got.state != want.state || got.deleted != want.deleted
        })
        .map(|(name, _)| name)
        .collect();
    case.faults
        .push("topics apply: 2 -> 5 partitions mid-stream (per-field order)".into());
    let notes = format!(
        "{} entities off the in-seq-order state{}",
        wrong.len(),
        wrong
            .first()
            .map_or(String::new(), |w| format!(", e.g. {w}"))
    );
    let lost = wrong.len() as u64;
    let (mut r, k) = case.finish(None, 0, notes.clone(), false).await?;
    // Only state and tombstone are compared (see above).
    r.lost = lost;
    r.doubled = 0;
    r.notes = notes;
    r.verdict = if lost == 0 { "pass" } else { "fail" }.into();
    Ok((r, k))
}
