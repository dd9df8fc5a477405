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
    #[doc = key_doc!("redis", "mode")]
    #[serde(deserialize_with = "values::choice")]
    pub mode: RedisMode,
    #[doc = key_doc!("redis", "url")]
    pub url: String,
    #[doc = key_doc!("redis", "key_prefix")]
    #[serde(deserialize_with = "values::key_prefix")]
    pub key_prefix: String,
    #[doc = key_doc!("redis", "response_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub response_timeout: Duration,
    #[doc = key_doc!("redis", "connect_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub connect_timeout: Duration,
    #[doc = key_doc!("redis", "progress_check_interval")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub progress_check_interval: Duration,
    #[doc = key_doc!("redis", "durability")]
    #[serde(deserialize_with = "values::durability")]
    pub durability: Durability,
    #[doc = key_doc!("redis", "username")]
    pub username: String,
    #[doc = key_doc!("redis", "password")]
    #[serde(deserialize_with = "values::secret")]
    pub password: Option<Secret>,
    #[doc = key_doc!("redis", "password_file")]
    pub password_file: String,
    #[doc = key_doc!("redis", "tls_ca_file")]
    #[serde(deserialize_with = "values::readable_file")]
    pub tls_ca_file: String,
    #[doc = key_doc!("redis", "tls_cert_file")]
    #[serde(deserialize_with = "values::readable_file")]
    pub tls_cert_file: String,
    #[doc = key_doc!("redis", "tls_key_file")]
    #[serde(deserialize_with = "values::readable_file")]
    pub tls_key_file: String,
    #[doc = key_doc!("redis", "allow_eviction")]
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
