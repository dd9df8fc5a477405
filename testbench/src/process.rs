//! Processes the bench drives: one way to start `idem run` against local
//! services, free ports, signals and memory readings.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use idem::config::RedisMode;

/// A free TCP port on loopback (the OS picks one; it is free when returned).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Sends `sig` (e.g. `-STOP`) to `pid`; whether `kill` succeeded.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Resident memory of `pid` now, from /proc (0 if it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// Peak resident memory of `pid` (VmHWM), from /proc (0 if it is gone).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM")
}

/// A size field (in kB) of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The `idem` binary of the same build as `exe` (`target/<profile>/idem`).
pub fn idem_beside(exe: &Path) -> anyhow::Result<PathBuf> {
    let idem = exe.with_file_name("idem");
    anyhow::ensure!(
        idem.exists(),
        "no idem binary at {}: build it (`cargo build --workspace`) or pass --idem PATH",
        idem.display()
    );
    Ok(idem)
}

/// How to start one `idem run`: the settings every harness shares (fast
/// commits and retries, so faults heal quickly in tests), then its own.
#[derive(Debug, Clone)]
pub struct IdemCommand {
    exe: PathBuf,
    env: Vec<(String, String)>,
    clear_env: bool,
    /// `run`, or another command (`relay`, `replay`).
    subcommand: &'static str,
    /// Arguments after the subcommand.
    args: Vec<String>,
}

impl IdemCommand {
    pub fn new(exe: &Path, brokers: &str, topics: &str, group: &str) -> IdemCommand {
        IdemCommand {
            exe: exe.to_path_buf(),
            env: Vec::new(),
            clear_env: false,
            subcommand: "run",
            args: Vec::new(),
        }
        .env("IDEM__KAFKA__BROKERS", brokers)
        .env("IDEM__KAFKA__TOPICS", topics)
        .env("IDEM__KAFKA__GROUP_ID", group)
        .env("RUST_LOG", "info,librdkafka=warn")
    }

    /// Commits every 200 ms, a 6 s session, 1 s Redis timeouts and backoff
    /// capped at 500 ms: what the tests and the conformance suite run with.
    pub fn fast_recovery(self) -> IdemCommand {
        self.env("IDEM__KAFKA__COMMIT_INTERVAL", "200ms")
            .env("IDEM__KAFKA__SESSION_TIMEOUT", "6s")
            .env("IDEM__REDIS__RESPONSE_TIMEOUT", "1s")
            .env("IDEM__REDIS__CONNECT_TIMEOUT", "500ms")
            .env("IDEM__PIPELINE__RETRY_MAX_BACKOFF", "500ms")
    }

    /// The Redis (one URL, or a cluster's comma-separated seeds) and the key prefix.
    pub fn redis(self, url: &str, mode: RedisMode, prefix: &str) -> IdemCommand {
        let mode = match mode {
            RedisMode::Cluster => "cluster",
            RedisMode::Standalone => "standalone",
        };
        self.env("IDEM__REDIS__URL", url)
            .env("IDEM__REDIS__MODE", mode)
            .env("IDEM__REDIS__KEY_PREFIX", prefix)
    }

    pub fn metrics_port(self, port: u16) -> IdemCommand {
        self.env("IDEM__METRICS__LISTEN", &format!("127.0.0.1:{port}"))
    }

    /// Sets a variable (a later one wins over an earlier one).
    pub fn env(mut self, key: &str, value: &str) -> IdemCommand {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts from an empty environment (PATH kept): no `IDEM__` variable of
    /// the caller leaks in.
    pub fn clean_env(mut self) -> IdemCommand {
        self.clear_env = true;
        self
    }

    /// Runs `idem <subcommand>` instead of `idem run` (e.g. `relay`).
    pub fn subcommand(mut self, subcommand: &'static str) -> IdemCommand {
        self.subcommand = subcommand;
        self
    }

    /// Arguments after the subcommand.
    pub fn args(mut self, args: &[&str]) -> IdemCommand {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg(self.subcommand).args(&self.args);
        if self.clear_env {
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default());
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `idem run`, its log (stderr) appended to `log`.
    pub fn spawn(&self, log: &Path) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        self.command().stdout(Stdio::null()).stderr(log).spawn()
    }

    /// Runs the command to its end (a tool: `replay`, `reconcile`):
    /// its exit status, stdout and stderr. Blocking.
    pub fn output(&self) -> std::io::Result<std::process::Output> {
        self.command().output()
    }
}
