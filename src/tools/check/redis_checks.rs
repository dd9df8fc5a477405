//! `idem check`'s Redis lines: the connection and its shape, eviction,
//! durability, progress records, persistence and the group's members.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::store;

use super::report::{line, Check, Status};

/// Redis: reachable, keeps idem's keys, can give the durability, persists.
/// Redis, and with the changelog on its members (`partitions`: what the
/// brokers answered, if they did).
pub(super) async fn redis(
    config: &Config,
    checks: &mut Vec<Check>,
    partitions: Option<&BTreeMap<String, usize>>,
) {
    let mut conn = match store::connect_or_explain(&config.redis).await {
        Ok(conn) => conn,
        Err(e) => return checks.push(line(Status::Fail, "redis", e.to_string())),
    };
    if let Err(e) = store::check_mode(&mut conn).await {
        return checks.push(line(Status::Fail, "redis", e.to_string()));
    }
    let shape = match conn.masters().await {
        Ok(masters) if conn.is_cluster() => format!("cluster of {} master(s)", masters.len()),
        Ok(_) => "standalone".to_string(),
        Err(e) => return checks.push(line(Status::Fail, "redis", e.to_string())),
    };
    let url = crate::config::redact_url(&config.redis.url);
    checks.push(line(
        Status::Ok,
        "redis",
        format!("{shape} at {url} answered"),
    ));
    checks.push(
        match store::check_eviction_policy(&mut conn, config.redis.allow_eviction).await {
            Ok(policies) if policies.iter().all(|p| p == "noeviction") => line(
                Status::Ok,
                "redis eviction",
                "maxmemory-policy noeviction: idem's keys are never evicted",
            ),
            Ok(policies) => line(
                Status::Ok,
                "redis eviction",
                format!(
                    "maxmemory-policy {}: Redis may evict idem's keys, accepted by redis.allow_eviction = true (evicted ids and state are lost)",
                    policies.join(", ")
                ),
            ),
            Err(e) => line(Status::Fail, "redis eviction", e.to_string()),
        },
    );
    let durability = config.redis.durability;
    checks.push(match store::durable_wait(&mut conn, durability).await {
        Ok(wait) => line(
            Status::Ok,
            "redis durability",
            durability_text(durability, wait),
        ),
        Err(e) => line(Status::Fail, "redis durability", e.to_string()),
    });
    let layout = store::KeyLayout::new(&config.redis.key_prefix);
    checks.push(
        match store::progress::ProgressStore::new(conn.clone(), layout)
            .survey()
            .await
        {
            Ok(survey) => progress_line(&survey),
            Err(e) => line(Status::Warn, "redis progress", e.to_string()),
        },
    );
    checks.push(group_versions(config, &mut conn).await);
    if !config.changelog.topics.is_empty() {
        checks.extend(changelog_members(config, &mut conn, partitions).await);
    }
    checks.extend(persistence(&mut conn, durability).await);
}

/// One line per server: whether it persists as `durability` needs.
async fn persistence(
    conn: &mut store::RedisConn,
    durability: crate::config::Durability,
) -> Vec<Check> {
    match store::persistence(conn).await {
        Ok(nodes) => nodes
            .iter()
            .map(|p| match p.warning(durability) {
                Some(w) => line(Status::Warn, "redis persistence", w),
                None => line(
                    Status::Ok,
                    "redis persistence",
                    format!(
                        "{}: appendonly {}, snapshots {}",
                        p.node,
                        yes_no(Some(p.aof)),
                        yes_no(p.rdb)
                    ),
                ),
            })
            .collect(),
        Err(e) => vec![line(Status::Warn, "redis persistence", e.to_string())],
    }
}

/// The releases the group's live members registered, against the settings
/// this config turns on (`crate::version::GATES`): a member too old for
/// one fails the check (docs/upgrading.md, "How versions work").
async fn group_versions(config: &Config, conn: &mut store::RedisConn) -> Check {
    use crate::relay::members;
    use crate::version::{Release, LONG};
    let what = "group versions";
    let group = &config.kafka.group_id;
    let key = store::KeyLayout::new(&config.redis.key_prefix).members_key(group);
    let read = match members::registrations(conn, &key).await {
        Ok(registered) => members::redis_now_ms(conn)
            .await
            .map(|now| (registered, now)),
        Err(e) => Err(e),
    };
    let (registered, now) = match read {
        Ok(read) => read,
        Err(e) => return line(Status::Warn, what, e.to_string()),
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in registered.values().filter(|r| r.expires_ms > now) {
        let release = Release::parse(&r.version);
        let commit = r.commit.as_deref().unwrap_or("unknown");
        let text = match release {
            Release::Unknown => format!("{} ({release})", r.version),
            Release::Known { .. } => format!("{release} (commit {commit})"),
        };
        *seen.entry(text).or_default() += 1;
    }
    if seen.is_empty() {
        return line(
            Status::Ok,
            what,
            format!("no member of group {group} registers now; this is {LONG}"),
        );
    }
    let listed: Vec<String> = seen.iter().map(|(v, n)| format!("{n} on {v}")).collect();
    let held = members::held_back_by_members(config, &registered, now);
    if held.is_empty() {
        line(
            Status::Ok,
            what,
            format!("{}; this is {LONG}", listed.join(", ")),
        )
    } else {
        line(
            Status::Fail,
            what,
            format!("{}. {}", listed.join(", "), held.join("; ")),
        )
    }
}

/// Whether every partition of each changelog topic is held by a member
/// that publishes its changes (`crate::relay::members`): a warning per
/// topic where some are not, since holes are expected during a roll.
async fn changelog_members(
    config: &Config,
    conn: &mut store::RedisConn,
    partitions: Option<&BTreeMap<String, usize>>,
) -> Vec<Check> {
    use crate::relay::members;
    let what = "changelog members";
    let key = store::KeyLayout::new(&config.redis.key_prefix).members_key(&config.kafka.group_id);
    let registered = match members::registrations(conn, &key).await {
        Ok(r) => r,
        Err(e) => return vec![line(Status::Warn, what, e.to_string())],
    };
    let Some(counts) = partitions else {
        return vec![line(
            Status::Warn,
            what,
            "the brokers did not answer: cannot tell who holds the partitions",
        )];
    };
    let now = match members::redis_now_ms(conn).await {
        Ok(now) => now,
        Err(e) => return vec![line(Status::Warn, what, e.to_string())],
    };
    let live = registered.values().filter(|r| r.expires_ms > now).count();
    if live == 0 {
        return vec![line(Status::Warn, what, format!("no member of group {} registers: none runs now, or every one is older than the changelog (their changes would not be published)", config.kafka.group_id))];
    }
    config
        .changelog
        .topics
        .iter()
        .filter_map(|t| Some((t, *counts.get(t)? as i32)))
        .map(|(topic, partitions)| {
            let found = members::unpublished(topic, partitions, &registered, now);
            if found.is_empty() {
                line(Status::Ok, what, format!("{topic}: all {partitions} partitions held by the {live} registered member(s) that publish its changes"))
            } else {
                line(Status::Warn, what, found.describe())
            }
        })
        .collect()
}

/// The epoch markers and progress records under the key prefix
/// (docs/guarantees.md, "When Redis loses or rolls back its state").
///
/// | markers               | records | status |
/// |-----------------------|---------|--------|
/// | none                  | none    | ok: not set yet (the first run sets them) |
/// | all present, one value| any     | ok     |
/// | some absent, or values differ | any | warn: a server lost state, or a renewal is under way |
/// | none                  | some    | warn   |
pub(super) fn progress_line(s: &store::progress::Survey) -> Check {
    let records: usize = s.records.iter().map(|(_, n)| n).sum();
    let what = "redis progress";
    match (s.epochs.len(), s.missing) {
        (0, _) if records == 0 => line(
            Status::Ok,
            what,
            "no epoch marker and no progress records under this key prefix yet: the first `idem run` sets them",
        ),
        (1, 0) => line(
            Status::Ok,
            what,
            format!(
                "epoch {} on every marker ({}); {records} progress record(s) on {} server(s)",
                s.epochs.keys().next().map_or("", String::as_str),
                s.epochs.values().sum::<usize>(),
                s.records.len()
            ),
        ),
        _ => line(
            Status::Warn,
            what,
            format!(
                "epoch markers absent ({} of {}) or differing ({} values): Redis lost state on some server, or an instance is renewing the epoch; idem re-reads from the log what Redis lost (docs/guarantees.md)",
                s.missing,
                s.missing + s.epochs.values().sum::<usize>(),
                s.epochs.len()
            ),
        ),
    }
}

/// The durability level as configured, and how a batch waits for it.
fn durability_text(durability: crate::config::Durability, wait: store::DurableWait) -> String {
    use crate::config::Durability;
    let level = match durability {
        Durability::Ack => "ack".to_string(),
        Durability::Fsync => "fsync".to_string(),
        Durability::Replicas(n) => format!("replicas:{n}"),
    };
    let how = match wait {
        store::DurableWait::None => "the script's reply".to_string(),
        store::DurableWait::Replicas(n) => format!("WAIT for {n} replica(s)"),
        store::DurableWait::LocalAof => "WAITAOF (fsync of the local append-only file)".to_string(),
    };
    format!("{level}: a batch counts as durable after {how}")
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown (CONFIG GET refused)",
    }
}
