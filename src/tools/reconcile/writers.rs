//! Who else writes the key prefix. An entity that no topic read names is
//! an extra only if every topic that writes the prefix was read: the
//! config's `kafka.topics`, the topics every `idem run` recorded in
//! `<prefix>:writers`, and those held by the members of every group
//! registered in `<prefix>:members:{<group>}` (docs/redis-layout.md).
//! Otherwise such an entity may be another topic's, live: it is neither
//! reported nor deleted, and a repair could erase that topic's fields.

use std::collections::BTreeSet;

use crate::relay::members::registrations;
use crate::store::{KeyLayout, RedisConn};

/// The writers (`kafka.topics`, or the group whose members hold it) of each
/// topic that writes the prefix and was not read.
///
/// | configured     | registered          | read            | unread             |
/// |----------------|---------------------|-----------------|--------------------|
/// | orders         | -                   | orders          | none               |
/// | orders, pay    | -                   | orders          | pay (kafka.topics) |
/// | orders         | b: orders, pay      | orders          | pay (group b)      |
/// | orders         | b: pay              | orders, pay     | none               |
pub(super) fn unread_writers(
    configured: &[String],
    registered: &[(String, BTreeSet<String>)],
    read: &[String],
) -> Vec<(String, String)> {
    let mut unread: Vec<(String, String)> = configured
        .iter()
        .filter(|t| !read.contains(t))
        .map(|t| ("kafka.topics".to_string(), t.clone()))
        .collect();
    for (who, topics) in registered {
        for topic in topics.iter().filter(|t| !read.contains(t)) {
            unread.push((who.clone(), topic.clone()));
        }
    }
    unread
}

/// Who writes `layout`'s prefix: the topics every `idem run` recorded in
/// `<prefix>:writers` (as one pseudo-group), and the groups registered in
/// the members registry, each with the topics its members hold.
pub(super) async fn registered_topics(
    conn: &mut RedisConn,
    layout: &KeyLayout,
) -> anyhow::Result<Vec<(String, BTreeSet<String>)>> {
    let recorded: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg(layout.writers_key())
        .query_async(conn)
        .await?;
    let mut registered = vec![(format!("recorded in {}", layout.writers_key()), recorded)];
    for key in conn.scan_keys(&layout.members_key("*")).await? {
        let group = key
            .rsplit_once(":members:{")
            .map_or(key.as_str(), |(_, g)| g.trim_end_matches('}'))
            .to_string();
        let topics: BTreeSet<String> = registrations(conn, &key)
            .await?
            .into_values()
            .flat_map(|r| r.owns.into_keys())
            .collect();
        registered.push((format!("group {group}"), topics));
    }
    Ok(registered)
}

/// Why entities no topic read names cannot be judged (topics that write
/// the prefix were not read), or `None` when they can; refuses `--repair`
/// in that case, before anything is read or written.
pub(super) async fn unread_or_refuse(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    config: &crate::config::Config,
    opts: &super::ReconcileOptions,
) -> anyhow::Result<Option<String>> {
    let registered = registered_topics(conn, layout).await?;
    let unread = unread_writers(&config.kafka.topics, &registered, &opts.topics);
    let Some(why) = (!unread.is_empty()).then(|| describe(layout.prefix(), &unread)) else {
        return Ok(None);
    };
    anyhow::ensure!(
        !opts.repair,
        "--repair refused: {why}. A repair would rewrite an entity those topics also write without \
         their fields (and --delete-extra would take their entities for extras). Read them too \
         (--topic, repeated; by default every topic of kafka.topics), or run without --repair to report"
    );
    Ok(Some(why))
}

/// One sentence naming the unread writers.
pub(super) fn describe(prefix: &str, unread: &[(String, String)]) -> String {
    let named: Vec<String> = unread
        .iter()
        .map(|(who, topic)| format!("{topic} ({who})"))
        .collect();
    format!(
        "topics that were not read write key prefix {prefix:?}: {}",
        named.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of `unread_writers`.
    #[test]
    fn unread_writers_by_table() {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let reg = |g: &str, v: &[&str]| {
            (
                format!("group {g}"),
                v.iter().map(|t| t.to_string()).collect(),
            )
        };
        assert!(unread_writers(&s(&["orders"]), &[], &s(&["orders"])).is_empty());
        assert_eq!(
            unread_writers(&s(&["orders", "pay"]), &[], &s(&["orders"])),
            vec![("kafka.topics".to_string(), "pay".to_string())]
        );
        assert_eq!(
            unread_writers(
                &s(&["orders"]),
                &[reg("b", &["orders", "pay"])],
                &s(&["orders"])
            ),
            vec![("group b".to_string(), "pay".to_string())]
        );
        assert!(unread_writers(
            &s(&["orders"]),
            &[reg("b", &["pay"])],
            &s(&["orders", "pay"])
        )
        .is_empty());
    }
}
