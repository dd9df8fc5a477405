//! `[redis]`: the server or cluster, the key layout, the timeouts, the
//! durability level and the client's security, decoded as they are read;
//! the checks that span keys run after.

use std::time::Duration;

use serde::Deserialize;

use super::forms::{both_or_neither, secret_file};
use super::{redact_url, values, Config, ConfigError, Secret};

/// Redis connection settings and key layout (`[redis]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// "standalone" (one Redis) or "cluster" (Redis Cluster: events are grouped by
    /// the hash slot of their entity; MOVED/ASK and failovers are followed).
    #[serde(deserialize_with = "values::choice")]
    pub mode: RedisMode,
    /// Redis URL: redis://[user:password@]host:port[/db]. For a cluster, seed nodes
    /// separated by commas: redis://10.0.0.1:7000,redis://10.0.0.2:7000
    pub url: String,
    /// Prefix of every key idem writes, so several pipelines can share one Redis.
    /// Keys look like <prefix>:{<entity>}:state (see docs/redis-layout.md).
    #[serde(deserialize_with = "values::key_prefix")]
    pub key_prefix: String,
    /// How long one Redis round trip may take before it counts as failed and is retried.
    #[serde(deserialize_with = "values::positive_duration")]
    pub response_timeout: Duration,
    /// How long to wait for a (re)connection to Redis.
    #[serde(deserialize_with = "values::positive_duration")]
    pub connect_timeout: Duration,
    /// While no batch runs, how often the epoch marker and the progress records of
    /// every assigned partition are checked, so that a Redis restarted empty or
    /// restored from an older snapshot is noticed (and re-read from the log) even on
    /// an idle topic. Each check is one round trip of three commands per server.
    #[serde(deserialize_with = "values::positive_duration")]
    pub progress_check_interval: Duration,
    /// When an effect counts as durable, so that its offset may be committed:
    ///   "ack"        when Redis replied. What a Redis crash loses then depends on its
    ///                persistence (AOF everysec loses up to a second of acknowledged writes).
    ///   "fsync"      when the write is on disk: needs appendonly yes + appendfsync always
    ///                (checked at start), or Redis >= 7.2 where idem waits with WAITAOF.
    ///   "replicas:N" when N replicas acknowledged it (WAIT after each batch).
    /// idem checks at start that the server (every master of a cluster) can give the
    /// level and refuses otherwise. On a cluster the wait runs on each master a batch wrote to.
    #[serde(deserialize_with = "values::durability")]
    pub durability: Durability,
    /// ACL user and password; override any in the URL. The password may come from
    /// a file (password_file, e.g. a mounted secret) and is never logged.
    pub username: String,
    /// Described with `username` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::secret")]
    pub password: Option<Secret>,
    /// Described with `username` (config/default.toml has one comment for the group).
    pub password_file: String,
    /// With rediss:// URLs: a PEM CA bundle to verify the server's certificate
    /// (empty: the system's trust store).
    #[serde(deserialize_with = "values::readable_file")]
    pub tls_ca_file: String,
    /// Mutual TLS (a server with tls-auth-clients yes): the client certificate and
    /// its private key (PEM), both or neither.
    #[serde(deserialize_with = "values::readable_file")]
    pub tls_cert_file: String,
    /// Described with `tls_cert_file` (config/default.toml has one comment for the group).
    #[serde(deserialize_with = "values::readable_file")]
    pub tls_key_file: String,
    /// idem refuses to start unless Redis's maxmemory-policy is "noeviction" (on a
    /// cluster: every master): an allkeys-* policy evicts entity state, and a
    /// volatile-* policy evicts exactly the remembered ids (they carry TTLs), so
    /// redeliveries would be applied again. true starts anyway, with a warning.
    pub allow_eviction: bool,
}

impl RedisConfig {
    /// The default settings pointed at `url` in `mode`: the tools' and
    /// tests' own connections (no credentials, no TLS).
    pub fn for_url(url: &str, mode: RedisMode) -> RedisConfig {
        RedisConfig {
            mode,
            url: url.to_string(),
            ..Config::defaults().redis
        }
    }

    /// The checks that span keys; a password given as a file is read here.
    pub(super) fn checked(mut self) -> Result<RedisConfig, ConfigError> {
        if let Some(url) = self
            .url
            .split(',')
            .map(str::trim)
            .find(|url| !(url.starts_with("redis://") || url.starts_with("rediss://")))
        {
            return Err(ConfigError::invalid(
                "redis.url",
                redact_url(url),
                "a URL like redis://host:6379 (for a cluster: seed nodes separated by commas)",
            ));
        }
        if self.mode == RedisMode::Standalone && self.url.contains(',') {
            return Err(ConfigError::invalid(
                "redis.url",
                redact_url(&self.url),
                "one URL (several seed nodes need redis.mode = \"cluster\")",
            ));
        }
        both_or_neither(
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        )?;
        if let Some(s) = secret_file("redis.password_file", &self.password_file)? {
            self.password = Some(s);
        }
        Ok(self)
    }
}

/// One Redis or a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
}

/// As written in the config: `standalone`, `cluster`.
impl std::fmt::Display for RedisMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
        })
    }
}

/// As written in the config: `ack`, `fsync`, `replicas:N`.
impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::Ack => f.write_str("ack"),
            Durability::Fsync => f.write_str("fsync"),
            Durability::Replicas(n) => write!(f, "replicas:{n}"),
        }
    }
}

/// When an effect counts as durable, so that its offset may be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// When Redis replied (its persistence settings decide what a crash loses).
    #[default]
    Ack,
    /// When `n` replicas acknowledged the batch (`WAIT`).
    Replicas(u32),
    /// When the batch is on disk: `appendfsync always`, or `WAITAOF` (Redis ≥ 7.2).
    Fsync,
}
