//! Redis servers of the suite's own, which a scenario may kill: one
//! redis-server, or a six-node cluster.

use super::*;

/// A redis-server of the suite's own, which it may kill and restart.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    fsync: &'static str,
    password: Option<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// `fsync` is the AOF policy: "always" or "everysec"; "none" runs
    /// without AOF (and without automatic RDB saves): a kill loses everything
    /// but what an explicit BGSAVE wrote.
    pub async fn start(work_dir: &Path, fsync: &'static str) -> anyhow::Result<Self> {
        Self::start_with(work_dir, fsync, None).await
    }

    /// Like `start`, requiring `password` (AUTH) when given.
    pub async fn start_with(
        work_dir: &Path,
        fsync: &'static str,
        password: Option<&str>,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let dir = work_dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut r = PrivateRedis {
            port,
            dir,
            fsync,
            password: password.map(str::to_string),
            child: None,
        };
        r.restart().await?;
        Ok(r)
    }

    /// This server as the suite's target.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::new(&self.url(), RedisMode::Standalone)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (its `dump.rdb`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(match self.fsync {
                "none" => vec!["--appendonly", "no"],
                fsync => vec!["--appendonly", "yes", "--appendfsync", fsync],
            })
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot start redis-server (needed by this scenario): {e}")
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        loop {
            if let Ok(client) = redis::Client::open(url.as_str()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        return Ok(());
                    }
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "private redis did not answer PING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server stalls and clients time out.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-STOP");
        }
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-CONT");
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A six-node Redis Cluster of the suite's own (three masters, each with one
/// replica) on free ports, so that a scenario or a test may kill a master.
pub struct PrivateCluster {
    dir: PathBuf,
    pub nodes: Vec<(u16, Child)>,
}

impl PrivateCluster {
    /// Starts the nodes in a folder of `work_dir` and creates the cluster.
    pub fn start(work_dir: &Path) -> anyhow::Result<PrivateCluster> {
        let dir = work_dir.join(format!("cluster-{}", free_port()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = PrivateCluster {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..6 {
            let port = cluster_node_port(&cluster.nodes);
            let child = cluster.spawn_node(port)?;
            cluster.nodes.push((port, child));
        }
        for (port, _) in &cluster.nodes {
            wait_for_node(*port)?;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| anyhow::anyhow!("redis-cli (make services installs redis-tools): {e}"))?;
        anyhow::ensure!(status.success(), "redis-cli --cluster create failed");
        Ok(cluster)
    }

    /// Waits until `healthy`, at most `bound`.
    pub async fn wait_healthy(&self, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        while !self.healthy() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the private cluster did not become healthy within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// One node; its cluster state lives in `dir`, so a restarted node rejoins.
    fn spawn_node(&self, port: u16) -> anyhow::Result<Child> {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("redis-server (make services installs it): {e}"))
    }

    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// This cluster as the suite's target.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::new(&self.url(), RedisMode::Cluster)
    }

    /// `redis-cli role`: "master", or "slave" and the master's port.
    pub fn role(port: u16) -> (String, Option<u16>) {
        let text = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "role"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let mut lines = text.lines();
        let role = lines.next().unwrap_or("").to_string();
        let master_port = lines.nth(1).and_then(|p| p.trim().parse().ok());
        (role, master_port)
    }

    /// Whether every slot is served and every master has a connected replica.
    pub fn healthy(&self) -> bool {
        let (first, _) = self.nodes[0];
        let info = Command::new("redis-cli")
            .args(["-p", &first.to_string(), "cluster", "info"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        info.contains("cluster_state:ok")
            && self
                .nodes
                .iter()
                .filter(|(p, _)| Self::role(*p).0 == "master")
                .all(|(p, _)| {
                    let repl = Command::new("redis-cli")
                        .args(["-p", &p.to_string(), "info", "replication"])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                        .unwrap_or_default();
                    repl.contains("connected_slaves:1") && repl.contains("state=online")
                })
    }

    /// Sends `sig` (e.g. "-STOP") to the node on `port`.
    pub fn signal(&self, port: u16, sig: &str) {
        if let Some((_, child)) = self.nodes.iter().find(|(p, _)| *p == port) {
            signal(child.id(), sig);
        }
    }

    /// SIGKILLs the node on `port`; `restart` starts it again on its state.
    pub fn kill(&mut self, port: u16) {
        if let Some((_, child)) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let child = self.spawn_node(port)?;
        wait_for_node(port)?;
        if let Some(node) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            node.1 = child;
        }
        Ok(())
    }

    /// The port of a master and of its replica.
    pub fn master_and_replica(&self) -> Option<(u16, u16)> {
        let ports: Vec<u16> = self.nodes.iter().map(|(p, _)| *p).collect();
        let master = *ports.iter().find(|p| Self::role(**p).0 == "master")?;
        let replica = *ports
            .iter()
            .find(|p| Self::role(**p) == ("slave".to_string(), Some(master)))?;
        Some((master, replica))
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port for a cluster node: at most 55535 (Redis refuses higher
/// ones in cluster mode), with its bus port (+10000) free too, and not
/// already given to another node.
pub(super) fn cluster_node_port(taken: &[(u16, Child)]) -> u16 {
    loop {
        let port = free_port();
        if port <= 55535
            && !taken
                .iter()
                .any(|(p, _)| *p == port || *p + 10000 == port || port + 10000 == *p)
            && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
}

pub(super) fn wait_for_node(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
            .unwrap_or(false);
        if pong {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "redis-server on {port} did not answer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
