//! Scenarios where Redis stalls, dies, fails scripts, fills up or fails over.

use super::*;

pub(super) async fn redis_stalled(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

pub(super) async fn redis_killed(
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
    // With everysec the restart may bring back an older state and idem
    // rewinds: seqs and commits then go back by design, so only the end
    // state and the commits are judged.
    let sampler = (fsync == "always").then(|| case.sampler());
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
        "durability = ack with appendfsync everysec: what Redis loses is noticed and re-applied from the log".into()
    };
    case.finish(sampler, violations, notes, false).await
}

pub(super) async fn lua_error(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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

/// Redis reaches maxmemory (noeviction) mid-stream: scripts fail with OOM
/// and are retried; once memory is freed, idem catches up.
pub(super) async fn redis_oom(
    spec: ConformanceSpec,
    seed: u64,
) -> anyhow::Result<(ScenarioResult, u32)> {
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
pub(super) async fn eviction_refused(
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

/// A Redis Cluster master dies mid-stream (durability replicas:1): its
/// replica takes over, idem retries and goes on once the old master rejoins
/// as a replica.
pub(super) async fn cluster_failover(
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

/// Redis loses its state mid-stream (durability ack, no persistence):
/// restarted empty, or restored from a snapshot taken earlier in the
/// stream. idem must notice before its next write and re-apply from the
/// log what Redis lost. No sampler: the fault itself moves seqs back, and
/// the rewind moves the commit back, both by design.
pub(super) async fn redis_state_lost(
    spec: ConformanceSpec,
    seed: u64,
    restore: bool,
) -> anyhow::Result<(ScenarioResult, u32)> {
    let name = if restore {
        "redis-snapshot-restored"
    } else {
        "redis-restarted-empty"
    };
    let mut case = Case::new(&spec, name, seed, 12_000, 4).await?;
    let mut redis = case.use_private_redis("none").await?;
    let n = case.records.len();
    case.produce(0, n).await?;
    let p = case.spawn(&[("IDEM__REDIS__DURABILITY", "ack")])?;
    wait_processing(&p, (n / 4) as u64, RECOVERY_BOUND).await?;
    let rdb = redis.dir().join("dump.rdb");
    let saved = redis.dir().join("snapshot.rdb");
    if restore {
        let mut conn = redis::Client::open(redis.url())?
            .get_multiplexed_async_connection()
            .await?;
        let _: () = redis::cmd("SAVE").query_async(&mut conn).await?;
        std::fs::copy(&rdb, &saved)?;
        wait_processing(&p, (n / 2) as u64, RECOVERY_BOUND).await?;
    }
    redis.kill();
    if restore {
        std::fs::copy(&saved, &rdb)?;
    } else {
        let _ = std::fs::remove_file(&rdb);
    }
    redis.restart().await?;
    case.catch_up().await?;
    p.terminate().await;
    let violations = case.check_commits().await?;
    case.faults.push(if restore {
        "Redis (no persistence, durability ack) restored mid-stream from a snapshot taken a quarter of the way in".into()
    } else {
        "Redis (no persistence, durability ack) SIGKILLed mid-stream and restarted empty".into()
    });
    case.finish(None, violations, String::new(), false).await
}
