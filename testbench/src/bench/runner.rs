//! Runs the benchmark's phases and writes the report.

use std::process::Child;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, Producer};

use super::backlog::{run_on_backlog, Backlog};
use super::io::{cleanup, producer, progress, scan_keys, send, standalone_redis, stop};
use super::report::BenchReport;
use super::BenchSpec;
use super::{baselines, latency};
use crate::exposition;
use crate::process::peak_rss_bytes;
use idem::metrics::EVENTS_TOTAL;
use idem::model::Outcome;
use idem::tools::sample::{generate, SampleSpec};
use idem::tools::topics::{self, TopicSpec};

/// One run's names: its topic and key prefix.
struct Names {
    topic: String,
    prefix: String,
}

/// Runs every phase and writes `bench.json` and `bench.md` into `spec.out_dir`.
pub async fn run(spec: &BenchSpec, command: String) -> anyhow::Result<BenchReport> {
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let names = Names {
        topic: format!("bench-{run_id}-{}", std::process::id()),
        prefix: format!("bench-{run_id}-{}", std::process::id()),
    };
    std::fs::create_dir_all(&spec.out_dir)?;
    let mut report = BenchReport {
        machine: machine_description(),
        command,
        events: spec.events,
        entities: spec.entities,
        zipf: spec.zipf,
        partitions: spec.partitions,
        ..BenchReport::default()
    };
    let records = produce_backlog(spec, &names, &mut report).await?;
    if !spec.compare.is_empty() {
        let backlog = Backlog {
            topic: names.topic.clone(),
            records: records.len() as u64,
        };
        report.comparison = super::compare::run(spec, &backlog).await?;
        std::fs::write(spec.out_dir.join("bench.md"), report.to_markdown())?;
        return write_json(spec, report);
    }

    // Made now so that its start-up is not counted as latency.
    let live_producer = live_producer(spec, &names.topic)?;
    let mut redis = standalone_redis(spec).await?;
    let used_before = match redis.as_mut() {
        Some(r) => used_memory(r).await?,
        None => 0,
    };

    let mut idems = measure_throughput(
        spec,
        &names,
        records.len() as u64,
        redis.as_mut(),
        &mut report,
    )
    .await?;
    if let Some(r) = redis.as_mut() {
        measure_memory(r, used_before, &names.prefix, &mut report).await?;
    }
    if spec.throughput_only {
        return finish_throughput_only(spec, report, idems);
    }
    let (idem, metrics_port) = idems.remove(0);
    idems.into_iter().for_each(|(c, _)| stop(c));
    let target = latency::Target {
        topic: &names.topic,
        prefix: &names.prefix,
    };
    let (levels, peak_rss) = latency::measure(
        spec,
        target,
        (idem, metrics_port),
        live_producer,
        redis.as_mut(),
        report.idem_records_per_second,
    )
    .await?;
    report.set_latency(levels);
    report.idem_peak_rss_bytes = peak_rss;
    run_baselines(spec, &names, &records, &mut report).await?;
    report.effects = super::effects::measure(spec, &names.prefix).await?;
    report.changelog = super::changelog::measure(spec, &names.prefix).await?;

    report.ratio_vs_naive = report.idem_records_per_second / report.naive_records_per_second;
    report.ratio_vs_ceiling = report.idem_records_per_second / report.ceiling_records_per_second;
    if let Some(r) = redis.as_mut() {
        cleanup(r, &names.prefix).await;
    }
    std::fs::write(spec.out_dir.join("bench.md"), report.to_markdown())?;
    write_json(spec, report)
}

/// `--throughput-only`: the backlog phase's peak memory, then the reports.
fn finish_throughput_only(
    spec: &BenchSpec,
    mut report: BenchReport,
    idems: Vec<(Child, u16)>,
) -> anyhow::Result<BenchReport> {
    report.idem_peak_rss_bytes = idems
        .iter()
        .map(|(c, _)| peak_rss_bytes(c.id()))
        .max()
        .unwrap_or(0);
    idems.into_iter().for_each(|(c, _)| stop(c));
    report.throughput_only = true;
    std::fs::write(spec.out_dir.join("bench.md"), report.to_markdown())?;
    write_json(spec, report)
}

/// The latency phase's producer, connected and with the topic's metadata.
fn live_producer(spec: &BenchSpec, topic: &str) -> anyhow::Result<FutureProducer> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &spec.brokers)
        .set("linger.ms", "1")
        .set("acks", "all")
        .create()?;
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(producer)
}

/// Writes `bench.json` (the phases that ran) and returns the report.
fn write_json(spec: &BenchSpec, report: BenchReport) -> anyhow::Result<BenchReport> {
    std::fs::write(
        spec.out_dir.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

/// Generates the seeded stream, creates the topic and produces the backlog.
async fn produce_backlog(
    spec: &BenchSpec,
    names: &Names,
    report: &mut BenchReport,
) -> anyhow::Result<Vec<idem::tools::sample::SampleRecord>> {
    let topic = &names.topic;
    progress(&format!(
        "generating {} events over {} entities",
        spec.events, spec.entities
    ));
    let records = generate(&SampleSpec {
        events: spec.events,
        entities: spec.entities,
        duplicate_ratio: spec.duplicate_ratio,
        out_of_order_ratio: spec.out_of_order_ratio,
        delete_ratio: 0.0,
        data_bytes: spec.data_bytes,
        seed: spec.seed,
        prefix: names.prefix.clone(),
        zipf: spec.zipf,
    });
    report.records = records.len();
    topics::apply(
        &idem::config::KafkaConfig::for_brokers(&spec.brokers),
        &[TopicSpec::new(topic, spec.partitions)],
        true,
    )
    .await?;
    progress(&format!("producing {} records to {topic}", records.len()));
    let backlog_producer = producer(&spec.brokers, "20")?;
    let started = Instant::now();
    for (i, r) in records.iter().enumerate() {
        send(&backlog_producer, topic, r.key.as_bytes(), &r.value);
        if (i + 1) % 200_000 == 0 {
            progress(&format!("  produced {}/{}", i + 1, records.len()));
        }
    }
    backlog_producer.flush(Duration::from_secs(120))?;
    report.produce_records_per_second = records.len() as f64 / started.elapsed().as_secs_f64();
    report.hottest_partition_share = hottest_partition_share(&backlog_producer, topic, spec)?;
    Ok(records)
}

/// The fullest partition's records ÷ the mean: with key = entity, a hot
/// entity makes a hot partition, and one partition is one consumer's.
fn hottest_partition_share(
    producer: &FutureProducer,
    topic: &str,
    spec: &BenchSpec,
) -> anyhow::Result<f64> {
    let mut sizes = Vec::new();
    for partition in 0..spec.partitions {
        let (low, high) =
            producer
                .client()
                .fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        sizes.push((high - low) as f64);
    }
    let mean = sizes.iter().sum::<f64>() / sizes.len().max(1) as f64;
    Ok(sizes.iter().copied().fold(0.0, f64::max) / mean.max(1.0))
}

/// Runs `spec.instances` idem on the backlog (this build, no extra settings)
/// and fills the report's throughput, CPU and outcomes.
async fn measure_throughput(
    spec: &BenchSpec,
    names: &Names,
    total: u64,
    redis: Option<&mut redis::aio::MultiplexedConnection>,
    report: &mut BenchReport,
) -> anyhow::Result<Vec<(Child, u16)>> {
    let backlog = Backlog {
        topic: names.topic.clone(),
        records: total,
    };
    let measured =
        run_on_backlog(spec, &backlog, &spec.idem_exe, &[], &names.prefix, redis).await?;
    report.idem_records_per_second = measured.records_per_second;
    report.idem_cpu_seconds_per_million = measured.idem_cpu_seconds_per_million;
    report.redis = measured.redis;
    report.busy = measured.busy.clone();
    for o in Outcome::ALL {
        let n = exposition::sum(
            &measured.metrics,
            EVENTS_TOTAL,
            &[("topic", names.topic.as_str()), ("outcome", o.as_str())],
        );
        report.outcomes.push((o.as_str().to_string(), n as u64));
    }
    let outcome = |name: &str| {
        report
            .outcomes
            .iter()
            .find(|(o, _)| o == name)
            .map_or(0, |(_, n)| *n)
    };
    report.remembered_ids = outcome("applied") + outcome("stale");
    Ok(measured.idems)
}

/// Redis bytes per remembered id: in all and in the dedupe hashes alone.
async fn measure_memory(
    redis: &mut redis::aio::MultiplexedConnection,
    used_before: u64,
    prefix: &str,
    report: &mut BenchReport,
) -> anyhow::Result<()> {
    let used_after = used_memory(redis).await?;
    let ids = report.remembered_ids.max(1) as f64;
    report.redis_bytes_per_id_total = used_after.saturating_sub(used_before) as f64 / ids;
    report.redis_bytes_per_id_dedupe = id_hash_bytes(redis, prefix).await? as f64 / ids;
    Ok(())
}

/// The two baselines of the same run: (a) a naive consumer, (b) one
/// script call per event without Kafka.
async fn run_baselines(
    spec: &BenchSpec,
    names: &Names,
    records: &[idem::tools::sample::SampleRecord],
    report: &mut BenchReport,
) -> anyhow::Result<()> {
    progress(&format!(
        "baseline (a): naive consumer on {} records",
        spec.naive_records
    ));
    report.naive_records = spec.naive_records.min(records.len());
    report.naive_records_per_second = baselines::naive_consumer(
        &spec.brokers,
        &spec.redis_url,
        &names.topic,
        report.naive_records,
    )
    .await?;
    progress(&format!(
        "  {:.0} records/s",
        report.naive_records_per_second
    ));
    report.ceiling_records = spec.ceiling_records.min(records.len());
    progress(&format!(
        "baseline (b): one script call per event on {} records",
        report.ceiling_records
    ));
    let values: Vec<Vec<u8>> = records[..report.ceiling_records]
        .iter()
        .map(|r| r.value.clone())
        .collect();
    report.ceiling_records_per_second = baselines::per_event_script_ceiling(
        &spec.redis_url,
        &format!("{}-ceiling", names.prefix),
        &values,
    )
    .await?;
    progress(&format!(
        "  {:.0} records/s",
        report.ceiling_records_per_second
    ));
    progress(&format!(
        "baseline (c): the guard alone on {} records",
        report.ceiling_records
    ));
    report.guard_alone = baselines::guard_alone(
        &spec.redis_url,
        &format!("{}-guard", names.prefix),
        &values,
        spec.partitions,
    )
    .await?;
    progress(&format!(
        "  {:.0} records/s, Redis {:.2} µs per record",
        report.guard_alone.records_per_second, report.guard_alone.redis.cpu_us
    ));
    Ok(())
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("INFO memory has no used_memory"))
}

/// Sum of `MEMORY USAGE` over the id hashes under `prefix`.
async fn id_hash_bytes(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<u64> {
    let keys = scan_keys(conn, &format!("{prefix}:{{*}}:ids:*")).await?;
    let mut total = 0u64;
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(conn).await?;
        total += sizes.into_iter().flatten().sum::<u64>();
    }
    Ok(total)
}

fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB")
}
