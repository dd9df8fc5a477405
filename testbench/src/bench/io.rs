//! What the bench's phases share: progress lines, a producer, idem's
//! metrics, Redis keys (and their cleanup), and stopping a process. Used by
//! runner.rs, compare.rs and effects.rs; imports none of them.

use std::process::{Child, Command};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::BenchSpec;
use crate::exposition;
use idem::metrics::EVENTS_TOTAL;

/// Memory is measured on a standalone Redis only (a cluster spreads it).
pub(super) async fn standalone_redis(
    spec: &BenchSpec,
) -> anyhow::Result<Option<redis::aio::MultiplexedConnection>> {
    if spec.redis_url.contains(',') {
        return Ok(None);
    }
    let client = redis::Client::open(spec.redis_url.as_str())?;
    Ok(Some(client.get_multiplexed_async_connection().await?))
}

pub(super) fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

pub(super) fn producer(brokers: &str, linger_ms: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms)
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

pub(super) fn send(producer: &FutureProducer, topic: &str, key: &[u8], value: &[u8]) {
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(value)) {
            Ok(_) => return,
            Err((_, _)) => producer.poll(Duration::from_millis(10)),
        }
    }
}

pub(super) fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

pub(super) async fn scrape(port: u16) -> Option<String> {
    idem::metrics::fetch_local(port, "/metrics").await
}

pub(super) async fn scrape_total(port: u16, topic: &str) -> Option<u64> {
    let text = scrape(port).await?;
    Some(exposition::sum(&text, EVENTS_TOTAL, &[("topic", topic)]) as u64)
}

pub(super) async fn scan_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> anyhow::Result<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Redis's counters since it started (`INFO cpu` and `INFO commandstats`),
/// all times in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct RedisTime {
    /// CPU, user + sys.
    pub cpu: f64,
    /// Time in scripts (`eval`, `evalsha`): the commands they run included.
    pub scripts: f64,
    /// Time in every other command: nearly all of it the scripts' own
    /// `redis.call`s (Redis counts those in commandstats too); the rest is
    /// idem's few commands outside the guard (progress, epoch reads).
    pub commands: f64,
    /// How many of those commands ran.
    pub command_calls: f64,
}

impl std::ops::Sub for RedisTime {
    type Output = RedisTime;
    fn sub(self, before: RedisTime) -> RedisTime {
        RedisTime {
            cpu: self.cpu - before.cpu,
            scripts: self.scripts - before.scripts,
            commands: self.commands - before.commands,
            command_calls: self.command_calls - before.command_calls,
        }
    }
}

/// What Redis spent per record over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RedisPerRecord {
    /// Redis's own CPU, µs.
    pub cpu_us: f64,
    /// The guard script's time, its commands included, µs.
    pub script_us: f64,
    /// The time of the commands it ran, µs.
    pub commands_us: f64,
    /// The script's time outside its commands (Lua, arguments, the bridge
    /// of each `redis.call`), µs.
    pub outside_us: f64,
    pub commands: f64,
}

impl RedisTime {
    /// This span's counters divided by `records`.
    pub fn per_record(&self, records: u64) -> RedisPerRecord {
        let n = records.max(1) as f64;
        RedisPerRecord {
            cpu_us: self.cpu / n,
            script_us: self.scripts / n,
            commands_us: self.commands / n,
            outside_us: (self.scripts - self.commands) / n,
            commands: self.command_calls / n,
        }
    }
}

/// One `cmdstat_<name>:calls=..,usec=..,...` line: name, calls, usec.
fn command_stat(line: &str) -> Option<(&str, f64, f64)> {
    let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
    let field = |key: &str| {
        fields
            .split(',')
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((name, field("calls=")?, field("usec=")?))
}

/// Redis's counters now (`INFO cpu commandstats`).
pub(super) async fn redis_time(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<RedisTime> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let seconds = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut time = RedisTime {
        cpu: (seconds("used_cpu_user:") + seconds("used_cpu_sys:")) * 1e6,
        ..RedisTime::default()
    };
    // INFO itself is the bench's, not idem's.
    for (name, calls, usec) in info.lines().filter_map(command_stat) {
        match name {
            "eval" | "evalsha" => time.scripts += usec,
            "info" => {}
            _ => {
                time.commands += usec;
                time.command_calls += calls;
            }
        }
    }
    Ok(time)
}

/// Deletes what the bench wrote, so repeated runs do not fill Redis.
pub(super) async fn cleanup(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    for pattern in [format!("{prefix}:*"), format!("{prefix}-*")] {
        if let Ok(keys) = scan_keys(conn, &pattern).await {
            for chunk in keys.chunks(1000) {
                let _: Result<i64, _> = redis::cmd("UNLINK").arg(chunk).query_async(conn).await;
            }
        }
    }
}
