//! The snapshot (`idem changelog snapshot`): every entity's current state
//! written once to the outbox as a change of kind `snapshot`, so that a new
//! consumer of the changelog can start from it (docs/change-stream.md,
//! "Bootstrapping a consumer"). Each entity is one script call in its own
//! slot, like the guard's: the change takes the entity's next version, so
//! the versions stay dense and in order with the live changes around it,
//! and a chained idem's dense mark starts at it. The relay publishes the
//! entries like any other.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::config::Config;
use crate::store::outbox::ENTRY_LUA;
use crate::store::script::{Builder, Constant, Script, MAX_PAIRS};
use crate::store::{self, hash_slot, KeyLayout, RedisConn, StoreError};

/// snapshot.lua after a prelude with the pairs limit the guard uses too,
/// and the outbox entry's one writer.
fn script() -> Script {
    let max_pairs = ("MAX_PAIRS".into(), Constant::Int(MAX_PAIRS));
    let mut b = Builder::new(Some("#!lua"), &[max_pairs]);
    let (entry_path, entry) = ENTRY_LUA;
    b.file(entry_path, entry)
        .file("src/relay/snapshot.lua", include_str!("snapshot.lua"));
    b.finish()
}
/// Entities written per round (then the relay is rung and the bound checked).
const ROUND: usize = 500;
/// Script calls in flight at once.
const IN_FLIGHT: usize = 64;

/// What a snapshot did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Entities found under the key prefix.
    pub entities: usize,
    /// Changes written (one per entity still there).
    pub written: u64,
    /// Entities that vanished between the scan and their call.
    pub gone: u64,
    /// When it started (Redis clock, ms since the Unix epoch): a new
    /// consumer group can start at the changelog's offsets of that time.
    pub started_ms: u64,
}

/// Writes one snapshot change per entity of `config.redis.key_prefix`,
/// published to the changelog of `source_topic`, waiting while an outbox it
/// wrote to holds `changelog.max_outbox` entries (the relay must run).
/// `progress` hears (done, of) after each round.
pub async fn snapshot(
    config: &Config,
    conn: &mut RedisConn,
    source_topic: &str,
    mut progress: impl FnMut(u64, usize),
) -> Result<SnapshotReport, StoreError> {
    let layout = KeyLayout::new(&config.redis.key_prefix);
    let cluster = conn.is_cluster();
    let (_, sets) = config.effects.names();
    let script = redis::Script::new(script().source());
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let mut report = SnapshotReport {
        started_ms: secs * 1000 + micros / 1000,
        ..SnapshotReport::default()
    };
    let entities = conn.entities(&layout).await?;
    report.entities = entities.len();
    for round in entities.chunks(ROUND) {
        let mut slots = BTreeSet::new();
        for calls in round.chunks(IN_FLIGHT) {
            let sent = calls.iter().map(|entity| {
                let keys = layout.entity(entity);
                let slot = cluster.then(|| hash_slot(keys.base().as_bytes()));
                slots.insert(slot);
                let mut invocation = script.prepare_invoke();
                invocation
                    .key(keys.meta())
                    .key(keys.state())
                    .key(layout.outbox_key(slot))
                    .key(keys.counters());
                for set in &sets {
                    invocation.key(keys.set(set));
                }
                invocation.arg(entity).arg(source_topic);
                for set in &sets {
                    invocation.arg(set);
                }
                let mut conn = conn.clone();
                async move { invocation.invoke_async::<u64>(&mut conn).await }
            });
            for version in join_all(sent).await {
                match version? {
                    0 => report.gone += 1,
                    _ => report.written += 1,
                }
            }
        }
        let dirty: Vec<u16> = slots.iter().flatten().copied().collect();
        let _: () = store::outbox::ring(&layout, cluster, &dirty)
            .query_async(conn)
            .await?;
        wait_below_bound(config, conn, &layout, &slots).await?;
        progress(report.written + report.gone, report.entities);
    }
    Ok(report)
}

/// Waits while one of the outboxes of `slots` holds `changelog.max_outbox`
/// entries or more, logging what it waits for every 10 s.
async fn wait_below_bound(
    config: &Config,
    conn: &mut RedisConn,
    layout: &KeyLayout,
    slots: &BTreeSet<Option<u16>>,
) -> Result<(), StoreError> {
    let max = config.changelog.max_outbox as u64;
    let mut told: Option<Instant> = None;
    loop {
        let mut deepest = (None, 0);
        for &slot in slots {
            let len: u64 = redis::cmd("XLEN")
                .arg(layout.outbox_key(slot))
                .query_async(conn)
                .await?;
            if len > deepest.1 {
                deepest = (slot, len);
            }
        }
        if deepest.1 < max {
            return Ok(());
        }
        if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!(
                outbox = %layout.outbox_key(deepest.0),
                depth = deepest.1,
                max,
                "the outbox is at changelog.max_outbox: the snapshot waits for the relay (is `idem run` or `idem relay` running with changelog.topics?)"
            );
            told = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
