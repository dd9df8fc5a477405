//! When Redis loses or rolls back its state while idem runs: idem notices
//! before it writes again, resumes every partition from what Redis's own
//! progress records say it holds, and ends equal to the oracle. Each test
//! has a redis-server of its own (it kills it), without AOF, as an `ack`
//! deployment without persistence would run.

mod common;

use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::tools::sample::{generate, SampleRecord, SampleSpec};
use idem_testbench::conformance::harness::{PrivateCluster, PrivateRedis};
use rdkafka::{Offset, TopicPartitionList};

const CATCH_UP: Duration = Duration::from_secs(120);

fn stream(prefix: &str, events: usize, seed: u64) -> Vec<SampleRecord> {
    generate(&SampleSpec {
        events,
        entities: 40,
        duplicate_ratio: 0.1,
        out_of_order_ratio: 0.1,
        delete_ratio: 0.1,
        data_bytes: 8,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    })
}

/// A redis-server without persistence: a kill loses everything not saved
/// by an explicit SAVE.
async fn volatile_redis() -> PrivateRedis {
    PrivateRedis::start_with(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
        "none",
        None,
    )
    .await
    .expect("private redis-server (install redis-server, or run `make services`)")
}

async fn redis_cmd(url: &str, args: &[&str]) -> redis::Value {
    let mut conn = redis_conn(url).await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.expect("redis command")
}

/// A snapshot by SAVE: synchronous, so done when it answers, and an error
/// if it failed. (BGSAVE waited on LASTSAVE, whose seconds could not tell a
/// save in the second the server started from none, and never ended.)
async fn snapshot(url: &str) {
    let reply = redis_cmd(url, &["SAVE"]).await;
    assert_eq!(reply, redis::Value::Okay, "SAVE answered {reply:?}");
}

/// The case found from outside: Redis restarts empty mid-stream,
/// then redeliveries and late older updates arrive (tombstones and
/// remembered ids are gone). Every entity still ends equal to the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_restart_mid_stream_rewinds_to_what_redis_holds() {
    let (idem, _redis) = empty_restart_mid_stream(&[]).await;
    idem.terminate().await;
}

/// The same under Kafka 4's consumer protocol with static membership: the
/// in-process restart makes a new consumer with the same group.instance.id
/// while the old one leaves; it joins and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_restart_under_a_static_member_of_the_consumer_protocol_serves_again() {
    let (idem, _redis) = empty_restart_mid_stream(&[
        ("IDEM__KAFKA__GROUP_PROTOCOL", "consumer"),
        ("IDEM__KAFKA__GROUP_INSTANCE_ID", "pod-0"),
    ])
    .await;
    let restarts = idem
        .counter("idem_redis_state_changes_total", &[("cause", "epoch")])
        .await
        .unwrap();
    assert!(
        restarts >= 1,
        "consumption restarted in process: {restarts}"
    );
    wait_until("idem is ready again", CATCH_UP, || async {
        http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    idem.terminate().await;
}

/// Redis restarts empty under a running idem (with `env` set); returns the
/// idem and its Redis once every entity matched the oracle, for more checks.
async fn empty_restart_mid_stream(env: &[(&str, &str)]) -> (Idem, PrivateRedis) {
    let topic = unique("loss-empty");
    create_topic(&topic, 2).await;
    let mut redis = volatile_redis().await;
    let all = stream(&topic, 1_200, 61);
    let (first, second) = all.split_at(600);
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    for (k, v) in env {
        opts = opts.with(k, v);
    }
    opts.redis_url = redis.url();
    produce(&topic, first).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    redis.kill();
    redis.restart().await.unwrap();
    // The rest, then redeliveries of the first 300 records.
    let mut produced: Vec<SampleRecord> = first.to_vec();
    produced.extend_from_slice(second);
    produced.extend_from_slice(&first[..300]);
    produce(&topic, second).await;
    produce(&topic, &first[..300]).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    let (model, _) = oracle(&produced);
    assert_matches_oracle(&redis.url(), &topic, &model).await;
    let rewinds = idem
        .counter("idem_redis_rewinds_total", &[("cause", "lost")])
        .await
        .unwrap();
    assert!(rewinds >= 1, "the metric names the rewind: {rewinds}");
    let log = std::fs::read_to_string(&idem.log).unwrap();
    assert!(
        log.contains("Redis's state stops before the committed offset"),
        "the log names the rewind"
    );
    (idem, redis)
}

/// An operator restores an older snapshot: the events between the snapshot
/// and the commit are applied again, in order, before anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restore_mid_stream_reapplies_what_the_snapshot_missed() {
    let topic = unique("loss-restore");
    create_topic(&topic, 2).await;
    let mut redis = volatile_redis().await;
    let all = stream(&topic, 1_500, 62);
    let (a, rest) = all.split_at(500);
    let (b, c) = rest.split_at(500);
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = redis.url();
    produce(&topic, a).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    snapshot(&redis.url()).await;
    let rdb = redis.dir().join("dump.rdb");
    let saved = redis.dir().join("snapshot-after-a.rdb");
    std::fs::copy(&rdb, &saved).unwrap();

    produce(&topic, b).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    redis.kill();
    std::fs::copy(&saved, &rdb).unwrap();
    redis.restart().await.unwrap();
    produce(&topic, c).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    let (model, _) = oracle(&all);
    assert_matches_oracle(&redis.url(), &topic, &model).await;
    let rewinds = idem
        .counter("idem_redis_rewinds_total", &[("cause", "rolled_back")])
        .await
        .unwrap();
    assert!(rewinds >= 1, "the metric names the rewind: {rewinds}");
    idem.terminate().await;
}

/// A one-partition topic of 400 events applied by an idem on a private
/// Redis that checks its progress every second, with a snapshot of that
/// Redis taken after the first 200.
struct AppliedWithSnapshot {
    topic: String,
    redis: PrivateRedis,
    all: Vec<SampleRecord>,
    opts: IdemOpts,
    idem: Idem,
    halfway: std::path::PathBuf,
}

async fn applied_with_a_snapshot_halfway(name: &str, seed: u64) -> AppliedWithSnapshot {
    let topic = unique(name);
    create_topic(&topic, 1).await;
    let mut redis = volatile_redis().await;
    let all = stream(&topic, 400, seed);
    let (first, second) = all.split_at(200);
    let opts = IdemOpts {
        redis_url: redis.url(),
        ..IdemOpts::new(&topic, &topic, &topic)
    }
    .with("IDEM__REDIS__PROGRESS_CHECK_INTERVAL", "1s");
    produce(&topic, first).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    let halfway = save_snapshot(&mut redis, "halfway").await;
    produce(&topic, second).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    AppliedWithSnapshot {
        topic,
        redis,
        all,
        opts,
        idem,
        halfway,
    }
}

/// Redis rolled back under an idle idem (found from outside): a snapshot
/// taken halfway is restored and no record arrives after it. idem notices
/// on its own progress check, re-reads the lost half, and every entity
/// rolls forward to the oracle without a single new record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restored_under_an_idle_partition_is_noticed_without_new_records() {
    let mut run = applied_with_a_snapshot_halfway("loss-idle", 63).await;
    restore_snapshot(&mut run.redis, &run.halfway).await;
    let (model, _) = oracle(&run.all);
    wait_matches_oracle(&run.redis.url(), &run.topic, &model, CATCH_UP).await;
    assert_stage_counted_a_rollback(&run.idem).await;
    run.idem.terminate().await;
}

/// The same after a restart: the new process has written nothing but the
/// records of its assignment, stays idle, and still notices the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_idle_idem_notices_a_snapshot_restore() {
    let mut run = applied_with_a_snapshot_halfway("loss-idle-restart", 64).await;
    run.idem.terminate().await;
    let idem = Idem::spawn(&run.opts);
    // Owns the partition and is ready: its assignment was decided and its
    // records written, so the restore below comes after them.
    wait_until(
        "the new process owns the partition, ready",
        CATCH_UP,
        || async {
            let owns = idem
                .metrics()
                .await
                .is_some_and(|m| sum_metric(&m, "idem_assigned_partitions", &[]) == 1);
            owns && http_get(idem.metrics_port, "/readyz")
                .await
                .is_some_and(|body| body.trim() == "ready")
        },
    )
    .await;
    restore_snapshot(&mut run.redis, &run.halfway).await;
    let (model, _) = oracle(&run.all);
    wait_matches_oracle(&run.redis.url(), &run.topic, &model, CATCH_UP).await;
    assert_stage_counted_a_rollback(&idem).await;
    idem.terminate().await;
}

/// A topic deleted and created again starts its offsets at 0, below the
/// old incarnation's progress records: idem keeps a record per
/// incarnation, so a snapshot restore on the new topic is still noticed
/// (before, the old record stayed above every new offset and hid it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_on_a_topic_created_again_is_noticed() {
    let topic = unique("loss-recreated");
    create_topic(&topic, 1).await;
    let mut redis = volatile_redis().await;
    let old = stream(&topic, 300, 71);
    produce(&topic, &old).await;
    let first = IdemOpts {
        redis_url: redis.url(),
        ..IdemOpts::new(&topic, &topic, &topic)
    };
    let idem = Idem::spawn(&first);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;

    recreate_topic(&topic).await;
    // The new incarnation's own entities, under a group of its own (the
    // old group's commits belong to the deleted topic).
    let new = stream(&format!("{topic}-new"), 200, 72);
    let (half, rest) = new.split_at(100);
    let group = format!("{topic}-new");
    let opts = IdemOpts {
        redis_url: redis.url(),
        ..IdemOpts::new(&topic, &group, &topic)
    }
    .with("IDEM__REDIS__PROGRESS_CHECK_INTERVAL", "1s");
    produce(&topic, half).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&group, &topic, 1, CATCH_UP).await;
    let halfway = save_snapshot(&mut redis, "recreated-halfway").await;
    produce(&topic, rest).await;
    wait_caught_up(&group, &topic, 1, CATCH_UP).await;

    restore_snapshot(&mut redis, &halfway).await;
    let (model, _) = oracle(&new);
    wait_matches_oracle(&redis.url(), &topic, &model, CATCH_UP).await;
    assert_stage_counted_a_rollback(&idem).await;
    idem.terminate().await;
}

/// The guard stage's check found the rollback (an assignment's rewind
/// counts no state change, so this tells the two apart).
async fn assert_stage_counted_a_rollback(idem: &Idem) {
    let changes = idem
        .counter(
            "idem_redis_state_changes_total",
            &[("cause", "rolled_back")],
        )
        .await
        .unwrap();
    assert!(
        changes >= 1,
        "the idle check counted the rollback: {changes}"
    );
}

/// SAVE, and a copy of the dump named `name` to restore later.
async fn save_snapshot(redis: &mut PrivateRedis, name: &str) -> std::path::PathBuf {
    snapshot(&redis.url()).await;
    let saved = redis.dir().join(format!("snapshot-{name}.rdb"));
    std::fs::copy(redis.dir().join("dump.rdb"), &saved).unwrap();
    saved
}

/// The operator's "restore from backup": stop the server, put the dump
/// back, start it again.
async fn restore_snapshot(redis: &mut PrivateRedis, saved: &std::path::Path) {
    redis.kill();
    std::fs::copy(saved, redis.dir().join("dump.rdb")).unwrap();
    redis.restart().await.unwrap();
}

/// A deployment upgraded from the version without progress records: Redis
/// holds state but no epoch marker and no records, Kafka holds commits
/// without idem's metadata. The new version starts without refusing and
/// without rewinding, and then writes its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_bootstraps_progress_records_without_a_rewind() {
    let topic = unique("loss-upgrade");
    create_topic(&topic, 2).await;
    let mut spec = SampleSpec {
        events: 400,
        entities: 40,
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.0,
        delete_ratio: 0.0,
        data_bytes: 8,
        seed: 63,
        prefix: topic.clone(),
        zipf: None,
    };
    let before = generate(&spec);
    produce(&topic, &before).await;
    let opts = IdemOpts::new(&topic, &topic, &topic);
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    idem.terminate().await;
    // What the previous version leaves behind.
    let url = redis_url();
    let mut conn = redis_conn(&url).await;
    for key in conn.scan_keys(&format!("{topic}:epoch*")).await.unwrap() {
        redis_cmd(&url, &["DEL", &key]).await;
    }
    for key in conn.scan_keys(&format!("{topic}:progress*")).await.unwrap() {
        redis_cmd(&url, &["DEL", &key]).await;
    }
    let ends = end_offsets(&topic, 2).await;
    commit_as_a_plain_client(&topic, &topic, &ends);

    spec.seed = 64;
    spec.prefix = format!("{topic}-after");
    let after = generate(&spec);
    produce(&topic, &after).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    assert_eq!(
        idem.counter("idem_rewound_records_total", &[]).await,
        Some(0)
    );
    assert_eq!(
        idem.outcome(&topic, Outcome::Duplicate).await,
        0,
        "nothing re-read"
    );
    let all: Vec<SampleRecord> = before.iter().chain(&after).cloned().collect();
    assert_matches_oracle(&url, &topic, &oracle(&all).0).await;
    assert!(
        !conn
            .scan_keys(&format!("{topic}:progress*"))
            .await
            .unwrap()
            .is_empty(),
        "the new version writes its progress records"
    );
    idem.terminate().await;
}

/// Redis Cluster, durability `ack`: a master's replica falls behind (paused),
/// the master dies and the replica takes over without the last writes. The
/// partitions whose effects the promoted replica lacks are rewound, not
/// halted, and every entity ends equal to the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_ack_rewinds_what_the_replica_missed() {
    let work_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut cluster = PrivateCluster::start(work_dir).expect("private cluster");
    cluster
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("cluster healthy");
    let topic = unique("loss-failover");
    create_topic(&topic, 2).await;
    let a = stream(&topic, 500, 65);
    // Large enough (~12 MB of effects) that most of it is still in the
    // master's output buffer, not in the paused replica's socket, when the
    // master dies: the promoted replica lacks it.
    let b = generate(&SampleSpec {
        events: 3_000,
        entities: 200,
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.1,
        delete_ratio: 0.05,
        data_bytes: 4_000,
        seed: 66,
        prefix: format!("{topic}-b"),
        zipf: None,
    });
    let c = stream(&topic, 500, 67);
    let all: Vec<SampleRecord> = a.iter().chain(&b).chain(&c).cloned().collect();
    let (a, b, c) = (&a[..], &b[..], &c[..]);
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = cluster.url();
    produce(&topic, a).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    let (master, replica) = cluster
        .master_and_replica()
        .expect("a master with a replica");
    cluster.signal(replica, "-STOP");
    produce(&topic, b).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    let written = repl_offset(master);
    cluster.kill(master);
    cluster.signal(replica, "-CONT");
    let takeover = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &replica.to_string(),
            "CLUSTER",
            "FAILOVER",
            "TAKEOVER",
        ])
        .output()
        .expect("redis-cli");
    assert!(takeover.status.success(), "{takeover:?}");
    wait_until("the replica took over", CATCH_UP, || async {
        PrivateCluster::role(replica).0 == "master"
    })
    .await;
    // What the promoted replica holds of the old master's stream.
    let received = repl_offset(replica);
    cluster.restart(master).expect("old master rejoins");
    produce(&topic, c).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    assert_matches_oracle(&cluster.url(), &topic, &oracle(&all).0).await;
    let rewinds = idem
        .counter("idem_redis_rewinds_total", &[("cause", "rolled_back")])
        .await
        .unwrap();
    // The kernel's socket buffers sometimes carry every write to the
    // paused replica: then nothing was lost, and nothing is rewound.
    if received < written {
        assert!(
            rewinds >= 1,
            "the promoted replica lacked {} bytes of writes: the affected partitions were rewound: {rewinds}",
            written - received
        );
    } else {
        eprintln!("the replica received every write before the master died: no loss to rewind");
    }
    idem.terminate().await;
}

/// A server's replication offset (`INFO replication`, `master_repl_offset`).
fn repl_offset(port: u16) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "replication"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("master_repl_offset")
}

/// Redis lost its state and retention already deleted records whose effects
/// it held: idem refuses to run (exit 2), naming the partition, the offsets
/// gone from both, and what to do, instead of going on without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_past_the_log_start_is_refused_with_what_to_do() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let topic = unique("loss-refused");
    create_topic(&topic, 1).await;
    let mut redis = volatile_redis().await;
    let records = stream(&topic, 300, 68);
    produce(&topic, &records).await;
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = redis.url();
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;

    redis.kill();
    redis.restart().await.unwrap();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(100))
        .unwrap();
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("records deleted");

    let idem = Idem::spawn(&opts);
    let log_path = idem.log.clone();
    let status = idem.wait_exit(CATCH_UP).await;
    assert_eq!(status.code(), Some(2), "refused, exit 2");
    let log = std::fs::read_to_string(&log_path).unwrap();
    for wanted in [
        "needs the records from offset 0",
        "the log now starts at 100",
        "idem replay",
    ] {
        assert!(log.contains(wanted), "the refusal says {wanted:?}");
    }
    let entities: Vec<String> = oracle(&records).0.entities.keys().cloned().collect();
    for (name, view) in read_entities(&redis.url(), &topic, entities.iter()).await {
        assert!(
            !view.exists,
            "{name}: nothing is applied before the refusal"
        );
    }

    // The refusal's advice, followed: the loss accepted, the rest re-applied.
    let url = redis.url();
    let replay = idem_tool(
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &topic,
            "--to-earliest",
            "--execute",
        ],
        &topic,
        &[
            ("IDEM__REDIS__URL", url.as_str()),
            ("IDEM__REDIS__MODE", "standalone"),
        ],
    );
    let err = String::from_utf8_lossy(&replay.stderr);
    assert!(replay.status.success(), "{err}");
    assert!(
        err.contains("accepts that"),
        "the replay says it accepts the loss: {err}"
    );
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    let (kept, _) = oracle(&records[100..]);
    wait_matches_oracle(&url, &topic, &kept, CATCH_UP).await;
    idem.terminate().await;
}

/// A rollback that no failed call revealed (a silent reconnect) is not
/// hidden by the next record: the record write refuses, writing nothing,
/// where a record is below what this instance wrote; and a renewed epoch
/// refuses every writer that still knows the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_below_what_was_written_is_refused_and_renewal_refuses_old_writers() {
    use idem::offsets::TopicPartition;
    use idem::store::progress::ProgressStore;
    use idem::store::{KeyLayout, StoreError};
    let prefix = unique("loss-record");
    let url = redis_url();
    let mut conn = redis_conn(&url).await;
    let mut store = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix));
    let epoch = store.establish_epoch().await.unwrap();
    let tp = TopicPartition::new("t", 0);
    store
        .record(&epoch, &[(tp.clone(), 100, None)], &[])
        .await
        .unwrap();
    // Redis goes back: every server's record of t/0 drops to 50.
    for key in conn
        .scan_keys(&format!("{prefix}:progress*"))
        .await
        .unwrap()
    {
        redis_cmd(&url, &["HSET", &key, "t:0", "50"]).await;
    }
    let refused = store
        .record(&epoch, &[(tp.clone(), 150, Some(100))], &[])
        .await;
    assert!(
        matches!(refused, Err(StoreError::RolledBack(_))),
        "{refused:?}"
    );
    for server in &store.read(std::slice::from_ref(&tp)).await.unwrap()[0] {
        assert_eq!(server.next, Some(50), "the refused write wrote nothing");
    }
    let renewed = store.renew_epoch(&epoch).await.unwrap();
    assert_ne!(renewed, epoch);
    let refused = store.record(&epoch, &[(tp.clone(), 150, None)], &[]).await;
    assert!(
        matches!(refused, Err(StoreError::EpochChanged { .. })),
        "{refused:?}"
    );
    assert_eq!(store.establish_epoch().await.unwrap(), renewed, "settled");

    // With the topic's incarnation known, its own record is the one that
    // counts: the plain one dropping is no rollback, its own is.
    let id = idem::consumed::TopicId::from_bits(7, 9).unwrap();
    store.learn_incarnations(&[("u".to_string(), id.clone())].into_iter().collect());
    let tp = TopicPartition::new("u", 0);
    store
        .record(&renewed, &[(tp.clone(), 100, None)], &[])
        .await
        .unwrap();
    let own = idem::store::progress_incarnation_field(&tp, &id);
    for key in conn
        .scan_keys(&format!("{prefix}:progress*"))
        .await
        .unwrap()
    {
        redis_cmd(&url, &["HSET", &key, "u:0", "50"]).await;
    }
    store
        .record(&renewed, &[(tp.clone(), 120, Some(100))], &[])
        .await
        .expect("the plain record is not the incarnation's");
    for key in conn
        .scan_keys(&format!("{prefix}:progress*"))
        .await
        .unwrap()
    {
        redis_cmd(&url, &["HSET", &key, &own, "50"]).await;
    }
    let refused = store
        .record(&renewed, &[(tp.clone(), 150, Some(120))], &[])
        .await;
    assert!(
        matches!(refused, Err(StoreError::RolledBack(_))),
        "{refused:?}"
    );
    for server in &store.read(std::slice::from_ref(&tp)).await.unwrap()[0] {
        assert_eq!((server.next, server.of_incarnation), (Some(50), true));
    }
}

/// The decided ranges merge in Redis (the record script's Lua) exactly as
/// `DecidedRanges::claim` merges them, the cap included, claim after claim;
/// a claim is refused with the record where the epoch changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decided_ranges_merge_in_redis_as_in_the_model() {
    use idem::consumed::{DecidedRanges, TopicId, MAX_RANGES};
    use idem::offsets::TopicPartition;
    use idem::store::progress::{Claim, ProgressStore};
    use idem::store::KeyLayout;
    use rand::{Rng, SeedableRng};
    let prefix = unique("loss-ranges");
    let conn = redis_conn(&redis_url()).await;
    let mut store = ProgressStore::new(conn, KeyLayout::new(&prefix));
    let epoch = store.establish_epoch().await.unwrap();
    let tp = TopicPartition::new("t", 3);
    let id = TopicId::from_bits(0x1111_2222_3333_4444, 9).unwrap();
    let mut model = DecidedRanges::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(48);
    let mut most = 0;
    for _ in 0..400 {
        let start = rng.random_range(0..5_000);
        let end = start + rng.random_range(1..60);
        let claim = Claim {
            tp: tp.clone(),
            topic_id: id.clone(),
            start,
            end,
        };
        store.record(&epoch, &[], &[claim]).await.unwrap();
        model.claim(start, end);
        let stored = store
            .read_decided(&[(tp.clone(), id.clone())])
            .await
            .unwrap();
        assert_eq!(stored[0], model, "after claiming {start}-{end}");
        most = most.max(model.ranges().len());
    }
    assert_eq!(most, MAX_RANGES, "the cap was reached");
    // Another incarnation of the topic has no ranges.
    let other = TopicId::from_bits(0x5555_6666_7777_8888, 9).unwrap();
    let stored = store.read_decided(&[(tp.clone(), other)]).await.unwrap();
    assert_eq!(stored[0], DecidedRanges::default());
    let renewed = store.renew_epoch(&epoch).await.unwrap();
    let refused = store
        .record(
            &epoch,
            &[],
            &[Claim {
                tp: tp.clone(),
                topic_id: id.clone(),
                start: 90_000,
                end: 90_001,
            }],
        )
        .await;
    assert!(refused.is_err(), "a claim under an old epoch is refused");
    let stored = store.read_decided(&[(tp, id)]).await.unwrap();
    assert!(!stored[0].contains(90_000));
    assert_ne!(renewed, epoch);
}

/// Instances starting together on a new prefix settle on one epoch: the
/// one that sets the marker first wins and the other adopts it, so neither
/// later takes the other's epoch for a loss of Redis ("epoch marker is X
/// where idem expected Y", a false alarm). Each trial starts the second a
/// few scheduler turns later, to cross its read of the markers with the
/// first one's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_on_a_new_prefix_agree_on_the_epoch() {
    use idem::store::{progress::ProgressStore, KeyLayout};
    let url = redis_url();
    let mut disagreed = Vec::new();
    for trial in 0..30 {
        let layout = KeyLayout::new(unique("epoch-race"));
        let mut first = ProgressStore::new(redis_conn(&url).await, layout.clone());
        let mut second = ProgressStore::new(redis_conn(&url).await, layout);
        let a = tokio::spawn(async move { first.establish_epoch().await.unwrap() });
        let b = tokio::spawn(async move {
            for _ in 0..trial % 12 {
                tokio::task::yield_now().await;
            }
            second.establish_epoch().await.unwrap()
        });
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        if a != b {
            disagreed.push((trial, a, b));
        }
    }
    assert!(disagreed.is_empty(), "epochs differ: {disagreed:?}");
}
