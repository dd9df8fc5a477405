//! Redis: connection, key layout and reading an entity back.
//!
//! Guarantee: every key of an entity carries the entity's hash tag
//! (`<prefix>:{<entity>}:…`), so all of them live in one Redis Cluster slot
//! and one script may touch them atomically.

use std::collections::BTreeMap;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use serde::Serialize;

use crate::config::{redact_url, RedisConfig};

mod checks;
pub mod commutative;
mod keys;
pub mod outbox;
pub mod progress;
pub mod script;
pub use checks::{
    check_eviction_policy, check_mode, check_version, durable_wait, persistence, CheckError,
    DurableWait, Persistence,
};
pub use keys::{
    decided_field, hash_slot, mark_field, progress_field, progress_incarnation_field,
    progress_owner_field, EntityKeys, KeyLayout, COUNTERS_SUFFIX, LEDGER_INFIX, META_SUFFIX,
    SET_INFIX, SLOTS, STATE_SUFFIX,
};

/// An error talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered something idem does not understand: {0}")]
    Protocol(String),
    #[error("the batch is in Redis but not durable as redis.durability asks: {0}")]
    NotDurable(String),
    /// The epoch marker is gone or was renewed: Redis lost (some of) its
    /// state since idem last looked. Nothing of the refused call was written.
    #[error("Redis's epoch marker is {found} where idem expected {expected}: Redis lost or replaced its state")]
    EpochChanged { expected: String, found: String },
    /// A progress record went below what idem wrote (nothing written).
    #[error("a progress record went back: {0}")]
    RolledBack(String),
    /// An error raised while a script ran, its place in the script named
    /// by file and line (`located`); retried as `error` would be.
    #[error("redis: {located}")]
    Script {
        located: String,
        #[source]
        error: redis::RedisError,
    },
}

impl StoreError {
    /// Whether trying again later can succeed (connection lost, timeout,
    /// failover, a busy or loading server).
    pub fn is_retryable(&self) -> bool {
        let redis_retryable = |e: &redis::RedisError| {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_cluster_error()
                || matches!(
                    e.kind(),
                    redis::ErrorKind::BusyLoadingError
                        | redis::ErrorKind::TryAgain
                        | redis::ErrorKind::ClusterDown
                        | redis::ErrorKind::MasterDown
                        | redis::ErrorKind::Moved
                        | redis::ErrorKind::Ask
                )
        };
        match self {
            StoreError::Redis(e) | StoreError::Script { error: e, .. } => redis_retryable(e),
            StoreError::Protocol(_)
            | StoreError::EpochChanged { .. }
            | StoreError::RolledBack(_) => false,
            StoreError::NotDurable(_) => true,
        }
    }

    /// Whether Redis refused the credentials (wrong password, unknown ACL
    /// user, or a password needed and not given): retrying will not help.
    pub fn is_auth_refusal(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.kind() == redis::ErrorKind::AuthenticationFailed
                    || e.code()
                        .is_some_and(|c| matches!(c, "NOAUTH" | "WRONGPASS" | "NOPERM"))
                    || ["WRONGPASS", "NOAUTH", "invalid username-password"]
                        .iter()
                        .any(|m| e.to_string().contains(m))
            }
            _ => false,
        }
    }

    /// A short label for the retry metric.
    pub fn cause(&self) -> &'static str {
        match self {
            StoreError::Redis(e) if e.is_timeout() => "timeout",
            StoreError::Redis(e)
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() =>
            {
                "connection"
            }
            StoreError::Redis(e) if e.kind() == redis::ErrorKind::NoScriptError => "noscript",
            StoreError::Redis(e) if e.is_cluster_error() => "cluster",
            StoreError::Redis(_) | StoreError::Script { .. } => "server",
            StoreError::Protocol(_) => "protocol",
            StoreError::NotDurable(_) => "not_durable",
            StoreError::EpochChanged { .. } => "epoch",
            StoreError::RolledBack(_) => "rolled_back",
        }
    }
}

/// A connection to a standalone Redis or to a Redis Cluster. Both reconnect
/// by themselves; the cluster one follows MOVED/ASK redirections and routes
/// each command by the slot of its first key.
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The servers that hold data: the one server (`None`), or each master
    /// of a cluster by address.
    pub async fn masters(&mut self) -> Result<Vec<Option<NodeAddr>>, StoreError> {
        Ok(match self {
            RedisConn::Standalone(_) => vec![None],
            RedisConn::Cluster(c) => cluster_masters(c).await?.into_iter().map(Some).collect(),
        })
    }

    /// Runs `cmd` on one of `masters()`.
    pub async fn query_on(
        &mut self,
        node: &Option<NodeAddr>,
        cmd: &Cmd,
    ) -> Result<Value, StoreError> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        Ok(match (self, node) {
            (RedisConn::Cluster(c), Some((host, port))) => {
                let to = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                c.route_command(cmd, RoutingInfo::SingleNode(to)).await?
            }
            (conn, _) => cmd.query_async(conn).await?,
        })
    }

    /// Sends `pipe` to `node` (on a standalone server: to it) and returns
    /// every reply; a server error in any reply is the error of the whole.
    /// A pipeline that fails is not resent in part (idem retries the whole
    /// batch; on a cluster redis-rs may resend the whole pipeline, to the
    /// named node on MOVED/ASK): a success is one pass on one connection.
    pub async fn pipeline_on(
        &mut self,
        node: &Option<NodeAddr>,
        pipe: &Pipeline,
    ) -> Result<Vec<Value>, StoreError> {
        use redis::cluster_routing::SingleNodeRoutingInfo;
        let replies = match (self, node) {
            (RedisConn::Cluster(c), Some((host, port))) => {
                let to = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                c.route_pipeline(pipe, 0, pipe.len(), to).await?
            }
            (conn, _) => conn.req_packed_commands(pipe, 0, pipe.len()).await?,
        };
        Ok(replies
            .into_iter()
            .map(Value::extract_error)
            .collect::<Result<_, _>>()?)
    }

    /// The cluster's slot map (`None` for a standalone server).
    pub async fn slot_map(&mut self) -> Result<Option<SlotMap>, StoreError> {
        match self {
            RedisConn::Standalone(_) => Ok(None),
            RedisConn::Cluster(c) => Ok(Some(slot_map(c).await?)),
        }
    }

    /// Every entity that has a meta hash under `layout`'s prefix (SCAN).
    pub async fn entities(&mut self, layout: &KeyLayout) -> Result<Vec<String>, StoreError> {
        let (pattern, prefix_len) = layout.meta_pattern();
        let keys = self.scan_keys(&pattern).await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.get(prefix_len..k.len() - "}:meta".len()))
            .map(str::to_string)
            .collect())
    }

    /// Every key matching `pattern`, by SCAN (never KEYS): on the one
    /// server, or on each master of a cluster in turn (a SCAN cursor
    /// belongs to one node).
    pub async fn scan_keys(&mut self, pattern: &str) -> Result<Vec<String>, StoreError> {
        self.scan(pattern, false).await
    }

    /// Whether any key matches `pattern`: a SCAN that stops at the first.
    pub async fn any_key(&mut self, pattern: &str) -> Result<bool, StoreError> {
        Ok(!self.scan(pattern, true).await?.is_empty())
    }

    async fn scan(&mut self, pattern: &str, first_only: bool) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for node in self.masters().await? {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let reply = self.query_on(&node, &cmd).await?;
                let (next, keys): (u64, Vec<String>) = redis::from_redis_value(&reply)?;
                out.extend(keys);
                if first_only && !out.is_empty() {
                    return Ok(out);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }
}

/// A cluster node by address.
pub type NodeAddr = (String, u16);

/// Which master owns which slots, from CLUSTER SLOTS.
#[derive(Debug, Clone, Default)]
pub struct SlotMap {
    ranges: Vec<(u16, u16, NodeAddr)>,
}

impl SlotMap {
    /// The master of `slot`, if the map has one.
    pub fn owner(&self, slot: u16) -> Option<&NodeAddr> {
        self.ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, node)| node)
    }

    /// Each master with the lowest slot it owns: where its progress
    /// records live.
    pub fn anchors(&self) -> Vec<(NodeAddr, u16)> {
        let mut lowest: BTreeMap<&NodeAddr, u16> = BTreeMap::new();
        for (start, _, node) in &self.ranges {
            let e = lowest.entry(node).or_insert(*start);
            *e = (*e).min(*start);
        }
        lowest.into_iter().map(|(n, s)| (n.clone(), s)).collect()
    }

    pub fn masters(&self) -> Vec<NodeAddr> {
        let set: std::collections::BTreeSet<&NodeAddr> =
            self.ranges.iter().map(|(_, _, n)| n).collect();
        set.into_iter().cloned().collect()
    }
}

/// Reads the cluster's slot map.
pub async fn slot_map(c: &mut ClusterConnection) -> Result<SlotMap, StoreError> {
    // From a master: a stalled replica must not hold up the map.
    let slots = c
        .route_command(
            &redis::cmd("CLUSTER").arg("SLOTS").clone(),
            redis::cluster_routing::RoutingInfo::SingleNode(
                redis::cluster_routing::SingleNodeRoutingInfo::RandomPrimary,
            ),
        )
        .await?;
    let Value::Array(ranges) = slots else {
        return Err(StoreError::Protocol(format!(
            "CLUSTER SLOTS answered {slots:?}"
        )));
    };
    let mut map = SlotMap::default();
    for range in ranges {
        // [start, end, [host, port, id, ...], replicas...]
        let Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let (Some(host), Some(port)) = (master.first(), master.get(1)) else {
            continue;
        };
        let host: String = redis::from_redis_value(host).unwrap_or_default();
        if host.is_empty() || host == "?" {
            return Err(StoreError::Protocol(
                "CLUSTER SLOTS names a master without an address; set cluster-announce-ip (or -hostname) on the nodes".into(),
            ));
        }
        map.ranges.push((
            redis::from_redis_value(start)?,
            redis::from_redis_value(end)?,
            (host, redis::from_redis_value(port)?),
        ));
    }
    Ok(map)
}

async fn cluster_masters(c: &mut ClusterConnection) -> Result<Vec<NodeAddr>, StoreError> {
    Ok(slot_map(c).await?.masters())
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens the connection `cfg` asks for (`redis.mode`).
pub async fn connect(cfg: &RedisConfig) -> Result<RedisConn, StoreError> {
    match cfg.mode {
        crate::config::RedisMode::Standalone => {
            Ok(RedisConn::Standalone(connect_standalone(cfg).await?))
        }
        crate::config::RedisMode::Cluster => {
            let nodes: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .response_timeout(cfg.response_timeout)
                .connection_timeout(cfg.connect_timeout)
                .retries(3);
            if !cfg.username.is_empty() {
                builder = builder.username(cfg.username.clone());
            }
            if let Some(p) = &cfg.password {
                builder = builder.password(p.expose().to_string());
            }
            install_tls_provider();
            if let Some(certs) = tls_certificates(cfg)? {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            Ok(RedisConn::Cluster(client.get_async_connection().await?))
        }
    }
}

/// A connection that failed, with what to do next (the URL's password
/// redacted).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("Redis at {url} refused the credentials ({cause}): check redis.username and redis.password (or redis.password_file, or the URL's user:password)")]
    Refused { url: String, cause: StoreError },
    #[error("cannot reach Redis at {url}: {cause}; is it running and is redis.url right?")]
    Unreachable { url: String, cause: StoreError },
}

/// `connect`, for the tools: the error says what to do, and tells refused
/// credentials from an unreachable server.
pub async fn connect_or_explain(cfg: &RedisConfig) -> Result<RedisConn, ConnectError> {
    connect(cfg)
        .await
        .map_err(|e| explain_connect_error(cfg, e))
}

/// The error of a failed connection, saying what to do next.
pub fn explain_connect_error(cfg: &RedisConfig, cause: StoreError) -> ConnectError {
    let url = crate::config::redact_url(&cfg.url);
    if cause.is_auth_refusal() {
        ConnectError::Refused { url, cause }
    } else {
        ConnectError::Unreachable { url, cause }
    }
}

/// The CA and client certificate of `rediss://` connections; `None` when
/// neither is configured (the system's trust store, no client certificate).
fn tls_certificates(cfg: &RedisConfig) -> Result<Option<redis::TlsCertificates>, StoreError> {
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| StoreError::Protocol(format!("cannot read {key}: {e}")))
    };
    let root_cert = match cfg.tls_ca_file.as_str() {
        "" => None,
        path => Some(read("redis.tls_ca_file", path)?),
    };
    let client_tls = match (cfg.tls_cert_file.as_str(), cfg.tls_key_file.as_str()) {
        ("", _) | (_, "") => None,
        (cert, key) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// rustls needs a process-wide crypto provider before the first TLS connection.
fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Opens a self-reconnecting connection to one Redis.
async fn connect_standalone(cfg: &RedisConfig) -> Result<ConnectionManager, StoreError> {
    use redis::IntoConnectionInfo;
    let mut info = cfg.url.as_str().into_connection_info()?;
    if !cfg.username.is_empty() {
        info.redis.username = Some(cfg.username.clone());
    }
    if let Some(p) = &cfg.password {
        info.redis.password = Some(p.expose().to_string());
    }
    install_tls_provider();
    let client = match tls_certificates(cfg)? {
        None => redis::Client::open(info)?,
        Some(certs) => redis::Client::build_with_tls(info, certs)?,
    };
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(cfg.response_timeout)
        .set_connection_timeout(cfg.connect_timeout)
        .set_number_of_retries(2)
        .set_max_delay(1_000);
    let conn = client
        .get_connection_manager_with_config(manager_config)
        .await
        .map_err(|e| {
            tracing::debug!(url = %redact_url(&cfg.url), error = %e, "redis connect failed");
            e
        })?;
    Ok(conn)
}

/// One entity as idem stored it. This is the stable JSON of `idem inspect entity --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntityView {
    pub entity: String,
    /// Whether Redis holds anything for the entity.
    pub exists: bool,
    /// True after an applied delete (a tombstone: the seq stays).
    pub deleted: bool,
    pub seq: Option<u64>,
    pub last_id: Option<String>,
    /// Hex of the last applied event's fingerprint.
    pub fingerprint: Option<String>,
    /// How many events were applied to the entity.
    pub applied: u64,
    /// When the last event was applied, in ms since the Unix epoch (Redis clock).
    pub updated_ms: Option<u64>,
    pub state: BTreeMap<String, String>,
    /// Offset marks, `o:<topic id>:<partition>` → `<run start>:<offset>`
    /// (docs/guarantees.md, "Replays recognised forever"); absent when none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub offset_marks: BTreeMap<String, String>,
    /// The dense-seq rule's fields as stored (`dense`, `dense_above`,
    /// `dense_closed`; docs/guarantees.md, "Dense seqs"); absent when none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dense_seqs: BTreeMap<String, String>,
}

/// What per-field order (`state.order = "per_field"`) keeps for an entity
/// beside its state (docs/redis-layout.md), for `idem inspect entity
/// --field-seqs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FieldOrder {
    /// Data field → seq of its writer; a field not in the state is removed
    /// at that seq (a tombstone).
    pub field_seqs: BTreeMap<String, u64>,
    /// The newest replace or delete's seq (`<seq>!` for a delete).
    pub floor: Option<String>,
    /// The seq that last decided whether the entity exists.
    pub exists_seq: Option<u64>,
    /// The entity's seq when the field seqs were last written; another
    /// `seq` means events were decided under per-entity order since.
    pub field_seqs_at: Option<u64>,
}

/// Reads what per-field order keeps for `entity`.
pub async fn read_field_order(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    entity: &str,
) -> Result<FieldOrder, StoreError> {
    let keys = layout.entity(entity);
    type MetaFields = (Option<String>, Option<u64>, Option<u64>);
    let (field_seqs, (floor, exists_seq, field_seqs_at)): (BTreeMap<String, u64>, MetaFields) =
        redis::pipe()
            .hgetall(keys.field_seqs())
            .cmd("HMGET")
            .arg(keys.meta())
            .arg("floor")
            .arg("exists_seq")
            .arg("field_seqs_at")
            .query_async(conn)
            .await?;
    Ok(FieldOrder {
        field_seqs,
        floor,
        exists_seq,
        field_seqs_at,
    })
}

/// Reads an entity's state and bookkeeping.
pub async fn read_entity(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    entity: &str,
) -> Result<EntityView, StoreError> {
    let (meta, state): (BTreeMap<String, String>, BTreeMap<String, String>) = redis::pipe()
        .hgetall(layout.meta_key(entity))
        .hgetall(layout.state_key(entity))
        .query_async(conn)
        .await?;
    let parse_u64 = |field: &str| -> Result<Option<u64>, StoreError> {
        meta.get(field)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| StoreError::Protocol(format!("meta field {field} = {v:?}")))
            })
            .transpose()
    };
    Ok(EntityView {
        entity: entity.to_string(),
        exists: !meta.is_empty() || !state.is_empty(),
        deleted: meta.get("deleted").map(String::as_str) == Some("1"),
        seq: parse_u64("seq")?,
        last_id: meta.get("last_id").cloned(),
        fingerprint: meta.get("fingerprint").cloned(),
        applied: parse_u64("applied")?.unwrap_or(0),
        updated_ms: parse_u64("updated_ms")?,
        offset_marks: meta
            .iter()
            .filter(|(k, _)| k.starts_with("o:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        dense_seqs: meta
            .iter()
            .filter(|(k, _)| k.starts_with("dense"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        state,
    })
}
