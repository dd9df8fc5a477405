//! What the bench's phases share: progress lines, a producer, idem's
//! metrics, Redis keys, and stopping a process. Used by runner.rs and
//! effects.rs; imports neither.

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
