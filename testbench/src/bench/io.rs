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

/// Redis's CPU (`INFO cpu`: user + sys) and its time in scripts (`INFO
/// commandstats`: `eval` and `evalsha`), both in µs since it started.
pub(super) async fn redis_time(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<(f64, f64)> {
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
    let cpu = (seconds("used_cpu_user:") + seconds("used_cpu_sys:")) * 1e6;
    let scripts = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    Ok((cpu, scripts))
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
