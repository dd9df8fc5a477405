//! The services a test run talks to (what `make services` starts), and names
//! no other test uses. Variables: `IDEM_KAFKA_BROKERS`, `IDEM_REDIS_URL`
//! (several comma-separated seed nodes: a Redis Cluster).

use std::sync::atomic::{AtomicU32, Ordering};

use idem::config::{KafkaConfig, RedisMode};
use idem::tools::sample::{generate, SampleRecord, SampleSpec};

pub fn brokers() -> String {
    std::env::var("IDEM_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Client settings for the tests' broker (plaintext).
pub fn kafka() -> KafkaConfig {
    KafkaConfig::for_brokers(&brokers())
}

/// The Redis the tests use: standalone by default; `IDEM_REDIS_URL` with
/// several comma-separated seed nodes runs the suite against a cluster.
pub fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A cluster when `url` lists several seed nodes.
pub fn redis_mode(url: &str) -> RedisMode {
    if url.contains(',') {
        RedisMode::Cluster
    } else {
        RedisMode::Standalone
    }
}

/// The `IDEM__REDIS__…` variables that point idem at `url`.
pub fn redis_env(url: &str) -> Vec<(&'static str, String)> {
    let mode = match redis_mode(url) {
        RedisMode::Cluster => "cluster",
        RedisMode::Standalone => "standalone",
    };
    vec![
        ("IDEM__REDIS__URL", url.to_string()),
        ("IDEM__REDIS__MODE", mode.to_string()),
    ]
}

/// A name no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        % 1_000_000_000_000;
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A stream with no redelivered copies, no reordering and no deletes: every
/// duplicate outcome is a redelivery by Kafka. Ids and entities start with
/// `prefix`.
pub fn unique_stream(prefix: &str, events: usize, entities: usize, seed: u64) -> Vec<SampleRecord> {
    generate(&SampleSpec {
        events,
        entities,
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.0,
        delete_ratio: 0.0,
        data_bytes: 16,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    })
}
