//! The same promises on a three-master Redis Cluster (`make services` starts
//! it on 127.0.0.1:7000-7002): once per intent, crash safety, and a slot
//! migration while idem consumes (on a private cluster: moving slots of
//! the shared one would disturb the cluster pass running beside it).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::tools::sample::{generate, Rng, SampleSpec};
use idem_testbench::conformance::harness::PrivateCluster;

const CATCH_UP: Duration = Duration::from_secs(120);

fn stream(prefix: &str, events: usize, seed: u64) -> Vec<idem::tools::sample::SampleRecord> {
    generate(&SampleSpec {
        events,
        entities: 300,
        duplicate_ratio: 0.3,
        out_of_order_ratio: 0.1,
        delete_ratio: 0.02,
        data_bytes: 16,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    })
}

fn cluster_opts(topic: &str) -> IdemOpts {
    let mut opts = IdemOpts::new(topic, topic, topic);
    opts.redis_url = redis_cluster_url();
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_applies_redelivered_and_reordered_events_once() {
    let topic = unique("cluster-once");
    create_topic(&topic, 4).await;
    let records = stream(&topic, 5_000, 1);
    let (model, counts) = oracle(&records);
    produce(&topic, &records).await;
    let idem = Idem::spawn(&cluster_opts(&topic));
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_matches_oracle(&redis_cluster_url(), &topic, &model).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        counts[&Outcome::Applied]
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_sigkills() {
    let topic = unique("cluster-crash");
    create_topic(&topic, 4).await;
    let records = stream(&topic, 12_000, 2);
    let (model, _) = oracle(&records);
    let opts = cluster_opts(&topic).with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "300");
    let mut rng = Rng::new(7);
    for slice in records.chunks(records.len() / 4 + 1) {
        produce(&topic, slice).await;
        let idem = Idem::spawn(&opts);
        wait_until("idem handles events", CATCH_UP, || async {
            idem.counter("idem_events_total", &[]).await.unwrap_or(0) > 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
        idem.kill();
    }
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_matches_oracle(&redis_cluster_url(), &topic, &model).await;
    idem.terminate().await;
}

fn node_id(port: u16) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "myid"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until every node of the cluster at `port` agrees on the slots
/// (a reshard refuses to start before: a move just done propagates by
/// gossip, whose rate is the cluster's node timeout).
fn wait_agreed(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("redis-cli")
            .args(["--cluster", "check", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout)
            .contains("All nodes agree about slots configuration")
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster's nodes did not agree on the slots within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reshard(from: u16, to: u16, slots: u32) {
    wait_agreed(from);
    let status = Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
        .args([
            "--cluster-from",
            &node_id(from),
            "--cluster-to",
            &node_id(to),
        ])
        .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "redis-cli --cluster reshard failed: {}",
        String::from_utf8_lossy(&status.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_while_consuming_keeps_the_invariants() {
    // A cluster of its own: moving slots on the shared one would answer
    // MOVED to the tests of the cluster pass running beside this one.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cluster = PrivateCluster::start(&dir).expect("a private cluster");
    cluster
        .wait_healthy(Duration::from_secs(30))
        .await
        .expect("healthy");
    let masters: Vec<u16> = cluster
        .nodes
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| PrivateCluster::role(*p).0 == "master")
        .collect();
    let (first, second) = (masters[0], masters[1]);
    let topic = unique("cluster-reshard");
    create_topic(&topic, 4).await;
    let records = stream(&topic, 20_000, 3);
    let (model, _) = oracle(&records);
    let producing = {
        let (topic, records) = (topic.clone(), records.clone());
        tokio::spawn(async move {
            for slice in records.chunks(records.len() / 10 + 1) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut opts = cluster_opts(&topic);
    opts.redis_url = cluster.url();
    let idem = Idem::spawn(&opts);
    wait_until("idem handles events", CATCH_UP, || async {
        idem.outcome(&topic, Outcome::Applied).await > 0
    })
    .await;
    // Move 1,000 slots from the first master to the second while events
    // flow, then back.
    let moving = tokio::task::spawn_blocking(move || {
        reshard(first, second, 1000);
        reshard(second, first, 1000);
    });
    producing.await.unwrap();
    moving.await.unwrap();
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_matches_oracle(&cluster.url(), &topic, &model).await;
    idem.terminate().await;
}

/// With `durability = replicas:1`: stopped replicas stall the commits;
/// then a master dies while idem consumes: its replica takes over, idem retries (committing nothing that is not on a
/// replica) and goes on once the old master rejoins as a replica; every
/// effect is then in Redis exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_with_replica_durability_loses_nothing() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let mut cluster = PrivateCluster::start(&dir).expect("a private cluster");
    cluster
        .wait_healthy(Duration::from_secs(30))
        .await
        .expect("healthy");
    let topic = unique("cluster-failover");
    create_topic(&topic, 4).await;
    let records = stream(&topic, 12_000, 4);
    let (model, _) = oracle(&records);
    // 60% paced over ~5 s (work arrives while the replicas are stopped);
    // the rest once the master is dead.
    let (early, late) = records.split_at(records.len() * 6 / 10);
    let producing = {
        let (topic, early) = (topic.clone(), early.to_vec());
        tokio::spawn(async move {
            for slice in early.chunks(early.len() / 15 + 1) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__REDIS__DURABILITY", "replicas:1")
        .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "300");
    opts.redis_url = cluster.url();
    let idem = Idem::spawn(&opts);
    wait_until("idem applies events", CATCH_UP, || async {
        idem.outcome(&topic, Outcome::Applied).await > 0
    })
    .await;

    let ports: Vec<u16> = cluster.nodes.iter().map(|(p, _)| *p).collect();

    // First, deterministically: with every replica stopped no WAIT can be
    // met, so idem retries its batch and the committed offsets stand still.
    let replicas: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| PrivateCluster::role(*p).0 == "slave")
        .collect();
    for r in &replicas {
        cluster.signal(*r, "-STOP");
    }
    let not_durable = || async {
        idem.counter("idem_retries_total", &[("cause", "not_durable")])
            .await
            .unwrap_or(0)
    };
    let baseline = not_durable().await;
    // Two failed waits (over a second) after the last durable batch: its
    // offsets, stored before, are committed by now (commit interval 200 ms).
    wait_until(
        "batches wait for the stopped replicas",
        CATCH_UP,
        || async { not_durable().await >= baseline + 2 },
    )
    .await;
    let before = committed(&topic, &topic, 4).await;
    wait_until("more failed waits", CATCH_UP, || async {
        not_durable().await >= baseline + 5
    })
    .await;
    assert_eq!(
        committed(&topic, &topic, 4).await,
        before,
        "nothing is committed while no replica acknowledges"
    );
    for r in &replicas {
        cluster.signal(*r, "-CONT");
    }
    let deadline = std::time::Instant::now() + CATCH_UP;
    while !cluster.healthy() {
        assert!(
            std::time::Instant::now() < deadline,
            "replicas did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Then a real failover.
    let master = *ports
        .iter()
        .find(|p| PrivateCluster::role(**p).0 == "master")
        .unwrap();
    let replica = *ports
        .iter()
        .find(|p| PrivateCluster::role(**p) == ("slave".to_string(), Some(master)))
        .expect("the master's replica");
    producing.await.unwrap();
    let retries = || async { idem.counter("idem_retries_total", &[]).await.unwrap_or(0) };
    let retries_before_kill = retries().await;
    cluster.kill(master);
    // Work for every master, the dead one too.
    produce(&topic, late).await;
    // The replica is promoted after the node timeout; only then does the old
    // master come back (empty, as a replica of it), so replicas:1 can be met again.
    wait_until("the replica took over", CATCH_UP, || async move {
        PrivateCluster::role(replica).0 == "master"
    })
    .await;
    cluster.restart(master).expect("restart the old master");
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_eq!(
        PrivateCluster::role(master),
        ("slave".to_string(), Some(replica)),
        "the old master rejoined as a replica"
    );
    assert_matches_oracle(&cluster.url(), &topic, &model).await;
    assert!(
        retries().await > retries_before_kill,
        "the failover was seen and retried"
    );
    let waits: u64 = ports
        .iter()
        .map(|p| {
            let stats = Command::new("redis-cli")
                .args(["-p", &p.to_string(), "info", "commandstats"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
                .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(waits > 0, "the masters answered WAIT");
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_durability_is_refused_on_a_cluster_without_replicas() {
    let topic = unique("cluster-no-replicas");
    let idem = Idem::spawn(&cluster_opts(&topic).with("IDEM__REDIS__DURABILITY", "replicas:1"));
    let log = idem.log.clone();
    let status = idem.wait_exit(Duration::from_secs(60)).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{logged}");
    assert!(
        logged.contains("master 127.0.0.1:") && logged.contains("0 connected replica(s)"),
        "the error names the master that falls short:\n{logged}"
    );
}
