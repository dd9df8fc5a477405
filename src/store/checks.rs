//! Start-up checks of the Redis idem writes to: will it keep idem's keys
//! (no eviction), and how must a batch wait to count as durable?
//!
//! Guarantee: idem does not start on a Redis that may evict its keys or that
//! cannot give the configured durability; the error names the node and what
//! to change.

use super::{RedisConn, StoreError};
use crate::config::Durability;

/// What a batch waits for after its scripts ran, before it counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableWait {
    /// Nothing: the script's reply is enough (`ack`, or `fsync` with appendfsync always).
    None,
    /// `WAIT n timeout`: n replicas acknowledged.
    Replicas(u32),
    /// `WAITAOF 1 0 timeout`: fsynced to the local AOF (Redis ≥ 7.2).
    LocalAof,
}

/// Why a start-up check refused the Redis (or could not run).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot list the cluster's masters: {0}")]
    Masters(#[source] StoreError),
    #[error("{node}: INFO {section} failed: {source}")]
    Info {
        node: String,
        section: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("{node} has maxmemory-policy {policy}: it may evict idem's keys (volatile-* evicts exactly the remembered ids, so redeliveries would be applied twice; allkeys-* also evicts entity state). Set `CONFIG SET maxmemory-policy noeviction` (and in redis.conf), or set redis.allow_eviction = true to accept the loss")]
    EvictionPolicy { node: String, policy: String },
    #[error("{node} answers with cluster_enabled:1 while redis.mode = \"standalone\": this is a Redis Cluster node: set redis.mode = \"cluster\" and list the cluster's nodes in redis.url, comma-separated (IDEM__REDIS__MODE=cluster)")]
    ClusterNode { node: String },
    #[error("{node} runs Redis {version}; idem needs Redis 7.0 or newer (its guard script declares its flags with `#!lua`, so an out-of-memory server refuses a whole call). Upgrade Redis")]
    TooOld { node: String, version: String },
    #[error("redis.durability = replicas:{wanted}, but {node} has {connected} connected replica(s); add replicas or lower N")]
    TooFewReplicas {
        node: String,
        wanted: u32,
        connected: u32,
    },
    #[error("redis.durability = fsync needs the write on disk before the commit: {node} (Redis {version}) has appendonly {} and appendfsync {appendfsync}. Set `appendonly yes` and `appendfsync always`, or use Redis >= 7.2 with appendonly yes (idem then waits with WAITAOF), or choose durability = \"ack\"", if *.aof_on { "yes" } else { "no" })]
    NoFsync {
        node: String,
        version: String,
        aof_on: bool,
        appendfsync: String,
    },
}

impl CheckError {
    /// A Redis that did not answer (a timeout, a dropped connection): the
    /// check is tried again, it said nothing about Redis's fitness.
    pub fn is_retryable(&self) -> bool {
        match self {
            CheckError::Masters(e) | CheckError::Info { source: e, .. } => e.is_retryable(),
            _ => false,
        }
    }
}

/// How a node is named in logs and errors.
fn node_name(node: &Option<(String, u16)>) -> String {
    node.as_ref()
        .map_or("redis".to_string(), |(h, p)| format!("master {h}:{p}"))
}

/// Refuses a Redis (any master of a cluster) whose `maxmemory-policy` may
/// evict idem's keys: `allkeys-*` evicts entity state and `volatile-*`
/// evicts exactly the remembered ids (they carry TTLs), so redeliveries
/// would be applied again. Only `noeviction` is safe; with `allow_eviction`
/// the refusal becomes a warning. A server that does not answer CONFIG GET
/// (a managed Redis may rename it) gets a warning, not a refusal.
pub async fn check_eviction_policy(
    conn: &mut RedisConn,
    allow_eviction: bool,
) -> Result<Vec<String>, CheckError> {
    let masters = conn.masters().await.map_err(CheckError::Masters)?;
    let mut policies = Vec::new();
    for node in &masters {
        let name = node_name(node);
        let policy = config_get(conn, node, "maxmemory-policy").await;
        policies.push(policy.as_deref().unwrap_or("unreadable").to_string());
        match policy {
            Ok(p) if p == "noeviction" => {}
            Ok(p) if allow_eviction => tracing::warn!(
                node = %name,
                policy = %p,
                "Redis may evict idem's keys (maxmemory-policy is not noeviction); redis.allow_eviction = true accepts that evicted ids and state are lost"
            ),
            Ok(policy) => return Err(CheckError::EvictionPolicy { node: name, policy }),
            Err(e) => tracing::warn!(
                node = %name,
                error = %e,
                "could not read maxmemory-policy (CONFIG GET refused?); make sure it is noeviction"
            ),
        }
    }
    policies.sort();
    policies.dedup();
    Ok(policies)
}

/// Refuses a Redis Cluster node reached as a standalone server: every
/// command on a key of another node's slots would answer `MOVED`, retried
/// for ever.
pub async fn check_mode(conn: &mut RedisConn) -> Result<(), CheckError> {
    if conn.is_cluster() {
        return Ok(());
    }
    let cluster = info(conn, &None, "cluster").await?;
    match info_field(&cluster, "cluster_enabled").as_deref() {
        Some("1") => Err(CheckError::ClusterNode {
            node: node_name(&None),
        }),
        _ => Ok(()),
    }
}

/// Refuses a server (any master of a cluster) older than Redis 7.0. A
/// server that hides its version (a managed proxy) is let through.
pub async fn check_version(conn: &mut RedisConn) -> Result<(), CheckError> {
    let masters = conn.masters().await.map_err(CheckError::Masters)?;
    for node in &masters {
        let server = info(conn, node, "server").await?;
        let version = info_field(&server, "redis_version").unwrap_or_default();
        if !version_at_least_7(&version) {
            return Err(CheckError::TooOld {
                node: node_name(node),
                version,
            });
        }
    }
    Ok(())
}

/// | version  | ok    |
/// |----------|-------|
/// | 7.0.15   | yes   |
/// | 6.2.14   | no    |
/// | ""       | yes (unknown) |
fn version_at_least_7(version: &str) -> bool {
    match version.split('.').next().map(str::parse::<u32>) {
        Some(Ok(major)) => major >= 7,
        _ => true,
    }
}

/// Checks at start that the server (every master of a cluster) can give
/// `durability`, and says how batches must wait for it. The error says what
/// to change, and on a cluster which node falls short.
pub async fn durable_wait(
    conn: &mut RedisConn,
    durability: Durability,
) -> Result<DurableWait, CheckError> {
    let masters = conn.masters().await.map_err(CheckError::Masters)?;
    let mut wait = DurableWait::None;
    for node in &masters {
        let on_node = durable_wait_on(conn, node, durability).await?;
        // A cluster whose masters differ (one fsyncs always, one needs
        // WAITAOF) waits the stricter way everywhere: it is harmless on the other.
        if on_node != DurableWait::None {
            wait = on_node;
        }
    }
    Ok(wait)
}

async fn durable_wait_on(
    conn: &mut RedisConn,
    node: &Option<(String, u16)>,
    durability: Durability,
) -> Result<DurableWait, CheckError> {
    match durability {
        Durability::Ack => Ok(DurableWait::None),
        Durability::Replicas(wanted) => {
            let replication = info(conn, node, "replication").await?;
            let connected: u32 = info_field(&replication, "connected_slaves")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if connected < wanted {
                return Err(CheckError::TooFewReplicas {
                    node: node_name(node),
                    wanted,
                    connected,
                });
            }
            Ok(DurableWait::Replicas(wanted))
        }
        Durability::Fsync => {
            let persistence = info(conn, node, "persistence").await?;
            let server = info(conn, node, "server").await?;
            let version = info_field(&server, "redis_version").unwrap_or_default();
            let aof_on = info_field(&persistence, "aof_enabled").as_deref() == Some("1");
            let appendfsync = config_get(conn, node, "appendfsync").await.ok();
            fsync_wait(aof_on, appendfsync.as_deref(), &version).ok_or_else(|| {
                CheckError::NoFsync {
                    node: node_name(node),
                    version,
                    aof_on,
                    appendfsync: appendfsync
                        .unwrap_or_else(|| "unknown (CONFIG GET not allowed)".into()),
                }
            })
        }
    }
}

/// How `durability = fsync` waits on a node, or None if it cannot.
///
/// | appendonly | appendfsync | version | wait      |
/// |------------|-------------|---------|-----------|
/// | yes        | always      | any     | none      |
/// | yes        | other       | ≥ 7.2   | WAITAOF   |
/// | yes        | other       | < 7.2   | refused   |
/// | no         | any         | any     | refused   |
fn fsync_wait(aof_on: bool, appendfsync: Option<&str>, version: &str) -> Option<DurableWait> {
    if aof_on && appendfsync == Some("always") {
        return Some(DurableWait::None);
    }
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (aof_on && (major, minor) >= (7, 2)).then_some(DurableWait::LocalAof)
}

async fn info(
    conn: &mut RedisConn,
    node: &Option<(String, u16)>,
    section: &'static str,
) -> Result<String, CheckError> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg(section);
    conn.query_on(node, &cmd)
        .await
        .and_then(|v| Ok(redis::from_redis_value::<String>(&v)?))
        .map_err(|source| CheckError::Info {
            node: node_name(node),
            section,
            source,
        })
}

fn info_field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// One parameter's value from `CONFIG GET`.
async fn config_get(
    conn: &mut RedisConn,
    node: &Option<(String, u16)>,
    parameter: &str,
) -> Result<String, StoreError> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(parameter);
    let v = conn.query_on(node, &cmd).await?;
    let pair: Vec<String> = redis::from_redis_value(&v)?;
    Ok(pair.get(1).cloned().unwrap_or_default())
}

/// What a node keeps across a restart: an append-only file, RDB snapshots
/// (`None` when `CONFIG GET save` is refused, as on some managed Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persistence {
    pub node: String,
    pub aof: bool,
    pub rdb: Option<bool>,
}

impl Persistence {
    /// The warning for a durability level that relies on what this node
    /// keeps: with `ack` and no persistence at all, a restart loses every
    /// remembered id and all state, and Kafka's committed offsets are
    /// already past the effects (docs/guarantees.md).
    pub fn warning(&self, durability: Durability) -> Option<String> {
        let keeps_nothing = !self.aof && self.rdb == Some(false);
        (keeps_nothing && durability == Durability::Ack).then(|| {
            format!(
                "{} has no persistence (appendonly no, save \"\"): a restart loses all of idem's state while Kafka's offsets stay committed. Enable appendonly, or choose redis.durability = \"fsync\" or \"replicas:N\"",
                self.node
            )
        })
    }
}

/// The persistence of every master.
pub async fn persistence(conn: &mut RedisConn) -> Result<Vec<Persistence>, CheckError> {
    let masters = conn.masters().await.map_err(CheckError::Masters)?;
    let mut nodes = Vec::new();
    for node in &masters {
        let info = info(conn, node, "persistence").await?;
        let aof = info_field(&info, "aof_enabled").as_deref() == Some("1");
        let rdb = config_get(conn, node, "save")
            .await
            .ok()
            .map(|s| !s.trim().is_empty());
        nodes.push(Persistence {
            node: node_name(node),
            aof,
            rdb,
        });
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_by_table() {
        for (version, ok) in [
            ("7.0.15", true),
            ("7.2.4", true),
            ("8.0.0", true),
            ("6.2.14", false),
            ("5.0.7", false),
            ("", true),
        ] {
            assert_eq!(version_at_least_7(version), ok, "{version}");
        }
    }

    #[test]
    fn only_ack_on_a_node_that_keeps_nothing_is_warned_about() {
        let node = |aof, rdb| Persistence {
            node: "redis".into(),
            aof,
            rdb,
        };
        let rows = [
            (node(false, Some(false)), Durability::Ack, true),
            (node(false, Some(false)), Durability::Fsync, false),
            (node(false, Some(false)), Durability::Replicas(1), false),
            (node(true, Some(false)), Durability::Ack, false),
            (node(false, Some(true)), Durability::Ack, false),
            (node(false, Option::None), Durability::Ack, false),
        ];
        for (p, durability, warned) in rows {
            assert_eq!(
                p.warning(durability).is_some(),
                warned,
                "{p:?} {durability:?}"
            );
        }
    }

    #[test]
    fn fsync_wait_by_table() {
        use DurableWait::*;
        let rows = [
            (true, Some("always"), "6.2.0", Some(None)),
            (true, Some("everysec"), "7.2.4", Some(LocalAof)),
            (true, Some("everysec"), "7.10.0", Some(LocalAof)),
            (true, Some("everysec"), "7.0.15", Option::None),
            (true, Option::None, "6.0.0", Option::None),
            (false, Some("always"), "7.4.0", Option::None),
        ];
        for (aof, fsync, version, want) in rows {
            assert_eq!(
                fsync_wait(aof, fsync, version),
                want,
                "{aof} {fsync:?} {version}"
            );
        }
    }

    #[test]
    fn info_fields_are_found_by_exact_name() {
        let text = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=x\r\n";
        assert_eq!(info_field(text, "connected_slaves").as_deref(), Some("2"));
        assert_eq!(info_field(text, "connected"), Option::None);
    }
}
