//! The latency phase: fixed-rate loads at 25%, 50% and 75% of the measured
//! maximum (or one load at `--latency-rate`) while one idem keeps running.
//! Each level's end-to-end latency quantiles come from the difference of
//! idem's latency histogram over that level, with the cores each party used
//! beside them: the load generator (this process) shares the machine with
//! idem, Redis and the broker, so its CPU is part of what a quantile means.

use std::process::Child;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, Producer};
use serde::Serialize;

use super::backlog::ensure_running;
use super::cpu::{self, cpu_seconds, Busy};
use super::io::{redis_time, scrape, scrape_total, send};
use super::report::quantile_upper_bound;
use super::BenchSpec;
use crate::exposition;
use idem::metrics::EVENT_LATENCY_SECONDS;
use idem::tools::sample::{generate, SampleRecord, SampleSpec};

/// The shares of the measured maximum the levels run at, when no rate is given.
pub const SHARES_OF_MAXIMUM: [f64; 3] = [0.25, 0.5, 0.75];

/// One fixed-rate load and what it measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencyLevel {
    /// The share of the measured maximum (None: `--latency-rate` set the rate).
    pub share_of_maximum: Option<f64>,
    pub rate_per_second: f64,
    pub records: u64,
    /// Upper bounds of the histogram buckets holding the quantile, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// The load generator (this process: its producer included) over the
    /// span from the first record sent until idem decided the last.
    pub generator_cores_busy: f64,
    /// idem, Redis, the broker and the machine over the same span.
    pub busy: Busy,
    /// The level's histogram: (upper bound s, cumulative count).
    pub histogram: Vec<(f64, u64)>,
}

/// The rates to run: each share of `maximum`, or the one rate asked for.
///
/// | maximum | asked  | levels                                   |
/// |---------|--------|------------------------------------------|
/// | 40,000  | —      | 10,000 (25%), 20,000 (50%), 30,000 (75%) |
/// | 40,000  | 5,000  | 5,000                                    |
/// | 100     | —      | 100, 100, 100 (never below 100/s)        |
pub fn rates(maximum: f64, asked: Option<f64>) -> Vec<(Option<f64>, f64)> {
    match asked {
        Some(rate) => vec![(None, rate)],
        None => SHARES_OF_MAXIMUM
            .iter()
            .map(|&share| (Some(share), (maximum * share).max(100.0)))
            .collect(),
    }
}

/// Where the loads go.
pub(super) struct Target<'a> {
    pub topic: &'a str,
    /// Key prefix of the generated events (each level adds its own suffix).
    pub prefix: &'a str,
}

/// Runs every level in turn on the running `idem`, then stops it (also
/// when a level fails): the levels and idem's peak resident memory.
pub(super) async fn measure(
    spec: &BenchSpec,
    target: Target<'_>,
    (mut idem, metrics_port): (Child, u16),
    producer: FutureProducer,
    mut redis: Option<&mut redis::aio::MultiplexedConnection>,
    maximum: f64,
) -> anyhow::Result<(Vec<LatencyLevel>, u64)> {
    let levels = async {
        let mut levels = Vec::new();
        for (index, (share, rate)) in rates(maximum, spec.latency_rate).into_iter().enumerate() {
            let load = Load {
                share,
                rate,
                index,
                metrics_port,
            };
            let level = run_level(
                spec,
                &target,
                &load,
                &mut idem,
                &producer,
                redis.as_deref_mut(),
            );
            levels.push(level.await?);
        }
        anyhow::Ok(levels)
    }
    .await;
    let peak_rss = crate::process::peak_rss_bytes(idem.id());
    super::io::stop(idem);
    Ok((levels?, peak_rss))
}

/// One level's rate and where to read idem's metrics.
struct Load {
    share: Option<f64>,
    rate: f64,
    index: usize,
    metrics_port: u16,
}

/// Sends one level's records at its rate and waits until idem decided
/// them all (counted from idem's own total before the level, so whatever
/// it decided before is not waited for twice).
async fn run_level(
    spec: &BenchSpec,
    target: &Target<'_>,
    load: &Load,
    idem: &mut Child,
    producer: &FutureProducer,
    mut redis: Option<&mut redis::aio::MultiplexedConnection>,
) -> anyhow::Result<LatencyLevel> {
    let (rate, port) = (load.rate, load.metrics_port);
    super::io::progress(&format!(
        "latency: {rate:.0} records/s for {}s",
        spec.latency_seconds
    ));
    let live = generate(&SampleSpec {
        events: (rate * spec.latency_seconds as f64) as usize,
        entities: spec.entities,
        duplicate_ratio: spec.duplicate_ratio,
        out_of_order_ratio: spec.out_of_order_ratio,
        delete_ratio: 0.0,
        data_bytes: spec.data_bytes,
        seed: spec.seed + 1 + load.index as u64,
        prefix: format!("{}-live{}", target.prefix, load.index),
        zipf: spec.zipf,
    });
    let before = buckets(&scrape(port).await.unwrap_or_default());
    let want = scrape_total(port, target.topic).await.unwrap_or(0) + live.len() as u64;
    let redis0 = match redis.as_deref_mut() {
        Some(r) => Some(redis_time(r).await?.cpu),
        None => None,
    };
    let (t0, machine0) = (Instant::now(), cpu::start());
    let (generator0, idem0) = (cpu_seconds(std::process::id()), cpu_seconds(idem.id()));
    send_at_rate(producer, target.topic, &live, rate).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while scrape_total(port, target.topic).await.unwrap_or(0) < want {
        ensure_running(idem, &spec.out_dir)?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "idem did not finish the latency load at {rate:.0} records/s in 120s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every end reading first, then Redis's (a round trip).
    let seconds = t0.elapsed().as_secs_f64();
    let idem_cpu = cpu_seconds(idem.id()) - idem0;
    let generator = (cpu_seconds(std::process::id()) - generator0) / seconds.max(1e-9);
    let redis_cpu = match (redis, redis0) {
        // `redis_time` counts µs.
        (Some(r), Some(cpu0)) => Some((redis_time(r).await?.cpu - cpu0) / 1e6),
        _ => None,
    };
    let busy = machine0.busy(seconds, idem_cpu, redis_cpu);
    let after = buckets(&scrape(port).await.unwrap_or_default());
    let level = level_of(load.share, rate, &before, &after, generator, busy);
    super::io::progress(&format!(
        "  p50 ≤ {:.0} ms, p99 ≤ {:.0} ms, p99.9 ≤ {:.0} ms; load generator {:.2} cores; {}",
        level.p50_ms,
        level.p99_ms,
        level.p999_ms,
        level.generator_cores_busy,
        level.busy.summary()
    ));
    Ok(level)
}

/// A level's figures from the histograms before and after it.
fn level_of(
    share: Option<f64>,
    rate: f64,
    before: &[(f64, f64)],
    after: &[(f64, f64)],
    generator_cores_busy: f64,
    busy: Busy,
) -> LatencyLevel {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&(0.0, 0.0))))
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    LatencyLevel {
        share_of_maximum: share,
        rate_per_second: rate,
        records: diff.last().map_or(0, |(_, n)| *n as u64),
        p50_ms: quantile_upper_bound(&diff, 0.5) * 1000.0,
        p99_ms: quantile_upper_bound(&diff, 0.99) * 1000.0,
        p999_ms: quantile_upper_bound(&diff, 0.999) * 1000.0,
        generator_cores_busy,
        busy,
        histogram: diff.iter().map(|(le, n)| (*le, *n as u64)).collect(),
    }
}

/// Produces `records` at `rate` per second, in 5 ms ticks.
async fn send_at_rate(
    producer: &FutureProducer,
    topic: &str,
    records: &[SampleRecord],
    rate: f64,
) -> anyhow::Result<()> {
    let tick = Duration::from_millis(5);
    let per_tick = rate * tick.as_secs_f64();
    let start = Instant::now();
    let mut sent = 0usize;
    let mut interval = tokio::time::interval(tick);
    while sent < records.len() {
        interval.tick().await;
        let due = ((start.elapsed().as_secs_f64() / tick.as_secs_f64()) * per_tick) as usize;
        while sent < due.min(records.len()) {
            let r = &records[sent];
            send(producer, topic, r.key.as_bytes(), &r.value);
            sent += 1;
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// (le, cumulative count) pairs of the latency histogram.
fn buckets(text: &str) -> Vec<(f64, f64)> {
    exposition::buckets(text, EVENT_LATENCY_SECONDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_by_table() {
        assert_eq!(
            rates(40_000.0, None),
            vec![
                (Some(0.25), 10_000.0),
                (Some(0.5), 20_000.0),
                (Some(0.75), 30_000.0)
            ]
        );
        assert_eq!(rates(40_000.0, Some(5_000.0)), vec![(None, 5_000.0)]);
        assert!(rates(100.0, None).iter().all(|&(_, r)| r == 100.0));
    }

    #[test]
    fn a_level_counts_only_what_it_added_to_the_histogram() {
        let before = [(0.01, 100.0), (0.1, 200.0), (f64::INFINITY, 200.0)];
        let after = [(0.01, 1080.0), (0.1, 1200.0), (f64::INFINITY, 1200.0)];
        let level = level_of(Some(0.5), 20.0, &before, &after, 0.3, Busy::default());
        assert_eq!(level.records, 1000);
        assert_eq!(level.p50_ms, 10.0);
        assert_eq!(level.p99_ms, 100.0);
        assert_eq!(level.histogram[0], (0.01, 980));
        assert_eq!(level.generator_cores_busy, 0.3);
    }
}
