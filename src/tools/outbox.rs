//! `idem inspect outbox`: the changelog's outboxes as Redis holds them
//! (docs/change-stream.md): each non-empty outbox's depth and oldest change,
//! and who holds the relay's lease.

use serde::Serialize;

use crate::config::Config;
use crate::relay::{lease_key, nonempty_outboxes, parse_entries};
use crate::store::{self, KeyLayout, RedisConn};

/// What `idem inspect outbox` reports (its `--json` form).
#[derive(Debug, Serialize)]
pub struct OutboxStatus {
    pub key_prefix: String,
    pub cluster: bool,
    /// Entries in all the outboxes.
    pub entries: u64,
    /// The outboxes that hold entries, deepest first.
    pub outboxes: Vec<OutboxDepth>,
    /// The relay that publishes, if any holds the lease.
    pub lease: Option<LeaseHolder>,
}

#[derive(Debug, Serialize)]
pub struct OutboxDepth {
    pub key: String,
    /// Its slot (cluster only).
    pub slot: Option<u16>,
    pub depth: u64,
    pub oldest: Option<OldestChange>,
}

#[derive(Debug, Serialize)]
pub struct OldestChange {
    /// The change id, `<entity>#<version>`.
    pub id: String,
    pub source_topic: String,
    /// How long ago the guard wrote it (Redis clock).
    pub age_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct LeaseHolder {
    pub holder: String,
    pub expires_in_ms: i64,
}

/// Reads every outbox of `config.redis.key_prefix` (on a cluster, all
/// 16,384 slots' lengths) and the lease.
pub async fn outbox_status(config: &Config) -> anyhow::Result<OutboxStatus> {
    let mut conn = store::connect_or_explain(&config.redis).await?;
    let layout = KeyLayout::new(&config.redis.key_prefix);
    let cluster = conn.is_cluster();
    let now_ms = redis_now_ms(&mut conn).await?;
    let mut outboxes = Vec::new();
    for (slot, depth) in nonempty_outboxes(&mut conn, &layout, cluster).await? {
        let key = layout.outbox_key(slot);
        let first: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let oldest = parse_entries(first)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .next()
            .map(|e| OldestChange {
                id: e.change_id(),
                source_topic: e.topic.clone(),
                age_seconds: now_ms.saturating_sub(e.applied_ms) as f64 / 1000.0,
            });
        outboxes.push(OutboxDepth {
            key,
            slot,
            depth,
            oldest,
        });
    }
    outboxes.sort_by(|a, b| b.depth.cmp(&a.depth).then(a.slot.cmp(&b.slot)));
    let lease_key = lease_key(&layout, cluster);
    let holder: Option<String> = redis::cmd("GET")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await?;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await?;
    Ok(OutboxStatus {
        key_prefix: config.redis.key_prefix.clone(),
        cluster,
        entries: outboxes.iter().map(|o| o.depth).sum(),
        outboxes,
        lease: holder.map(|holder| LeaseHolder {
            holder,
            expires_in_ms: ttl,
        }),
    })
}

async fn redis_now_ms(conn: &mut RedisConn) -> anyhow::Result<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

impl std::fmt::Display for OutboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.cluster {
            "cluster, one outbox per slot"
        } else {
            "standalone"
        };
        writeln!(
            f,
            "outboxes of prefix {} ({mode}): {} entries in {} outbox(es)",
            self.key_prefix,
            self.entries,
            self.outboxes.len()
        )?;
        if !self.outboxes.is_empty() {
            writeln!(
                f,
                "  {:<40} {:>8}  {:<32} {:>9}",
                "outbox", "depth", "oldest change", "age"
            )?;
        }
        for o in &self.outboxes {
            let (id, age) = o
                .oldest
                .as_ref()
                .map_or(("-".to_string(), "-".to_string()), |c| {
                    (c.id.clone(), format!("{:.1}s", c.age_seconds))
                });
            writeln!(f, "  {:<40} {:>8}  {:<32} {:>9}", o.key, o.depth, id, age)?;
        }
        match &self.lease {
            Some(l) => writeln!(
                f,
                "relay lease: held by {} (lapses in {:.1}s unless renewed)",
                l.holder,
                l.expires_in_ms.max(0) as f64 / 1000.0
            ),
            None => writeln!(
                f,
                "relay lease: not held: no relay publishes (is an `idem run` with changelog.topics, or an `idem relay`, running?)"
            ),
        }
    }
}
