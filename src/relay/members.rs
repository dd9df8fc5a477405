//! Who in the consumer group writes changes (docs/upgrading.md, docs/change-stream.md
//! "Turning it on"). Every `idem run` registers in Redis, every few
//! seconds, its version, its `changelog.topics` and the partitions it
//! holds. An instance with the changelog on compares the partitions of its
//! changelog topics with the live registrations and names those held by a
//! member that writes no changes for them: an older idem (it does not
//! register) or one whose config has no changelog for the topic yet. Their
//! changes get no version and no outbox entry: holes no consumer can see.
//!
//! The registration also carries the member's commit and its outcome
//! counts (since start, and over the last minute), which `idem top` reads:
//! the registry is how the group's instances are seen from Redis alone.
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

/// What one instance says of itself. Fields after `owns` came with 0.3.0:
/// earlier builds neither write them (read as empty) nor mind them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub version: String,
    /// Until when it counts (ms since the Unix epoch).
    pub expires_ms: u64,
    /// The topics whose changes it writes to the outbox.
    pub changelog: Vec<String>,
    /// The partitions it holds, by topic.
    pub owns: BTreeMap<String, Vec<i32>>,
    /// The commit it was built from (`idem --version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Its outcome counts since it started, by topic and outcome.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Its outcome counts over the last `window_ms` (for rates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<Recent>,
}

/// Outcome counts over a recent window of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent {
    /// How long the window is, by the instance's own clock.
    pub window_ms: u64,
    /// The counts added during it, by topic and outcome.
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
}

/// How long the window of [`Recent`] reaches back (a minute, as
/// Prometheus's `rate(…[1m])`).
const RECENT_WINDOW: Duration = Duration::from_secs(60);

/// The snapshots of this process's outcome counts over the last
/// [`RECENT_WINDOW`], one per registration.
#[derive(Default)]
struct Activity {
    snapshots: std::collections::VecDeque<(std::time::Instant, BTreeMap<String, metrics::Counts>)>,
}

impl Activity {
    /// Takes a snapshot now: the counts since start, and those since the
    /// oldest snapshot within the window.
    fn sample(&mut self) -> (BTreeMap<String, BTreeMap<String, u64>>, Option<Recent>) {
        let now = std::time::Instant::now();
        let counts = metrics::outcome_counts();
        // Keep the newest snapshot at least a window old as the base.
        while self.snapshots.len() > 1 && now.duration_since(self.snapshots[1].0) >= RECENT_WINDOW {
            self.snapshots.pop_front();
        }
        let recent = self.snapshots.front().map(|(at, then)| Recent {
            window_ms: now.duration_since(*at).as_millis() as u64,
            outcomes: by_name(&counts, Some(then)),
        });
        self.snapshots.push_back((now, counts.clone()));
        (by_name(&counts, None), recent)
    }
}

/// Counts by topic and outcome name; minus `base` where given.
fn by_name(
    counts: &BTreeMap<String, metrics::Counts>,
    base: Option<&BTreeMap<String, metrics::Counts>>,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    use crate::model::Outcome;
    counts
        .iter()
        .map(|(topic, now)| {
            let then = base.and_then(|b| b.get(topic));
            let named = Outcome::ALL
                .iter()
                .map(|&o| {
                    let before = then.map_or(0, |t| t[o as usize]);
                    (
                        o.as_str().to_string(),
                        now[o as usize].saturating_sub(before),
                    )
                })
                .collect();
            (topic.clone(), named)
        })
        .collect()
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

/// Writes `name`'s registration, and removes those of `known` (the
/// group's, as just read) that expired a minute before `now_ms`.
pub async fn register(
    conn: &mut RedisConn,
    key: &str,
    name: &str,
    registration: &Registration,
    known: &BTreeMap<String, Registration>,
    now_ms: u64,
) -> Result<(), StoreError> {
    let gone: Vec<&String> = known
        .iter()
        .filter(|(n, r)| *n != name && r.expires_ms + FORGET_AFTER_MS < now_ms)
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

/// Redis's clock, in ms: every member writes and judges expiries by it, so
/// the machines' clocks do not matter.
pub async fn redis_now_ms(conn: &mut RedisConn) -> Result<u64, StoreError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

/// This instance's registration at `now_ms`: what `health` says it holds,
/// and what `activity` counted.
fn this_instance(
    config: &Config,
    health: &Health,
    activity: &mut Activity,
    now_ms: u64,
) -> Registration {
    let mut owns: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    // Sorted by topic and partition, so each list is too.
    for tp in health.owned() {
        owns.entry(tp.topic).or_default().push(tp.partition);
    }
    let (outcomes, recent) = activity.sample();
    Registration {
        version: crate::version::VERSION.to_string(),
        expires_ms: now_ms + REGISTRATION_TTL.as_millis() as u64,
        changelog: config.changelog.topics.clone(),
        owns,
        commit: Some(crate::version::COMMIT.to_string()),
        outcomes,
        recent,
    }
}

/// How long a partition must stay unpublished before it is reported: past
/// a rebalance, and past a crashed member's registration expiring before
/// the group's session timeout gives its partitions away.
pub const REPORT_AFTER: Duration = Duration::from_secs(30);

/// The task of `idem run`: registers every [`REGISTER_EVERY`]; with the
/// changelog on, and while this instance holds partitions (so it has
/// joined), checks its topics and reports the partitions whose changes
/// have not been published for [`REPORT_AFTER`] (a warning a minute,
/// `idem_changelog_unpublished_partitions`). Errors are retried at the next
/// tick: this is a report, and never stops consumption. On `stop` it
/// removes its registration.
pub async fn watch(
    config: Arc<Config>,
    health: Health,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let key = KeyLayout::new(&config.redis.key_prefix).members_key(&config.kafka.group_id);
    let name = super::holder_name();
    let mut conn: Option<RedisConn> = None;
    for topic in &config.changelog.topics {
        metrics::set_changelog_unpublished(topic, 0);
    }
    let mut checker = Checker::new(config.clone());
    let mut activity = Activity::default();
    let mut tick = tokio::time::interval(REGISTER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if conn.is_none() {
            conn = crate::store::connect(&config.redis).await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let mine = (&mut checker, &mut activity);
        match tick_once(c, &key, &name, &config, &health, mine).await {
            Ok(()) => {}
            Err(_) => conn = None,
        }
    }
    if let Some(c) = conn.as_mut() {
        let _: Result<(), _> = redis::cmd("HDEL").arg(&key).arg(&name).query_async(c).await;
    }
}

async fn tick_once(
    conn: &mut RedisConn,
    key: &str,
    name: &str,
    config: &Config,
    health: &Health,
    (checker, activity): (&mut Checker, &mut Activity),
) -> Result<(), StoreError> {
    let now = redis_now_ms(conn).await?;
    let mut members = registrations(conn, key).await?;
    let me = this_instance(config, health, activity, now);
    register(conn, key, name, &me, &members, now).await?;
    let joined = !me.owns.is_empty();
    members.insert(name.to_string(), me);
    checker.warn_held_back(&members, now);
    if !config.changelog.topics.is_empty() {
        let counts = checker.partition_counts(health).await;
        if let (true, Some(counts)) = (joined, counts) {
            checker.check(&members, &counts, now);
        }
    }
    Ok(())
}

/// The settings `config` turns on that a live member's release does not
/// know: one line per member ([`crate::version::held_back`]).
pub fn held_back_by_members(
    config: &Config,
    members: &BTreeMap<String, Registration>,
    now_ms: u64,
) -> Vec<String> {
    use crate::version::{held_back, Release};
    members
        .iter()
        .filter(|(_, r)| r.expires_ms > now_ms)
        .filter_map(|(name, r)| {
            let release = Release::parse(&r.version);
            let settings = held_back(config, release);
            let (_, since) = settings.first()?;
            let names: Vec<&str> = settings.iter().map(|(s, _)| *s).collect();
            Some(format!(
                "member {name} runs {release} (registered {}): {} need(s) every member on {since} or later; upgrade it before turning them on (docs/upgrading.md)",
                r.version,
                names.join(", ")
            ))
        })
        .collect()
}

/// The checks over time: since when each partition is unpublished, the
/// topics' partition counts (read again once a minute, on one client).
struct Checker {
    config: Arc<Config>,
    since: BTreeMap<(String, i32), u64>,
    counts: Option<(BTreeMap<String, i32>, std::time::Instant)>,
    client: Option<Arc<rdkafka::consumer::BaseConsumer<crate::kafka::QuietContext>>>,
    warned_at: Option<std::time::Instant>,
    held_back_warned_at: Option<std::time::Instant>,
    /// A changelog topic was missing at the last read.
    changelog_missing: bool,
}

impl Checker {
    fn new(config: Arc<Config>) -> Checker {
        Checker {
            config,
            since: BTreeMap::new(),
            counts: None,
            client: None,
            warned_at: None,
            held_back_warned_at: None,
            changelog_missing: false,
        }
    }

    /// Warns, once a minute while it lasts, of members too old for what
    /// this instance's config turns on.
    fn warn_held_back(&mut self, members: &BTreeMap<String, Registration>, now: u64) {
        let found = held_back_by_members(&self.config, members, now);
        if found.is_empty()
            || self
                .held_back_warned_at
                .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        self.held_back_warned_at = Some(std::time::Instant::now());
        for line in found {
            tracing::warn!("group versions: {line}");
        }
    }

    fn check(
        &mut self,
        members: &BTreeMap<String, Registration>,
        counts: &BTreeMap<String, i32>,
        now: u64,
    ) {
        let mut found = Vec::new();
        for topic in &self.config.changelog.topics {
            let Some(&partitions) = counts.get(topic) else {
                continue;
            };
            let seen = unpublished(topic, partitions, members, now);
            let lasting = lasting(&mut self.since, &seen, now, REPORT_AFTER.as_millis() as u64);
            metrics::set_changelog_unpublished(topic, lasting.count());
            if !lasting.is_empty() {
                found.push(lasting.describe());
            }
        }
        if !found.is_empty()
            && self
                .warned_at
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.warned_at = Some(std::time::Instant::now());
            for line in found {
                tracing::warn!("changelog: {line}");
            }
        }
    }

    /// The changelog topics' partition counts, read at most once a minute
    /// while every one exists, at each tick while one is missing (which
    /// `health` names in `/readyz` meanwhile).
    async fn partition_counts(&mut self, health: &Health) -> Option<BTreeMap<String, i32>> {
        if let Some((counts, at)) = &self.counts {
            let all_there =
                !self.changelog_missing && counts.len() == self.config.changelog.topics.len();
            if all_there && at.elapsed() < Duration::from_secs(60) {
                return Some(counts.clone());
            }
        }
        if self.client.is_none() {
            let made = crate::kafka::base_config(&self.config.kafka)
                .create_with_context(crate::kafka::QuietContext);
            self.client = made.ok().map(Arc::new);
        }
        let client = self.client.clone()?;
        let topics = self.config.changelog.topics.clone();
        let timeout = self.config.kafka.request_timeout;
        let changelog = self.config.changelog.clone();
        let (counts, missing) = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer;
            let mut counts = BTreeMap::new();
            let mut missing = Vec::new();
            for topic in topics {
                let name = changelog.topic_for(&topic);
                let md = client.fetch_metadata(Some(&name), timeout).ok()?;
                let source = client.fetch_metadata(Some(&topic), timeout).ok()?;
                match md.topics().first().map(|t| t.error().is_none()) {
                    Some(true) => {}
                    _ => missing.push(changelog.missing_topic_text(&name)),
                }
                if let Some(t) = source.topics().first().filter(|t| t.error().is_none()) {
                    counts.insert(topic, t.partitions().len() as i32);
                }
            }
            Some((counts, missing))
        })
        .await
        .ok()
        .flatten()?;
        self.changelog_missing = !missing.is_empty();
        health.set_changelog_missing((!missing.is_empty()).then(|| missing.join("; ")));
        self.counts = Some((counts.clone(), std::time::Instant::now()));
        Some(counts)
    }
}

/// What of `now` has lasted `after_ms`: `since` keeps when each partition
/// was first found unpublished, and forgets those that are published again.
fn lasting(
    since: &mut BTreeMap<(String, i32), u64>,
    now: &Unpublished,
    at_ms: u64,
    after_ms: u64,
) -> Unpublished {
    let topic = now.topic.clone();
    let found: Vec<i32> = now
        .unregistered
        .iter()
        .copied()
        .chain(now.without_changelog.iter().map(|(p, _)| *p))
        .collect();
    since.retain(|(t, p), _| *t != topic || found.contains(p));
    let mut old_enough = |p: i32| {
        let first = *since.entry((topic.clone(), p)).or_insert(at_ms);
        at_ms.saturating_sub(first) >= after_ms
    };
    Unpublished {
        topic: topic.clone(),
        unregistered: now
            .unregistered
            .iter()
            .copied()
            .filter(|&p| old_enough(p))
            .collect(),
        without_changelog: now
            .without_changelog
            .iter()
            .filter(|(p, _)| old_enough(*p))
            .cloned()
            .collect(),
    }
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
            ..Registration::default()
        }
    }

    /// A registration reads across versions: an earlier build's (no commit,
    /// no counts) here, and this one's in a build that knows only the
    /// fields before 0.3.0 (serde ignores the fields it does not know).
    #[test]
    fn registrations_read_across_versions() {
        let earlier = r#"{"version":"0.2.0","expires_ms":5,"changelog":["o"],"owns":{"o":[1]}}"#;
        let read: Registration = serde_json::from_str(earlier).unwrap();
        assert_eq!((read.version.as_str(), read.commit), ("0.2.0", None));
        assert!(read.outcomes.is_empty() && read.recent.is_none());
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Earlier {
            version: String,
            expires_ms: u64,
            changelog: Vec<String>,
            owns: BTreeMap<String, Vec<i32>>,
        }
        let now = Registration {
            version: "0.3.0".into(),
            commit: Some("abc".into()),
            outcomes: [("o".to_string(), [("applied".to_string(), 3)].into())].into(),
            recent: Some(Recent::default()),
            ..read
        };
        let json = serde_json::to_string(&now).unwrap();
        let old: Earlier = serde_json::from_str(&json).unwrap();
        assert_eq!((old.version.as_str(), old.expires_ms), ("0.3.0", 5));
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
    fn a_finding_counts_once_it_lasted() {
        let found = |unregistered: Vec<i32>, without: Vec<i32>| Unpublished {
            topic: "t".into(),
            unregistered,
            without_changelog: without.into_iter().map(|p| (p, "b".to_string())).collect(),
        };
        let mut since = BTreeMap::new();
        assert!(lasting(&mut since, &found(vec![0, 1], vec![2]), 1_000, 30_000).is_empty());
        // 1 is published again at 20 s, then unpublished anew at 31 s.
        assert!(lasting(&mut since, &found(vec![0], vec![2]), 20_000, 30_000).is_empty());
        let at_31 = lasting(&mut since, &found(vec![0, 1], vec![2]), 31_000, 30_000);
        assert_eq!(at_31.unregistered, vec![0]);
        assert_eq!(at_31.without_changelog, vec![(2, "b".to_string())]);
        let at_56 = lasting(&mut since, &found(vec![0, 1], vec![]), 56_000, 30_000);
        assert_eq!(at_56.unregistered, vec![0], "1 for 25 s only");
        assert!(at_56.without_changelog.is_empty());
        let at_61 = lasting(&mut since, &found(vec![0, 1], vec![]), 61_000, 30_000);
        assert_eq!(at_61.unregistered, vec![0, 1]);
        assert_eq!(since.len(), 2, "2 was forgotten once published");
    }
}
