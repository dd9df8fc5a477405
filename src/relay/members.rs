//! Who in the consumer group writes changes (docs/upgrading.md, docs/changelog.md
//! "Turning it on"). Every `idem run` registers in Redis, every few
//! seconds, its version, its `changelog.topics` and the partitions it
//! holds. An instance with the changelog on compares the partitions of its
//! changelog topics with the live registrations and names those held by a
//! member that writes no changes for them: an older idem (it does not
//! register) or one whose config has no changelog for the topic yet. Their
//! changes get no version and no outbox entry: holes no consumer can see.
//!
//! Layout: [`unpublished`] decides (pure); [`register`] and
//! [`registrations`] are the Redis I/O; [`watch`] is the task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::metrics::{self, Health};
use crate::store::{KeyLayout, RedisConn, StoreError};

/// How often an instance writes its registration.
pub const REGISTER_EVERY: Duration = Duration::from_secs(5);
/// How long a registration counts without being written again.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(20);
/// How long an expired registration stays before a writer removes it.
const FORGET_AFTER_MS: u64 = 60_000;

/// What one instance says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub version: String,
    /// Until when it counts (ms since the Unix epoch).
    pub expires_ms: u64,
    /// The topics whose changes it writes to the outbox.
    pub changelog: Vec<String>,
    /// The partitions it holds, by topic.
    pub owns: BTreeMap<String, Vec<i32>>,
}

/// The partitions of one changelog topic whose changes are not published.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpublished {
    pub topic: String,
    /// Held by no registered member: an older idem holds them (or the
    /// group is between two assignments).
    pub unregistered: Vec<i32>,
    /// Held by a member without this topic in its `changelog.topics`.
    pub without_changelog: Vec<(i32, String)>,
}

impl Unpublished {
    pub fn is_empty(&self) -> bool {
        self.unregistered.is_empty() && self.without_changelog.is_empty()
    }

    pub fn count(&self) -> usize {
        self.unregistered.len() + self.without_changelog.len()
    }

    /// One line for a log or `idem check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.unregistered.is_empty() {
            parts.push(format!(
                "partitions {:?} are held by no member that registers (an idem older than the changelog, or the group is rebalancing)",
                self.unregistered
            ));
        }
        if !self.without_changelog.is_empty() {
            let held: Vec<String> = self
                .without_changelog
                .iter()
                .map(|(p, who)| format!("{p} by {who}"))
                .collect();
            parts.push(format!(
                "partitions held by members without changelog.topics = [\"{}\"]: {}",
                self.topic,
                held.join(", ")
            ));
        }
        format!(
            "{}: {}; their changes are not published. Finish the roll (every member on this version, with the same [changelog]), then run `idem changelog snapshot --topic {} --execute` (docs/upgrading.md)",
            self.topic,
            parts.join("; "),
            self.topic
        )
    }
}

/// Which of `topic`'s `partitions` no live member (`now_ms`) publishes.
///
/// | owners of a partition (live)           | verdict              |
/// |----------------------------------------|----------------------|
/// | none                                   | `unregistered`       |
/// | some, one with `topic` in its changelog | published            |
/// | some, none with `topic` in its changelog | `without_changelog` (the first owner) |
pub fn unpublished(
    topic: &str,
    partitions: i32,
    members: &BTreeMap<String, Registration>,
    now_ms: u64,
) -> Unpublished {
    let mut out = Unpublished {
        topic: topic.to_string(),
        ..Unpublished::default()
    };
    for p in 0..partitions {
        let owners: Vec<(&String, &Registration)> = members
            .iter()
            .filter(|(_, r)| r.expires_ms > now_ms)
            .filter(|(_, r)| r.owns.get(topic).is_some_and(|ps| ps.contains(&p)))
            .collect();
        match owners.first() {
            None => out.unregistered.push(p),
            Some((name, _)) => {
                if !owners
                    .iter()
                    .any(|(_, r)| r.changelog.iter().any(|t| t == topic))
                {
                    out.without_changelog.push((p, (*name).clone()));
                }
            }
        }
    }
    out
}

/// Writes `name`'s registration, and removes registrations expired for a
/// minute (a member that stopped).
pub async fn register(
    conn: &mut RedisConn,
    key: &str,
    name: &str,
    registration: &Registration,
) -> Result<(), StoreError> {
    let now = registration
        .expires_ms
        .saturating_sub(REGISTRATION_TTL.as_millis() as u64);
    let gone: Vec<String> = registrations(conn, key)
        .await?
        .into_iter()
        .filter(|(_, r)| r.expires_ms + FORGET_AFTER_MS < now)
        .map(|(n, _)| n)
        .collect();
    let json = serde_json::to_string(registration).unwrap_or_default();
    let mut pipe = redis::pipe();
    pipe.hset(key, name, json).ignore();
    if !gone.is_empty() {
        pipe.hdel(key, gone).ignore();
    }
    // The hash goes away with the group, an hour after its last member.
    pipe.pexpire(key, 3_600_000).ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Every registration of the group (unreadable ones skipped).
pub async fn registrations(
    conn: &mut RedisConn,
    key: &str,
) -> Result<BTreeMap<String, Registration>, StoreError> {
    let raw: BTreeMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    Ok(raw
        .into_iter()
        .filter_map(|(name, json)| Some((name, serde_json::from_str(&json).ok()?)))
        .collect())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This instance's registration now: what `health` says it holds.
fn this_instance(config: &Config, health: &Health) -> Registration {
    let mut owns: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for tp in health.owned() {
        owns.entry(tp.topic).or_default().push(tp.partition);
    }
    for ps in owns.values_mut() {
        ps.sort_unstable();
    }
    Registration {
        version: env!("CARGO_PKG_VERSION").to_string(),
        expires_ms: now_ms() + REGISTRATION_TTL.as_millis() as u64,
        changelog: config.changelog.topics.clone(),
        owns,
    }
}

/// The task of `idem run`: registers every [`REGISTER_EVERY`]; with the
/// changelog on, checks its topics and reports partitions whose changes are
/// not published (a warning a minute, `idem_changelog_unpublished_partitions`)
/// once they were so at two checks in a row (one assignment moving is not
/// a finding). Errors are retried at the next tick: this is a report, and
/// never stops consumption.
pub async fn watch(config: Arc<Config>, health: Health) {
    let key = KeyLayout::new(&config.redis.key_prefix).members_key(&config.kafka.group_id);
    let name = super::holder_name();
    let mut conn = None;
    let mut before: BTreeMap<String, Unpublished> = BTreeMap::new();
    let mut warned_at: Option<std::time::Instant> = None;
    for topic in &config.changelog.topics {
        metrics::set_changelog_unpublished(topic, 0);
    }
    let mut tick = tokio::time::interval(REGISTER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if conn.is_none() {
            conn = crate::store::connect(&config.redis).await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let me = this_instance(&config, &health);
        if register(c, &key, &name, &me).await.is_err() {
            conn = None;
            continue;
        }
        if config.changelog.topics.is_empty() {
            continue;
        }
        let Ok(members) = registrations(c, &key).await else {
            continue;
        };
        let Some(counts) = partition_counts(&config).await else {
            continue;
        };
        let now = now_ms();
        let mut found = Vec::new();
        for topic in &config.changelog.topics {
            let Some(&partitions) = counts.get(topic) else {
                continue;
            };
            let now_unpublished = unpublished(topic, partitions, &members, now);
            let confirmed = confirmed(before.get(topic), &now_unpublished);
            metrics::set_changelog_unpublished(topic, confirmed.count());
            if !confirmed.is_empty() {
                found.push(confirmed.describe());
            }
            before.insert(topic.clone(), now_unpublished);
        }
        if !found.is_empty() && warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            warned_at = Some(std::time::Instant::now());
            for line in found {
                tracing::warn!("changelog: {line}");
            }
        }
    }
}

/// What two checks in a row found.
fn confirmed(before: Option<&Unpublished>, now: &Unpublished) -> Unpublished {
    let Some(before) = before else {
        return Unpublished {
            topic: now.topic.clone(),
            ..Unpublished::default()
        };
    };
    Unpublished {
        topic: now.topic.clone(),
        unregistered: now
            .unregistered
            .iter()
            .filter(|p| before.unregistered.contains(p))
            .copied()
            .collect(),
        without_changelog: now
            .without_changelog
            .iter()
            .filter(|(p, _)| before.without_changelog.iter().any(|(q, _)| q == p))
            .cloned()
            .collect(),
    }
}

/// The partition count of every topic the brokers know, or `None` when they
/// do not answer.
pub async fn partition_counts(config: &Config) -> Option<BTreeMap<String, i32>> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || crate::kafka::partition_counts(&kafka).ok())
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(expires_ms: u64, changelog: &[&str], owns: &[(&str, &[i32])]) -> Registration {
        Registration {
            version: "x".into(),
            expires_ms,
            changelog: changelog.iter().map(|t| t.to_string()).collect(),
            owns: owns
                .iter()
                .map(|(t, ps)| (t.to_string(), ps.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn partitions_without_a_publishing_owner_are_named() {
        let members: BTreeMap<String, Registration> = [
            (
                "a".to_string(),
                member(100, &["orders"], &[("orders", &[0])]),
            ),
            // Holds 1 without the changelog for orders.
            (
                "b".to_string(),
                member(100, &["other"], &[("orders", &[1])]),
            ),
            // Expired: its partition 2 counts as held by no one registered.
            (
                "c".to_string(),
                member(10, &["orders"], &[("orders", &[2])]),
            ),
            // A hand-over: 0 is also in an old owner's registration.
            ("d".to_string(), member(100, &[], &[("orders", &[0])])),
        ]
        .into();
        let got = unpublished("orders", 4, &members, 50);
        assert_eq!(got.unregistered, vec![2, 3]);
        assert_eq!(got.without_changelog, vec![(1, "b".to_string())]);
        assert_eq!(got.count(), 3);
        assert!(got
            .describe()
            .contains("idem changelog snapshot --topic orders"));
        assert!(unpublished("orders", 1, &members, 50).is_empty());
    }

    #[test]
    fn a_finding_counts_once_two_checks_agree() {
        let first = Unpublished {
            topic: "t".into(),
            unregistered: vec![0, 1],
            without_changelog: vec![(2, "b".into())],
        };
        let second = Unpublished {
            topic: "t".into(),
            unregistered: vec![1, 3],
            without_changelog: vec![(2, "c".into())],
        };
        assert!(confirmed(None, &first).is_empty());
        let both = confirmed(Some(&first), &second);
        assert_eq!(both.unregistered, vec![1]);
        assert_eq!(both.without_changelog, vec![(2, "c".to_string())]);
    }
}
