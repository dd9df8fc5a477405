//! Shared helpers of the integration tests: real Kafka, real Redis, the real
//! `idem` binary. Every test gets its own topic, group, key prefix and port.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use idem::model::{Model, Outcome};
use idem::store::{self, EntityView, KeyLayout};
use idem::tools::sample::{generate, SampleRecord, SampleSpec};
use idem::tools::topics::{self, TopicSpec};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

pub use idem_testbench::conformance::harness::IdemProcess;
pub use idem_testbench::oracle::oracle;
pub use idem_testbench::process::{free_port, rss_bytes, signal, IdemCommand};
pub use idem_testbench::services::{
    brokers, kafka, redis_env, redis_mode, redis_url, unique, unique_stream,
};

/// Creates `name` and its dead-letter topic `name.dlq`.
pub async fn create_topic(name: &str, partitions: i32) {
    let mut spec = TopicSpec::new(name, partitions);
    spec.dead_letter = Some(format!("{name}.dlq"));
    topics::apply(&kafka(), &spec.with_companions(), true)
        .await
        .expect("create topic");
}

/// Creates `name` only: its dead-letter topic is missing.
pub async fn create_topic_without_dlq(name: &str, partitions: i32) {
    topics::apply(&kafka(), &[TopicSpec::new(name, partitions)], true)
        .await
        .expect("create topic");
}

/// Every record of the dead-letter topic of `topic`.
pub async fn dead_letters(topic: &str) -> Vec<idem::tools::dead_letters::DlqRecord> {
    let dlq = format!("{topic}.dlq");
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        idem::tools::dead_letters::read_all(&kafka(), &dlq, |r| out.push(r))
            .expect("read dead letters");
        out
    })
    .await
    .unwrap()
}

pub use idem_testbench::conformance::harness::RawRecord;

/// Produces records keyed by entity and waits until Kafka acknowledged all
/// of them; returns each record's (partition, offset).
pub async fn produce(topic: &str, records: &[SampleRecord]) -> Vec<(i32, i64)> {
    idem_testbench::conformance::harness::produce(&harness_env(), topic, records)
        .await
        .expect("produce")
}

/// Produces raw key/value pairs (either may be absent), in order; returns
/// each record's (partition, offset).
pub async fn produce_raw(topic: &str, records: &[RawRecord<'_>]) -> Vec<(i32, i64)> {
    idem_testbench::conformance::harness::produce_raw(&harness_env(), topic, records)
        .await
        .expect("produce")
}

/// How the test runs one idem process.
#[derive(Debug, Clone)]
pub struct IdemOpts {
    pub topics: Vec<String>,
    pub group: String,
    pub prefix: String,
    pub redis_url: String,
    pub env: Vec<(String, String)>,
}

impl IdemOpts {
    pub fn new(topic: &str, group: &str, prefix: &str) -> Self {
        IdemOpts {
            topics: vec![topic.to_string()],
            group: group.to_string(),
            prefix: prefix.to_string(),
            redis_url: redis_url(),
            env: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running `idem run` process: the harness's [`IdemProcess`], with
/// checks that fail the test.
pub struct Idem {
    process: IdemProcess,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Idem {
    pub fn spawn(opts: &IdemOpts) -> Idem {
        let port = free_port();
        let log =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.log", unique(&opts.group)));
        let mut cmd = IdemCommand::new(
            std::path::Path::new(env!("CARGO_BIN_EXE_idem")),
            &brokers(),
            &opts.topics.join(","),
            &opts.group,
        )
        .clean_env()
        .fast_recovery()
        .redis(&opts.redis_url, redis_mode(&opts.redis_url), &opts.prefix)
        .metrics_port(port);
        for (k, v) in &opts.env {
            cmd = cmd.env(k, v);
        }
        let process = IdemProcess::start(&cmd, &log, port).expect("spawn idem");
        Idem {
            process,
            metrics_port: port,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn stop_process(&self) {
        assert!(signal(self.pid(), "-STOP"), "kill -STOP failed");
    }

    pub fn continue_process(&self) {
        assert!(signal(self.pid(), "-CONT"), "kill -CONT failed");
    }

    /// Resident memory now, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// SIGKILL: no chance to commit anything.
    pub fn kill(self) {
        self.process.kill();
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn terminate(self) {
        let log = self.log.display().to_string();
        match self.process.terminate_status().await {
            Some(status) => assert!(status.success(), "idem exited with {status}; log: {log}"),
            None => panic!("idem did not stop after SIGTERM; log: {log}"),
        }
    }

    /// Waits until idem exits on its own; returns its exit status.
    pub async fn wait_exit(self, timeout: Duration) -> std::process::ExitStatus {
        let log = self.log.display().to_string();
        self.process
            .wait_exit(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}; log: {log}"))
    }

    /// The current /metrics text, if the endpoint answers.
    pub async fn metrics(&self) -> Option<String> {
        http_get(self.metrics_port, "/metrics").await
    }

    /// Sum of a counter over all label sets matching every `label="value"` given.
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let text = self.metrics().await?;
        Some(sum_metric(&text, name, labels))
    }

    pub async fn outcome(&self, topic: &str, outcome: Outcome) -> u64 {
        self.counter(
            "idem_events_total",
            &[("topic", topic), ("outcome", outcome.as_str())],
        )
        .await
        .unwrap_or(0)
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.try_wait() {
            panic!(
                "idem exited early with {status}; log: {}",
                self.log.display()
            );
        }
    }
}

/// Runs an `idem` tool command (replay, reconcile, dlq …) against the test
/// services, with `prefix` as the Redis key prefix and more `IDEM__…` settings.
pub fn idem_tool(args: &[&str], prefix: &str, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("IDEM__KAFKA__BROKERS", brokers())
        .envs(redis_env(&redis_url()))
        .env("IDEM__REDIS__KEY_PREFIX", prefix)
        .envs(env.iter().copied())
        .output()
        .expect("run idem")
}

/// Until the group has no members (its instances stopped and left).
pub async fn wait_group_empty(group: &str, topic: &str) {
    let (g, t) = (group.to_string(), topic.to_string());
    wait_until("the group has no members", Duration::from_secs(120), || {
        let (g, t) = (g.clone(), t.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                idem::tools::group::group_status(&kafka(), &g, &[t]).unwrap()
            })
            .await
            .unwrap()
            .members
            .is_empty()
        }
    })
    .await;
}

/// `idem_tool` without more settings: (exit code, stdout, stderr).
pub fn idem_tool_output(args: &[&str], prefix: &str) -> (i32, String, String) {
    let out = idem_tool(args, prefix, &[]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Commits `offsets` (partition i at offsets[i]) for `group` as any other
/// Kafka client does (`kafka-consumer-groups --reset-offsets --execute`):
/// without idem's metadata.
pub fn commit_as_a_plain_client(group: &str, topic: &str, offsets: &[i64]) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, o) in offsets.iter().enumerate() {
        tpl.add_partition_offset(topic, p as i32, rdkafka::Offset::Offset(*o))
            .unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
}

/// Runs `idem reconcile --topic <topic>` (key prefix `<topic>`, the only
/// topic of kafka.topics) with `extra`
/// arguments and `env`: its exit code and its JSON report.
pub fn reconcile_report(
    topic: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, serde_json::Value) {
    let report = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{topic}.json"));
    let mut args = vec![
        "reconcile",
        "--topic",
        topic,
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    // The deployment's config: its one topic writes the prefix.
    let mut env = env.to_vec();
    env.insert(0, ("IDEM__KAFKA__TOPICS", topic));
    let out = idem_tool(&args, topic, &env);
    let json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (out.status.code(), json)
}

pub async fn http_get(port: u16, path: &str) -> Option<String> {
    idem::metrics::fetch_local(port, path).await
}

/// Sums the samples of `name` whose labels include all of `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    idem_testbench::exposition::sum(text, name, labels) as u64
}

/// `promtool check rules` accepts the rules file at `path`.
pub fn assert_promtool_passes(path: &str) {
    let check = Command::new("promtool")
        .args(["check", "rules", path])
        .output()
        .expect("promtool (apt-get install prometheus, or make services)");
    assert!(
        check.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Polls `check` until it returns true or `timeout` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every member holds at least one partition (its
/// `idem_assigned_partitions` gauge above zero); `when` names the moment.
pub async fn wait_all_hold_partitions(members: &[Idem], when: &str) {
    wait_until(
        &format!("every member holds partitions {when}"),
        Duration::from_secs(180),
        || async {
            let mut holding = 0;
            for m in members {
                if m.counter("idem_assigned_partitions", &[])
                    .await
                    .unwrap_or(0)
                    > 0
                {
                    holding += 1;
                }
            }
            holding == members.len()
        },
    )
    .await;
}

/// The conformance harness's view of the local services, for its Kafka helpers.
fn harness_env() -> idem_testbench::conformance::Env {
    idem_testbench::conformance::Env {
        brokers: brokers(),
        redis: idem_testbench::conformance::harness::RedisTarget::new(
            &redis_url(),
            redis_mode(&redis_url()),
        ),
        idem_exe: PathBuf::from(env!("CARGO_BIN_EXE_idem")),
        work_dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        group_protocol: idem::config::GroupProtocol::Classic,
    }
}

/// The group's committed offset per partition (-1 where none).
pub async fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    idem_testbench::conformance::harness::committed(&harness_env(), group, topic, partitions)
        .await
        .expect("committed offsets")
}

/// The end offset (high watermark) per partition.
pub async fn end_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    idem_testbench::conformance::harness::end_offsets(&harness_env(), topic, partitions)
        .await
        .expect("end offsets")
}

/// Waits until the group has committed everything in the topic (an empty
/// partition has nothing to commit).
pub async fn wait_caught_up(group: &str, topic: &str, partitions: i32, timeout: Duration) {
    idem_testbench::conformance::harness::wait_caught_up(
        &harness_env(),
        group,
        topic,
        partitions,
        timeout,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The local Redis Cluster's seed nodes (`make services` starts it).
pub fn redis_cluster_url() -> String {
    std::env::var("IDEM_REDIS_CLUSTER_URL").unwrap_or_else(|_| {
        "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
    })
}

/// A connection to `url` (a cluster when it lists several seed nodes).
pub async fn redis_conn(url: &str) -> idem::store::RedisConn {
    let cfg = idem::config::RedisConfig::for_url(url, redis_mode(url));
    store::connect(&cfg).await.expect("redis connection")
}

pub async fn read_entities(
    url: &str,
    prefix: &str,
    entities: impl Iterator<Item = &String>,
) -> BTreeMap<String, EntityView> {
    let mut conn = redis_conn(url).await;
    let layout = KeyLayout::new(prefix);
    let mut out = BTreeMap::new();
    for e in entities {
        out.insert(
            e.clone(),
            store::read_entity(&mut conn, &layout, e).await.unwrap(),
        );
    }
    out
}

/// Waits until Redis forgot every id remembered under `prefix` (the window's
/// generations expire after two windows; EXISTS expires a key lazily).
pub async fn wait_ids_expired(prefix: &str) {
    let conn = redis_conn(&redis_url()).await;
    let pattern = format!("{prefix}:{{*}}:ids:*");
    wait_until(
        "every remembered id expired",
        Duration::from_secs(30),
        || {
            let (mut conn, pattern) = (conn.clone(), pattern.clone());
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let mut live = 0;
                for k in keys {
                    let exists: bool = redis::cmd("EXISTS")
                        .arg(&k)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    live += usize::from(exists);
                }
                live == 0
            }
        },
    )
    .await;
}

/// The entities whose state, applied count, seq or deletion in Redis differ
/// from the oracle's, one line each.
pub async fn oracle_mismatches(url: &str, prefix: &str, model: &Model) -> Vec<String> {
    let views = read_entities(url, prefix, model.entities.keys()).await;
    let mut mismatches = Vec::new();
    for (name, want) in &model.entities {
        let got = &views[name];
        if got.state != want.state
            || got.applied != want.applied
            || got.seq != want.seq
            || got.deleted != want.deleted
        {
            mismatches.push(format!(
                "{name}: redis seq={:?} applied={} deleted={} state={:?}; oracle seq={:?} applied={} deleted={} state={:?}",
                got.seq, got.applied, got.deleted, got.state, want.seq, want.applied, want.deleted, want.state
            ));
        }
    }
    mismatches
}

/// Asserts that Redis holds exactly the oracle's state and applied count for every entity.
pub async fn assert_matches_oracle(url: &str, prefix: &str, model: &Model) {
    let mismatches = oracle_mismatches(url, prefix, model).await;
    assert!(
        mismatches.is_empty(),
        "{} of {} entities differ from the oracle, e.g.\n{}",
        mismatches.len(),
        model.entities.len(),
        mismatches
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Waits until Redis holds exactly the oracle's state for every entity.
pub async fn wait_matches_oracle(url: &str, prefix: &str, model: &Model, timeout: Duration) {
    wait_until("every entity equals the oracle", timeout, || async {
        oracle_mismatches(url, prefix, model).await.is_empty()
    })
    .await;
    assert_matches_oracle(url, prefix, model).await;
}

pub use idem_testbench::conformance::harness::PrivateRedis;

/// A redis-server of the test's own, on its own port and folder, that the
/// test may kill and restart. AOF with fsync always: what it acknowledged
/// survives a SIGKILL. Requires `password` when given.
pub async fn private_redis(password: Option<&str>) -> PrivateRedis {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    PrivateRedis::start_with(&dir, "always", password)
        .await
        .expect("private redis-server (install redis-server, or run `make services`)")
}

/// The topic's id, as idem reads it.
pub async fn topic_id(topic: &str) -> Option<idem::consumed::TopicId> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::consumer::BaseConsumer =
            idem::kafka::base_config(&kafka()).create().unwrap();
        idem::kafka::topic_ids::topic_ids(
            rdkafka::consumer::Consumer::client(&client),
            std::slice::from_ref(&topic),
            Duration::from_secs(10),
        )
        .ok()
        .and_then(|mut ids| ids.remove(&topic))
    })
    .await
    .unwrap()
}

/// Deletes `topic` and creates it again (retrying while the broker still
/// holds it for deletion).
pub async fn recreate_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        idem::kafka::base_config(&kafka()).create().unwrap();
    admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    let topic = topic.to_string();
    wait_until(
        "the topic is created again",
        Duration::from_secs(120),
        || {
            let topic = topic.clone();
            async move {
                let mut spec = idem::tools::topics::TopicSpec::new(&topic, 1);
                spec.dead_letter = Some(format!("{topic}.dlq"));
                idem::tools::topics::apply(&kafka(), &spec.with_companions(), true)
                    .await
                    .is_ok()
                    && topic_id_now(&topic).await
            }
        },
    )
    .await;
}

/// Whether the brokers describe `topic` (with an id) right now.
async fn topic_id_now(topic: &str) -> bool {
    topic_id(topic).await.is_some()
}
