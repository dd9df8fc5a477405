//! The effects phase: the same number of events run twice through the real
//! `idem`, each on its own topic and key prefix, in the same run: once as
//! plain merges, once as a payments stream whose events count a balance,
//! append to a ledger and run a custom effect (docs/effects.md). Reported:
//! records/s, Redis µs per record (`INFO commandstats`, the guard script's
//! time) and Redis bytes per entity.

use std::time::{Duration, Instant};

use super::io::{
    producer, progress, redis_time, scan_keys, scrape_total, send, standalone_redis, stop,
};
use super::report::EffectsRow;
use super::BenchSpec;
use crate::payments::{self, PaymentsSpec};
use crate::process::IdemCommand;
use idem::tools::sample::SampleRecord;
use idem::tools::topics::{self, TopicSpec};

/// The variants: a name, the `[[effects]]` of its topic (none: merge), and
/// the key suffixes whose memory it adds.
fn variants(
    topic: &str,
    snippet: &std::path::Path,
) -> Vec<(&'static str, Option<String>, &'static [&'static str])> {
    let rule = |kind: &str, body: &str| {
        format!("[[effects]]\ntopic = \"{topic}\"\ntypes = [\"{kind}\"]\n{body}\n")
    };
    let both = |deposit: &str, withdrawal: &str| {
        format!(
            "{}{}",
            rule("deposit", deposit),
            rule("withdrawal", withdrawal)
        )
    };
    let ledger = "ledger = { stream = \"ledger\", fields = [\"amount\"], max_len = 100000 }";
    let custom = format!(
        "custom = [{{ file = \"{}\", order = \"commutative\", writes = [\"points\"] }}]",
        snippet.display()
    );
    vec![
        ("merge (no effects declared)", None, &[":state", ":meta"][..]),
        (
            "counter",
            Some(both(
                "counters = [{ field = \"balance\", from = \"/amount\", scale = 2 }]",
                "counters = [{ field = \"balance\", from = \"/amount\", scale = 2, subtract = true }]",
            )),
            &[":counters"][..],
        ),
        ("ledger", Some(both(ledger, ledger)), &[":ledger:*"][..]),
        (
            "set add",
            Some(rule("deposit", "set_add = [{ set = \"amounts\", from = \"/amount\" }]")),
            &[":set:*"][..],
        ),
        ("custom (Lua)", Some(rule("deposit", &custom)), &[":counters"][..]),
        (
            "counter + ledger + custom + status",
            Some(payments::effects_toml(topic, snippet)),
            &[":counters", ":ledger:*"][..],
        ),
        // The first row again, last: how much the order of the runs moves the figures.
        ("merge again (order check)", None, &[":state", ":meta"][..]),
    ]
}

/// The payments stream the effects and changelog phases run (at most
/// 100,000 events), its ids under `run_prefix`.
pub(super) fn payments_stream(spec: &BenchSpec, run_prefix: &str) -> Vec<SampleRecord> {
    payments::generate(&PaymentsSpec {
        events: spec.events.min(100_000),
        accounts: spec.entities,
        duplicate_ratio: spec.duplicate_ratio,
        out_of_order_ratio: spec.out_of_order_ratio,
        seed: spec.seed,
        prefix: run_prefix.to_string(),
    })
}

/// Runs every variant on the same payments stream (at most 100,000 events),
/// each on its own topic and key prefix named after `run_prefix`.
pub async fn measure(spec: &BenchSpec, run_prefix: &str) -> anyhow::Result<Vec<EffectsRow>> {
    let records = payments_stream(spec, run_prefix);
    let dir = spec.out_dir.join("effects");
    std::fs::create_dir_all(&dir)?;
    let snippet = dir.join("loyalty.lua");
    std::fs::write(&snippet, payments::LOYALTY_LUA)?;
    let mut rows = Vec::new();
    for i in 0..variants(run_prefix, &snippet).len() {
        let topic = format!("{run_prefix}-fx{i}");
        let (name, toml, suffixes) = variants(&topic, &snippet).swap_remove(i);
        let config = match toml {
            Some(text) => {
                let path = dir.join(format!("fx{i}.toml"));
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let setup = Setup {
            config: config.as_deref(),
            ..Setup::default()
        };
        rows.push(run_variant(spec, name, &topic, &records, &setup, suffixes).await?);
    }
    Ok(rows)
}

/// How a variant's idem runs besides its topic.
#[derive(Default)]
pub(super) struct Setup<'a> {
    /// Its config file (`IDEM_CONFIG`).
    pub config: Option<&'a std::path::Path>,
    /// More environment (`IDEM__…` settings).
    pub env: Vec<(&'static str, String)>,
    /// The changelog is on: wait until the outbox is drained too, and
    /// measure it (`to_changelog_records_per_second`, or, when the relay
    /// cannot publish, `outbox_bytes_per_entry`).
    pub changelog: bool,
    /// Create the changelog topic `<topic>.changes` (false: the relay
    /// cannot publish and the outbox keeps every change).
    pub changelog_topic: bool,
}

pub(super) async fn run_variant(
    spec: &BenchSpec,
    name: &str,
    prefix: &str,
    records: &[SampleRecord],
    setup: &Setup<'_>,
    key_suffixes: &[&str],
) -> anyhow::Result<EffectsRow> {
    let topic = prefix;
    progress(&format!(
        "{name}: producing {} records to {topic}",
        records.len()
    ));
    produce_to(spec, topic, records).await?;
    if setup.changelog_topic {
        topics::apply(
            &idem::config::KafkaConfig::for_brokers(&spec.brokers),
            &[TopicSpec::new(format!("{topic}.changes"), spec.partitions)],
            true,
        )
        .await?;
    }
    let mut redis = standalone_redis(spec).await?;
    // Redis's CPU counters are not reset: the run's is the difference.
    let mut cpu_before = 0.0;
    if let Some(r) = redis.as_mut() {
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(r).await?;
        cpu_before = redis_time(r).await?.cpu;
    }
    let port = crate::process::free_port();
    let mut cmd = IdemCommand::new(&spec.idem_exe, &spec.brokers, topic, topic)
        .redis(&spec.redis_url, redis_mode(spec), prefix)
        .metrics_port(port)
        .env("RUST_LOG", "warn");
    if let Some(c) = setup.config {
        cmd = cmd.env("IDEM_CONFIG", &c.display().to_string());
    }
    for (k, v) in &setup.env {
        cmd = cmd.env(k, v);
    }
    let outbox = idem::store::KeyLayout::new(prefix).outbox_key(None);
    let mut child = cmd.spawn(&spec.out_dir.join(format!("idem-{prefix}.log")))?;
    let total = records.len() as u64;
    let (t0, first) = wait_outcomes(spec, name, &mut child, port, topic, total).await?;
    let rate = |t: Duration| (total - first).max(1) as f64 / t.as_secs_f64().max(1e-6);
    let mut row = EffectsRow {
        name: name.to_string(),
        records: records.len(),
        records_per_second: rate(t0.elapsed()),
        ..EffectsRow::default()
    };
    if let (Some(r), true) = (redis.as_mut(), setup.changelog) {
        measure_outbox(r, &outbox, setup.changelog_topic, &mut row, || {
            rate(t0.elapsed())
        })
        .await?;
    }
    stop(child);
    if let Some(r) = redis.as_mut() {
        let now = redis_time(r).await?;
        row.redis_us_per_record = now.scripts / total as f64;
        row.redis_cpu_us_per_record = (now.cpu - cpu_before) / total as f64;
        row.redis_bytes_per_entity =
            key_bytes(r, prefix, key_suffixes).await? as f64 / spec.entities.max(1) as f64;
    }
    progress(&format!(
        "  {:.0} records/s, {:.1} µs of Redis per record, {:.0} bytes per entity",
        row.records_per_second, row.redis_us_per_record, row.redis_bytes_per_entity
    ));
    Ok(row)
}

/// Waits until every record of `topic` has its outcome; returns when the
/// first was counted, and how many were by then.
async fn wait_outcomes(
    spec: &BenchSpec,
    name: &str,
    child: &mut std::process::Child,
    port: u16,
    topic: &str,
    total: u64,
) -> anyhow::Result<(Instant, u64)> {
    let mut started = None;
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "idem ({name}) exited with {status}; see {}",
                spec.out_dir.display()
            );
        }
        let done = scrape_total(port, topic).await.unwrap_or(0);
        if done > 0 && started.is_none() {
            started = Some((Instant::now(), done));
        }
        if done >= total {
            return started.ok_or_else(|| anyhow::anyhow!("no outcome counted"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With the changelog on (standalone Redis, one outbox): with the relay
/// publishing, waits until the outbox is drained and notes the rate so
/// far; with it held, the outbox's bytes per entry.
async fn measure_outbox(
    r: &mut redis::aio::MultiplexedConnection,
    outbox: &str,
    relay_publishes: bool,
    row: &mut EffectsRow,
    rate_now: impl Fn() -> f64,
) -> anyhow::Result<()> {
    if relay_publishes {
        while redis::cmd("XLEN").arg(outbox).query_async::<u64>(r).await? > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        row.to_changelog_records_per_second = Some(rate_now());
    } else {
        let entries: u64 = redis::cmd("XLEN").arg(outbox).query_async(r).await?;
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(outbox)
            .arg("SAMPLES")
            .arg(0)
            .query_async(r)
            .await?;
        row.outbox_bytes_per_entry = Some(bytes.unwrap_or(0) as f64 / entries.max(1) as f64);
    }
    Ok(())
}

fn redis_mode(spec: &BenchSpec) -> idem::config::RedisMode {
    if spec.redis_url.contains(',') {
        idem::config::RedisMode::Cluster
    } else {
        idem::config::RedisMode::Standalone
    }
}

pub(super) async fn produce_to(
    spec: &BenchSpec,
    topic: &str,
    records: &[SampleRecord],
) -> anyhow::Result<()> {
    topics::apply(
        &idem::config::KafkaConfig::for_brokers(&spec.brokers),
        &[TopicSpec::new(topic, spec.partitions)],
        true,
    )
    .await?;
    let p = producer(&spec.brokers, "20")?;
    for r in records {
        send(&p, topic, r.key.as_bytes(), &r.value);
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(120))?;
    Ok(())
}

/// `MEMORY USAGE` summed over the entities' keys ending in `suffixes`.
async fn key_bytes(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    suffixes: &[&str],
) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    for suffix in suffixes {
        for key in scan_keys(conn, &format!("{prefix}:{{*}}{suffix}")).await? {
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .query_async(conn)
                .await?;
            bytes += used.unwrap_or(0);
        }
    }
    Ok(bytes)
}
