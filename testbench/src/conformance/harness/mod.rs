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
use idem::config::{GroupProtocol, RedisConfig, RedisMode};
use idem::event::{decode, FieldMap};
use idem::model::{Model, Outcome};
use idem::store::{self, EntityView, KeyLayout};
use idem::tools::sample::SampleRecord;
use idem::tools::topics::{self, TopicSpec};

mod invariants;
mod kafka;
mod servers;

pub use invariants::*;
pub use kafka::*;
pub use servers::*;

/// Where the suite runs.
#[derive(Debug, Clone)]
pub struct Env {
    pub brokers: String,
    pub redis: RedisTarget,
    pub idem_exe: PathBuf,
    pub work_dir: PathBuf,
    /// The consumer group protocol every idem of the run speaks.
    pub group_protocol: GroupProtocol,
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

/// One `idem run` process: the one wrapper of the conformance suite and
/// of idem's integration tests (tests/common's `Idem` builds on it).
pub struct IdemProcess {
    child: Child,
    pub port: u16,
    /// Where its output goes.
    pub log: std::path::PathBuf,
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
            .env("IDEM__PIPELINE__BATCH_MAX_EVENTS", "500")
            .env("IDEM__KAFKA__GROUP_PROTOCOL", env.group_protocol.as_str());
        for (k, v) in extra {
            cmd = cmd.env(k, v);
        }
        Self::start(&cmd, &env.work_dir.join(format!("{group}.log")), port)
    }

    /// Starts `cmd` (which serves metrics on `port`), its output into `log`.
    pub fn start(cmd: &IdemCommand, log: &std::path::Path, port: u16) -> anyhow::Result<Self> {
        let child = cmd.spawn(log)?;
        Ok(IdemProcess {
            child,
            port,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The current /metrics text, if the endpoint answers.
    pub async fn metrics(&self) -> Option<String> {
        scrape(self.port).await
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and whether it then exited cleanly within 40 s (killed if not).
    pub async fn terminate(self) -> bool {
        self.terminate_status()
            .await
            .is_some_and(|status| status.success())
    }

    /// SIGTERM; its exit status, or `None` if it did not exit within 40 s
    /// (then it is killed).
    pub async fn terminate_status(mut self) -> Option<std::process::ExitStatus> {
        signal(self.child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        None
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
    /// How many partitions the process owns now (0 when it does not answer).
    pub async fn owned_partitions(&self) -> u64 {
        let Some(text) = scrape(self.port).await else {
            return 0;
        };
        crate::exposition::sum(&text, idem::metrics::ASSIGNED_PARTITIONS, &[]) as u64
    }

    pub async fn outcome(&self, outcome: Option<Outcome>) -> u64 {
        let Some(text) = scrape(self.port).await else {
            return 0;
        };
        let labels: Vec<(&str, &str)> = outcome.iter().map(|o| ("outcome", o.as_str())).collect();
        crate::exposition::sum(&text, idem::metrics::EVENTS_TOTAL, &labels) as u64
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
