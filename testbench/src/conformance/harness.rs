//! The conformance suite's hands: idem processes it can kill, stop and
//! restart, private Redis servers, Kafka helpers, and the invariant checks.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::process::IdemCommand;
use idem::config::{RedisConfig, RedisMode};
use idem::event::{decode, FieldMap};
use idem::model::{Model, Outcome};
use idem::store::{self, EntityView, KeyLayout};
use idem::tools::sample::SampleRecord;
use idem::tools::topics::{self, TopicSpec};

/// Where the suite runs.
#[derive(Debug, Clone)]
pub struct Env {
    pub brokers: String,
    pub redis: RedisTarget,
    pub idem_exe: PathBuf,
    pub work_dir: PathBuf,
}

/// A Redis the suite talks to: the shared one (standalone or a cluster) or
/// a scenario's private redis-server.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub url: String,
    pub mode: RedisMode,
}

impl RedisTarget {
    pub fn new(url: &str, mode: RedisMode) -> Self {
        RedisTarget {
            url: url.to_string(),
            mode,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.mode == RedisMode::Cluster
    }

    pub async fn connect(&self) -> anyhow::Result<store::RedisConn> {
        let mut cfg = RedisConfig::for_url(&self.url, self.mode);
        cfg.response_timeout = Duration::from_secs(5);
        cfg.connect_timeout = Duration::from_secs(2);
        Ok(store::connect(&cfg).await?)
    }
}

pub use crate::process::free_port;
use crate::process::signal;

/// One `idem run` process.
pub struct IdemProcess {
    child: Child,
    pub port: u16,
}

impl IdemProcess {
    pub fn spawn(
        env: &Env,
        topic: &str,
        group: &str,
        prefix: &str,
        redis: &RedisTarget,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let mut cmd = IdemCommand::new(&env.idem_exe, &env.brokers, topic, group)
            .fast_recovery()
            .redis(&redis.url, redis.mode, prefix)
            .metrics_port(port)
            .env("IDEM__PIPELINE__BATCH_MAX_EVENTS", "500");
        for (k, v) in extra {
            cmd = cmd.env(k, v);
        }
        let child = cmd.spawn(&env.work_dir.join(format!("{group}.log")))?;
        Ok(IdemProcess { child, port })
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn terminate(mut self) -> bool {
        signal(self.child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        false
    }

    pub fn stop(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Waits until the process exits on its own, at most `bound`.
    pub async fn wait_exit(mut self, bound: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(Instant::now() < deadline, "idem still runs after {bound:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// Sum of `idem_events_total` for `outcome` (or all outcomes).
    pub async fn outcome(&self, outcome: Option<Outcome>) -> u64 {
        let Some(text) = scrape(self.port).await else {
            return 0;
        };
        let labels: Vec<(&str, &str)> = outcome.iter().map(|o| ("outcome", o.as_str())).collect();
        idem::metrics::sum_series(&text, idem::metrics::EVENTS_TOTAL, &labels) as u64
    }
}

impl Drop for IdemProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn scrape(port: u16) -> Option<String> {
    idem::metrics::fetch_local(port, "/metrics").await
}

/// A redis-server of the suite's own, which it may kill and restart.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    fsync: &'static str,
    password: Option<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// `fsync` is the AOF policy: "always" or "everysec".
    pub async fn start(work_dir: &Path, fsync: &'static str) -> anyhow::Result<Self> {
        Self::start_with(work_dir, fsync, None).await
    }

    /// Like `start`, requiring `password` (AUTH) when given.
    pub async fn start_with(
        work_dir: &Path,
        fsync: &'static str,
        password: Option<&str>,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let dir = work_dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut r = PrivateRedis {
            port,
            dir,
            fsync,
            password: password.map(str::to_string),
            child: None,
        };
        r.restart().await?;
        Ok(r)
    }

    /// This server as the suite's target.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::new(&self.url(), RedisMode::Standalone)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", self.fsync])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot start redis-server (needed by this scenario): {e}")
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        loop {
            if let Ok(client) = redis::Client::open(url.as_str()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        return Ok(());
                    }
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "private redis did not answer PING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server stalls and clients time out.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-STOP");
        }
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-CONT");
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A six-node Redis Cluster of the suite's own (three masters, each with one
/// replica) on free ports, so that a scenario or a test may kill a master.
pub struct PrivateCluster {
    dir: PathBuf,
    pub nodes: Vec<(u16, Child)>,
}

impl PrivateCluster {
    /// Starts the nodes in a folder of `work_dir` and creates the cluster.
    pub fn start(work_dir: &Path) -> anyhow::Result<PrivateCluster> {
        let dir = work_dir.join(format!("cluster-{}", free_port()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = PrivateCluster {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..6 {
            let port = cluster_node_port(&cluster.nodes);
            let child = cluster.spawn_node(port)?;
            cluster.nodes.push((port, child));
        }
        for (port, _) in &cluster.nodes {
            wait_for_node(*port)?;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| anyhow::anyhow!("redis-cli (make services installs redis-tools): {e}"))?;
        anyhow::ensure!(status.success(), "redis-cli --cluster create failed");
        Ok(cluster)
    }

    /// Waits until `healthy`, at most `bound`.
    pub async fn wait_healthy(&self, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        while !self.healthy() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the private cluster did not become healthy within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// One node; its cluster state lives in `dir`, so a restarted node rejoins.
    fn spawn_node(&self, port: u16) -> anyhow::Result<Child> {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("redis-server (make services installs it): {e}"))
    }

    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// This cluster as the suite's target.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::new(&self.url(), RedisMode::Cluster)
    }

    /// `redis-cli role`: "master", or "slave" and the master's port.
    pub fn role(port: u16) -> (String, Option<u16>) {
        let text = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "role"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let mut lines = text.lines();
        let role = lines.next().unwrap_or("").to_string();
        let master_port = lines.nth(1).and_then(|p| p.trim().parse().ok());
        (role, master_port)
    }

    /// Whether every slot is served and every master has a connected replica.
    pub fn healthy(&self) -> bool {
        let (first, _) = self.nodes[0];
        let info = Command::new("redis-cli")
            .args(["-p", &first.to_string(), "cluster", "info"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        info.contains("cluster_state:ok")
            && self
                .nodes
                .iter()
                .filter(|(p, _)| Self::role(*p).0 == "master")
                .all(|(p, _)| {
                    let repl = Command::new("redis-cli")
                        .args(["-p", &p.to_string(), "info", "replication"])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                        .unwrap_or_default();
                    repl.contains("connected_slaves:1") && repl.contains("state=online")
                })
    }

    /// Sends `sig` (e.g. "-STOP") to the node on `port`.
    pub fn signal(&self, port: u16, sig: &str) {
        if let Some((_, child)) = self.nodes.iter().find(|(p, _)| *p == port) {
            signal(child.id(), sig);
        }
    }

    /// SIGKILLs the node on `port`; `restart` starts it again on its state.
    pub fn kill(&mut self, port: u16) {
        if let Some((_, child)) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let child = self.spawn_node(port)?;
        wait_for_node(port)?;
        if let Some(node) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            node.1 = child;
        }
        Ok(())
    }

    /// The port of a master and of its replica.
    pub fn master_and_replica(&self) -> Option<(u16, u16)> {
        let ports: Vec<u16> = self.nodes.iter().map(|(p, _)| *p).collect();
        let master = *ports.iter().find(|p| Self::role(**p).0 == "master")?;
        let replica = *ports
            .iter()
            .find(|p| Self::role(**p) == ("slave".to_string(), Some(master)))?;
        Some((master, replica))
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port for a cluster node: at most 55535 (Redis refuses higher
/// ones in cluster mode), with its bus port (+10000) free too, and not
/// already given to another node.
fn cluster_node_port(taken: &[(u16, Child)]) -> u16 {
    loop {
        let port = free_port();
        if port <= 55535
            && !taken
                .iter()
                .any(|(p, _)| *p == port || *p + 10000 == port || port + 10000 == *p)
            && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
}

fn wait_for_node(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
            .unwrap_or(false);
        if pong {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "redis-server on {port} did not answer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates `topic` and `topic.dlq`.
pub async fn create_topic(env: &Env, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let mut spec = TopicSpec::new(topic, partitions);
    spec.dead_letter = Some(format!("{topic}.dlq"));
    topics::apply(
        &idem::config::KafkaConfig::for_brokers(&env.brokers),
        &spec.with_dead_letter(),
    )
    .await?;
    Ok(())
}

/// Sets one config of an existing topic (e.g. `max.message.bytes`).
pub async fn set_topic_config(
    env: &Env,
    topic: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()?;
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set(key, value);
    for r in admin.alter_configs([&change], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("setting {key} of {topic}: {e}"))?;
    }
    Ok(())
}

/// Deletes `topic`.
pub async fn delete_topic(env: &Env, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()?;
    for r in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("deleting {topic}: {e}"))?;
    }
    Ok(())
}

/// Produces records keyed by entity, waits for every acknowledgement, and
/// returns each record's (partition, offset).
pub async fn produce(
    env: &Env,
    topic: &str,
    records: &[SampleRecord],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Scenarios produce records larger than librdkafka's default 1 MB.
        .set("message.max.bytes", "10000000")
        .create()?;
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut rec = FutureRecord::to(topic)
            .key(r.key.as_bytes())
            .payload(&r.value);
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((_, back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    let mut out = Vec::with_capacity(pending.len());
    for f in pending {
        let d = f.await?.map_err(|(e, _)| e)?;
        out.push((d.partition, d.offset));
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(out)
}

fn admin_consumer(env: &Env, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Committed offset per partition (-1 where none).
pub async fn committed(
    env: &Env,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    let (env, group, topic) = (env.clone(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c = admin_consumer(&env, &group)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        // A broker that just restarted (a fault the suite injects) answers
        // "not coordinator" or "loading" for a few seconds: ask again.
        let deadline = Instant::now() + COORDINATOR_SETTLE;
        let got = loop {
            match c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                Err(e) if is_coordinator_moving(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                got => break got?,
            }
        };
        Ok((0..partitions)
            .map(
                |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                },
            )
            .collect())
    })
    .await?
}

/// How long a committed-offsets query waits for the group coordinator to settle.
const COORDINATOR_SETTLE: Duration = Duration::from_secs(30);

/// The coordinator is moving or loading its offsets: asking again helps.
fn is_coordinator_moving(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(NotCoordinator | CoordinatorLoadInProgress | CoordinatorNotAvailable)
    )
}

pub async fn end_offsets(env: &Env, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let (env, topic) = (env.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c = admin_consumer(&env, "idem-conformance-watermarks")?;
        (0..partitions)
            .map(|p| Ok(c.fetch_watermarks(&topic, p, Duration::from_secs(10))?.1))
            .collect()
    })
    .await?
}

/// Waits until the group committed everything; returns how long it took.
pub async fn wait_caught_up(
    env: &Env,
    group: &str,
    topic: &str,
    partitions: i32,
    bound: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let end = end_offsets(env, topic, partitions).await?;
    loop {
        let now = committed(env, group, topic, partitions).await?;
        // A partition that never got a record has nothing to commit.
        if now
            .iter()
            .zip(&end)
            .all(|(c, e)| c == e || (*e == 0 && *c < 0))
        {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < bound,
            "I5: group {group} did not catch up within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The oracle: the model applied in production order.
pub fn oracle(records: &[SampleRecord]) -> Model {
    let mut model = Model::default();
    for r in records {
        if let Ok(e) = decode(Some(&r.value), &FieldMap::default(), 1 << 20) {
            model.apply(&e);
        }
    }
    model
}

pub async fn read_views(
    redis: &RedisTarget,
    prefix: &str,
    entities: impl Iterator<Item = &String>,
) -> anyhow::Result<BTreeMap<String, EntityView>> {
    let mut conn = redis.connect().await?;
    let layout = KeyLayout::new(prefix);
    let mut out = BTreeMap::new();
    for e in entities {
        out.insert(e.clone(), store::read_entity(&mut conn, &layout, e).await?);
    }
    Ok(out)
}

/// I1 and I2: (lost effects, doubled effects, a few examples) against the oracle.
pub async fn lost_and_doubled(
    redis: &RedisTarget,
    prefix: &str,
    model: &Model,
) -> anyhow::Result<(u64, u64, Vec<String>)> {
    let views = read_views(redis, prefix, model.entities.keys()).await?;
    let (mut lost, mut doubled) = (0, 0);
    let mut examples = Vec::new();
    for (name, want) in &model.entities {
        let got = &views[name];
        doubled += got.applied.saturating_sub(want.applied);
        let missing = want.applied.saturating_sub(got.applied);
        // A state that differs with equal counters is a lost (or wrong) effect too.
        let wrong_state = missing == 0
            && (got.state != want.state || got.seq != want.seq || got.deleted != want.deleted);
        lost += missing + u64::from(wrong_state);
        if (missing > 0 || wrong_state || got.applied > want.applied) && examples.len() < 3 {
            examples.push(format!(
                "{name}: redis seq {:?} applied {}, oracle seq {:?} applied {}",
                got.seq, got.applied, want.seq, want.applied
            ));
        }
    }
    Ok((lost, doubled, examples))
}

/// I4 at a quiet moment: every record below a committed offset has its effect
/// (its entity's recorded seq is at least the record's seq). Returns violations.
pub async fn commits_ahead_of_effects(
    env: &Env,
    redis: &RedisTarget,
    group: &str,
    topic: &str,
    partitions: i32,
    prefix: &str,
    positions: &Positions,
) -> anyhow::Result<u64> {
    let committed = committed(env, group, topic, partitions).await?;
    let entities: std::collections::BTreeSet<String> =
        positions.values().map(|r| r.entity.clone()).collect();
    let views = read_views(redis, prefix, entities.iter()).await?;
    let mut violations = 0;
    // Per entity, how many records the oracle applies below the commit points:
    // Redis must have applied at least that many (a seq check alone would miss
    // a committed record whose effect is lost under a later one).
    let mut must_have_applied: HashMap<&str, u64> = HashMap::new();
    for ((p, offset), r) in positions {
        if *offset < committed[*p as usize] {
            if views[&r.entity].seq.unwrap_or(0) < r.seq {
                violations += 1;
            }
            if r.applied_by_oracle {
                *must_have_applied.entry(&r.entity).or_default() += 1;
            }
        }
    }
    for (entity, need) in must_have_applied {
        violations += need.saturating_sub(views[entity].applied);
    }
    Ok(violations)
}

/// What the suite knows about one produced record.
#[derive(Debug, Clone)]
pub struct RecordFacts {
    pub entity: String,
    pub seq: u64,
    /// Whether the oracle applies it (the first sighting of a newer seq).
    pub applied_by_oracle: bool,
}

/// Produced records by (partition, offset).
pub type Positions = HashMap<(i32, i64), RecordFacts>;

/// For each record in production order: does the oracle apply it?
pub fn oracle_applies(records: &[SampleRecord]) -> Vec<bool> {
    let mut model = Model::default();
    records
        .iter()
        .map(
            |r| match decode(Some(&r.value), &FieldMap::default(), 1 << 20) {
                Ok(e) => model.apply(&e) == Outcome::Applied,
                Err(_) => false,
            },
        )
        .collect()
}

/// Where each produced record landed, with what the suite knows about it.
pub fn positions(
    records: &[SampleRecord],
    delivered: &[(i32, i64)],
    applied: &[bool],
) -> Positions {
    records
        .iter()
        .zip(delivered)
        .zip(applied)
        .filter_map(|((r, pos), applied)| {
            let e = decode(Some(&r.value), &FieldMap::default(), 1 << 20).ok()?;
            Some((
                *pos,
                RecordFacts {
                    entity: e.entity,
                    seq: e.seq,
                    applied_by_oracle: *applied,
                },
            ))
        })
        .collect()
}

/// I3 and I4 samplers: while a scenario runs, read every entity's seq and the
/// group's committed offsets; count decreases of either.
pub struct Sampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>,
}

impl Sampler {
    pub fn start(
        env: &Env,
        redis: &RedisTarget,
        prefix: &str,
        group: &str,
        topic: &str,
        partitions: i32,
        entities: Vec<String>,
    ) -> Sampler {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (env, redis, prefix, group, topic) = (
            env.clone(),
            redis.clone(),
            prefix.to_string(),
            group.to_string(),
            topic.to_string(),
        );
        let task = tokio::spawn(async move {
            let mut seqs: HashMap<String, u64> = HashMap::new();
            let mut last_committed = vec![-1i64; partitions as usize];
            let (mut seq_decreases, mut commit_decreases) = (0u64, 0u64);
            while !*stopped.borrow() {
                if let Ok(views) = read_views(&redis, &prefix, entities.iter()).await {
                    for (e, v) in views {
                        let now = v.seq.unwrap_or(0);
                        let before = seqs.entry(e).or_insert(now);
                        if now < *before {
                            seq_decreases += 1;
                        }
                        *before = now.max(*before);
                    }
                }
                if let Ok(c) = committed(&env, &group, &topic, partitions).await {
                    for (i, o) in c.iter().enumerate() {
                        // -1: no commit read (none yet, or a failed read): not a move back.
                        if *o >= 0 && *o < last_committed[i] {
                            commit_decreases += 1;
                        }
                        last_committed[i] = last_committed[i].max(*o);
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Ok((seq_decreases, commit_decreases))
        });
        Sampler { stop, task }
    }

    /// (seq decreases, committed-offset decreases) seen.
    pub async fn finish(self) -> anyhow::Result<(u64, u64)> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}
