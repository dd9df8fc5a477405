//! One run of idem on the benchmark's backlog: instances spawned with
//! their settings, timed from the first outcome until every record has
//! one, with their CPU and Redis's (used by the throughput phase and by
//! `--compare-idem`).

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use super::cpu::{self, cpu_seconds, Busy};
use super::io::{progress, redis_time, scrape, scrape_total, stop, RedisPerRecord};
use super::BenchSpec;
use crate::process::IdemCommand;

/// Waits until every record of the backlog has an outcome: when the first
/// one was counted (the clock starts there, so the group join is not
/// measured), the instances' CPU seconds then and the machine's reading.
async fn wait_for_outcomes(
    spec: &BenchSpec,
    idems: &mut [(Child, u16)],
    ports: &[u16],
    topic: &str,
    total: u64,
) -> anyhow::Result<(Instant, f64, cpu::Start)> {
    let (t0, cpu0, machine0) = loop {
        ensure_all_running(idems, &spec.out_dir)?;
        if scrape_total_all(ports, topic).await > 0 {
            break (Instant::now(), cpu_seconds_all(idems), cpu::start());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut last_report = Instant::now();
    loop {
        ensure_all_running(idems, &spec.out_dir)?;
        let done = scrape_total_all(ports, topic).await;
        if done >= total {
            return Ok((t0, cpu0, machine0));
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            progress(&format!("  {done}/{total} records have their outcome"));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The backlog every run consumes.
pub(super) struct Backlog {
    pub topic: String,
    pub records: u64,
}

/// One run on the backlog, its instances still running.
pub(super) struct Measured {
    pub records_per_second: f64,
    pub idem_cpu_seconds_per_million: f64,
    /// What Redis spent per record (CPU, the script, its commands); `None`
    /// on a cluster.
    pub redis: Option<RedisPerRecord>,
    /// Where the machine's cores went while the backlog was consumed.
    pub busy: Busy,
    /// Every instance's metrics at the end.
    pub metrics: String,
    pub idems: Vec<(Child, u16)>,
}

impl Measured {
    pub fn stop(self) {
        self.idems.into_iter().for_each(|(c, _)| stop(c));
    }
}

/// `spec.instances` of `exe` (with `env`) as group `name` under key prefix
/// `name`, timed from the first outcome until every record of the backlog
/// has one (so the group join is not measured).
pub(super) async fn run_on_backlog(
    spec: &BenchSpec,
    backlog: &Backlog,
    exe: &Path,
    env: &[(String, String)],
    name: &str,
    mut redis: Option<&mut redis::aio::MultiplexedConnection>,
) -> anyhow::Result<Measured> {
    let (topic, total) = (&backlog.topic, backlog.records);
    progress(&format!(
        "running {} idem instance(s) on the backlog",
        spec.instances
    ));
    // Before any instance runs, so the first batch's script time counts.
    let redis0 = match redis.as_deref_mut() {
        Some(r) => Some(redis_time(r).await?),
        None => None,
    };
    let mut idems: Vec<(Child, u16)> = Vec::new();
    for _ in 0..spec.instances.max(1) {
        let port = crate::process::free_port();
        match spawn_idem(spec, exe, env, topic, name, port) {
            Ok(child) => idems.push((child, port)),
            Err(e) => {
                idems.into_iter().for_each(|(c, _)| stop(c));
                return Err(e);
            }
        }
    }
    let ports: Vec<u16> = idems.iter().map(|(_, p)| *p).collect();
    let (t0, cpu0, machine0) = match wait_for_outcomes(spec, &mut idems, &ports, topic, total).await
    {
        Ok(started) => started,
        Err(e) => {
            // Another build's instances must not outlive a failed run.
            idems.into_iter().for_each(|(c, _)| stop(c));
            return Err(e);
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds_all(&idems) - cpu0;
    // Redis's CPU and script time over the run, µs.
    let redis_spent = match (redis, redis0) {
        (Some(r), Some(before)) => Some(redis_time(r).await? - before),
        _ => None,
    };
    let busy = machine0.busy(elapsed, cpu, redis_spent.map(|t| t.cpu / 1e6));
    let redis_per_record = redis_spent.map(|t| t.per_record(total));
    let mut metrics = String::new();
    for p in &ports {
        metrics.push_str(&scrape(*p).await.unwrap_or_default());
    }
    let measured = Measured {
        records_per_second: total as f64 / elapsed,
        idem_cpu_seconds_per_million: cpu / total as f64 * 1e6,
        redis: redis_per_record,
        busy,
        metrics,
        idems,
    };
    progress(&format!(
        "idem: {:.0} records/s, {:.2} CPU s per million, Redis {}; cores busy: {}",
        measured.records_per_second,
        measured.idem_cpu_seconds_per_million,
        redis_per_record.map_or("?".into(), |r| format!(
            "{:.2} µs CPU, script {:.2} µs = commands {:.2} µs ({:.2} per record) + outside {:.2} µs, per record",
            r.cpu_us, r.script_us, r.commands_us, r.commands, r.outside_us
        )),
        measured.busy.summary()
    ));
    Ok(measured)
}

fn spawn_idem(
    spec: &BenchSpec,
    exe: &Path,
    env: &[(String, String)],
    topic: &str,
    name: &str,
    port: u16,
) -> anyhow::Result<Child> {
    let redis_mode = if spec.redis_url.contains(',') {
        idem::config::RedisMode::Cluster
    } else {
        idem::config::RedisMode::Standalone
    };
    let mut cmd = IdemCommand::new(exe, &spec.brokers, topic, name)
        .redis(&spec.redis_url, redis_mode, name)
        .metrics_port(port)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    Ok(cmd.spawn(&spec.out_dir.join("idem.log"))?)
}

fn ensure_all_running(children: &mut [(Child, u16)], out_dir: &Path) -> anyhow::Result<()> {
    for (c, _) in children {
        ensure_running(c, out_dir)?;
    }
    Ok(())
}

async fn scrape_total_all(ports: &[u16], topic: &str) -> u64 {
    let mut sum = 0;
    for p in ports {
        sum += scrape_total(*p, topic).await.unwrap_or(0);
    }
    sum
}

fn cpu_seconds_all(children: &[(Child, u16)]) -> f64 {
    children.iter().map(|(c, _)| cpu_seconds(c.id())).sum()
}

pub(super) fn ensure_running(child: &mut Child, out_dir: &Path) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        anyhow::bail!(
            "idem exited with {status}; see {}",
            out_dir.join("idem.log").display()
        );
    }
    Ok(())
}
