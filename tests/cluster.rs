//! The same promises on a three-master Redis Cluster (`make services` starts
//! it on 127.0.0.1:7000-7002): once per intent, crash safety, and a slot
//! migration while idem consumes.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::sample::{generate, Rng, SampleSpec};

const CATCH_UP: Duration = Duration::from_secs(120);

fn stream(prefix: &str, events: usize, seed: u64) -> Vec<idem::sample::SampleRecord> {
    generate(&SampleSpec {
        events,
        entities: 300,
        duplicate_ratio: 0.3,
        out_of_order_ratio: 0.1,
        delete_ratio: 0.02,
        data_bytes: 16,
        seed,
        prefix: prefix.to_string(),
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

fn reshard(from: u16, to: u16, slots: u32) {
    let status = Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
        .args([
            "--cluster-from",
            &node_id(from),
            "--cluster-to",
            &node_id(to),
        ])
        .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "redis-cli --cluster reshard failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_while_consuming_keeps_the_invariants() {
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
    let idem = Idem::spawn(&cluster_opts(&topic));
    wait_until("idem handles events", CATCH_UP, || async {
        idem.outcome(&topic, Outcome::Applied).await > 0
    })
    .await;
    // Move 1,000 slots from the first master to the second while events
    // flow, then back, so the cluster ends as it began.
    let moving = tokio::task::spawn_blocking(|| {
        reshard(7000, 7001, 1000);
        reshard(7001, 7000, 1000);
    });
    producing.await.unwrap();
    moving.await.unwrap();
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_matches_oracle(&redis_cluster_url(), &topic, &model).await;
    idem.terminate().await;
}
