//! `idem top`: a running group's outcomes, per topic, from Redis alone.
//! Every `idem run` publishes its outcome counts with its registration in
//! the members registry (`crate::relay::members`) every 5 s: since it
//! started, and over its last minute. The rates are the sum of the live
//! members' last-minute counts over their windows, so they lag at most a
//! registration behind; the totals are the sum of the members' own
//! counters (`idem_events_total`), those of a member that stopped gone
//! with it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Config;
use crate::model::Outcome;
use crate::relay::members::{self, Registration};
use crate::store::{self, KeyLayout};

/// One live member, as it registered.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub name: String,
    pub version: String,
    pub commit: Option<String>,
    pub partitions: usize,
    /// Over how long its rates were counted (0: not yet, it just started,
    /// or it is older than 0.3.0 and publishes no counts).
    pub window_seconds: f64,
}

/// One topic's outcomes over every live member.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TopicActivity {
    pub topic: String,
    /// Events per second, by outcome (all eight, zero included).
    pub rates: BTreeMap<String, f64>,
    /// Since each live member started, by outcome.
    pub totals: BTreeMap<String, u64>,
    /// Events per second, all outcomes.
    pub events_per_second: f64,
    /// Duplicates among all events over the members' windows (the
    /// `IdemDuplicateRatioSpike` ratio); `None` with no events.
    pub duplicate_ratio: Option<f64>,
}

/// The group as its live members describe it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupActivity {
    pub group: String,
    pub members: Vec<Member>,
    pub topics: Vec<TopicActivity>,
}

/// Sums the live (`now_ms`) registrations of `members` (pure).
pub fn summarize(
    group: &str,
    registrations: &BTreeMap<String, Registration>,
    now_ms: u64,
) -> GroupActivity {
    let live: Vec<(&String, &Registration)> = registrations
        .iter()
        .filter(|(_, r)| r.expires_ms > now_ms)
        .collect();
    let mut topics: BTreeMap<String, TopicActivity> = BTreeMap::new();
    let mut window_counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut members = Vec::new();
    for (name, r) in &live {
        for (topic, counts) in &r.outcomes {
            let t = topic_entry(&mut topics, topic);
            for (outcome, n) in counts {
                *t.totals.entry(outcome.clone()).or_default() += n;
            }
        }
        let window_seconds = r
            .recent
            .as_ref()
            .map_or(0.0, |w| w.window_ms as f64 / 1000.0);
        if let Some(recent) = r.recent.as_ref().filter(|w| w.window_ms > 0) {
            for (topic, counts) in &recent.outcomes {
                let t = topic_entry(&mut topics, topic);
                let (dups, all) = window_counts.entry(topic.clone()).or_default();
                for (outcome, n) in counts {
                    *t.rates.entry(outcome.clone()).or_default() += *n as f64 / window_seconds;
                    *all += n;
                    if outcome == Outcome::Duplicate.as_str() {
                        *dups += n;
                    }
                }
            }
        }
        members.push(Member {
            name: (*name).clone(),
            version: r.version.clone(),
            commit: r.commit.clone(),
            partitions: r.owns.values().map(Vec::len).sum(),
            window_seconds,
        });
    }
    for (topic, t) in &mut topics {
        t.events_per_second = t.rates.values().sum();
        t.duplicate_ratio = window_counts
            .get(topic)
            .filter(|(_, all)| *all > 0)
            .map(|(dups, all)| *dups as f64 / *all as f64);
    }
    GroupActivity {
        group: group.to_string(),
        members,
        topics: topics.into_values().collect(),
    }
}

/// `topic`'s row, every outcome present (at zero) so the columns line up.
fn topic_entry<'a>(
    topics: &'a mut BTreeMap<String, TopicActivity>,
    topic: &str,
) -> &'a mut TopicActivity {
    topics.entry(topic.to_string()).or_insert_with(|| {
        let names = || Outcome::ALL.iter().map(|o| o.as_str().to_string());
        TopicActivity {
            topic: topic.to_string(),
            rates: names().map(|o| (o, 0.0)).collect(),
            totals: names().map(|o| (o, 0)).collect(),
            ..TopicActivity::default()
        }
    })
}

/// Reads `group`'s registrations under the configured key prefix.
pub async fn read(config: &Config, group: &str) -> anyhow::Result<GroupActivity> {
    let mut conn = store::connect_or_explain(&config.redis).await?;
    let key = KeyLayout::new(&config.redis.key_prefix).members_key(group);
    let registered = members::registrations(&mut conn, &key).await?;
    let now = members::redis_now_ms(&mut conn).await?;
    Ok(summarize(group, &registered, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::members::Recent;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, BTreeMap<String, u64>> {
        let by_outcome = pairs.iter().map(|(o, n)| (o.to_string(), *n)).collect();
        [("orders".to_string(), by_outcome)].into()
    }

    #[test]
    fn rates_and_totals_sum_the_live_members() {
        let member = |expires_ms, total: &[(&str, u64)], recent: Option<(u64, &[(&str, u64)])>| {
            Registration {
                version: "0.3.0".into(),
                expires_ms,
                outcomes: counts(total),
                recent: recent.map(|(window_ms, c)| Recent {
                    window_ms,
                    outcomes: counts(c),
                }),
                ..Registration::default()
            }
        };
        let registered: BTreeMap<String, Registration> = [
            (
                "a".to_string(),
                member(
                    100,
                    &[("applied", 90), ("duplicate", 10)],
                    Some((10_000, &[("applied", 80), ("duplicate", 20)])),
                ),
            ),
            (
                "b".to_string(),
                member(
                    100,
                    &[("applied", 5)],
                    Some((20_000, &[("duplicate", 100)])),
                ),
            ),
            // Expired: not counted.
            ("c".to_string(), member(10, &[("applied", 1_000)], None)),
            // Just started: totals, no rates yet.
            ("d".to_string(), member(100, &[("stale", 3)], None)),
        ]
        .into();
        let got = summarize("g", &registered, 50);
        assert_eq!(got.members.len(), 3);
        let t = &got.topics[0];
        assert_eq!(t.totals["applied"], 95);
        assert_eq!(t.totals["duplicate"], 10);
        assert_eq!(t.totals["stale"], 3);
        assert_eq!(t.totals.len(), Outcome::ALL.len());
        assert!((t.rates["applied"] - 8.0).abs() < 1e-9);
        assert!((t.rates["duplicate"] - 7.0).abs() < 1e-9, "2/s + 5/s");
        assert!((t.events_per_second - 15.0).abs() < 1e-9);
        assert_eq!(t.duplicate_ratio, Some(120.0 / 200.0));
        assert!(summarize("g", &BTreeMap::new(), 0).topics.is_empty());
    }
}
