//! Where the relay finds entries without polling every outbox.
//!
//! A standalone Redis has one outbox. A cluster has one per slot (a script
//! writes only its entities' slot), so the guard also adds each slot it
//! wrote changes to to the dirty set, after the script, and rings the bell
//! (`Guard::ring_outboxes`). The relay reads the dirty slots' outboxes; one
//! it finds empty it removes from the set, then looks again and adds it
//! back if an entry arrived in between (the guard writes the entry before
//! it adds the slot, so nothing is missed). A ring lost to a crash between
//! the script and the ring is healed by the sweep: every [`SWEEP_EVERY`],
//! and at start, the length of every slot's outbox.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::Value;

use super::error::RelayError;
use crate::store::outbox::{parse_entries, Entry};
use crate::store::{KeyLayout, RedisConn};

/// How often a cluster's relay looks at every slot's outbox.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// At most this many outboxes are read in one round (so that their shares
/// of at least [`MIN_SHARE`] stay within a round's entries); the next round
/// starts where this one stopped, so no slot waits behind a busy one.
/// (relay/mod.rs holds them to `ROUND_ENTRIES`).
pub(super) const OUTBOXES_PER_ROUND: usize = 40;
/// Each outbox read gets at least this many entries of a round.
pub(super) const MIN_SHARE: usize = 50;
/// How many commands of a sweep are in flight at once.
const SWEEP_CONCURRENCY: usize = 512;

/// The entries read from one outbox in a round, oldest first.
pub struct OutboxRead {
    pub slot: Option<u16>,
    pub key: String,
    pub entries: Vec<Entry>,
    /// How many entries were asked for (fewer came: the outbox is drained).
    pub asked: usize,
}

pub struct Outboxes {
    layout: KeyLayout,
    cluster: bool,
    /// Where the next round starts among the dirty slots.
    next: usize,
    swept_at: Option<Instant>,
}

pub fn lease_key(layout: &KeyLayout, cluster: bool) -> String {
    layout.relay_lease_key(cluster)
}

impl Outboxes {
    pub fn new(layout: KeyLayout, cluster: bool) -> Outboxes {
        Outboxes {
            layout,
            cluster,
            next: 0,
            swept_at: None,
        }
    }

    /// Up to `total` entries, shared among the outboxes that have some.
    pub async fn read(
        &mut self,
        conn: &mut RedisConn,
        total: usize,
    ) -> Result<Vec<OutboxRead>, RelayError> {
        let slots = self.due_for_reading(conn).await?;
        let share = (total / slots.len().max(1)).max(MIN_SHARE);
        let reads = slots.iter().map(|&slot| {
            let mut conn = conn.clone();
            let key = self.layout.outbox_key(slot);
            async move {
                let reply: Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(share)
                    .query_async(&mut conn)
                    .await
                    .map_err(crate::store::StoreError::from)?;
                let entries = parse_entries(reply).map_err(RelayError::Protocol)?;
                Ok::<_, RelayError>(OutboxRead {
                    slot,
                    key,
                    entries,
                    asked: share,
                })
            }
        });
        join_all(reads).await.into_iter().collect()
    }

    /// The outboxes to read this round: the one of a standalone Redis, or
    /// the next dirty slots of a cluster (all slots with entries after a
    /// sweep).
    async fn due_for_reading(
        &mut self,
        conn: &mut RedisConn,
    ) -> Result<Vec<Option<u16>>, RelayError> {
        if !self.cluster {
            return Ok(vec![None]);
        }
        if self.swept_at.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            self.sweep(conn).await?;
        }
        let mut dirty: Vec<u16> = redis::cmd("SMEMBERS")
            .arg(self.layout.outbox_dirty_key())
            .query_async(conn)
            .await
            .map_err(crate::store::StoreError::from)?;
        dirty.sort_unstable();
        if dirty.is_empty() {
            return Ok(Vec::new());
        }
        let start = self.next % dirty.len();
        dirty.rotate_left(start);
        dirty.truncate(OUTBOXES_PER_ROUND);
        self.next = start + dirty.len();
        Ok(dirty.into_iter().map(Some).collect())
    }

    /// Adds every slot whose outbox has entries to the dirty set.
    async fn sweep(&mut self, conn: &mut RedisConn) -> Result<(), RelayError> {
        let found: Vec<u16> = nonempty_outboxes(conn, &self.layout, true)
            .await?
            .into_iter()
            .filter_map(|(slot, _)| slot)
            .collect();
        if !found.is_empty() {
            let _: () = redis::cmd("SADD")
                .arg(self.layout.outbox_dirty_key())
                .arg(&found)
                .query_async(conn)
                .await
                .map_err(crate::store::StoreError::from)?;
            tracing::info!(
                slots = found.len(),
                "outbox sweep found entries no ring announced"
            );
        }
        self.swept_at = Some(Instant::now());
        Ok(())
    }

    /// How many entries the outboxes of `batches` hold now.
    pub async fn depth(
        &self,
        conn: &mut RedisConn,
        batches: &[OutboxRead],
    ) -> Result<u64, RelayError> {
        let lengths = batches.iter().map(|b| {
            let mut conn = conn.clone();
            let key = b.key.clone();
            async move {
                redis::cmd("XLEN")
                    .arg(key)
                    .query_async::<u64>(&mut conn)
                    .await
            }
        });
        let mut depth = 0;
        for n in join_all(lengths).await {
            depth += n.map_err(crate::store::StoreError::from)?;
        }
        Ok(depth)
    }

    /// Deletes each outbox's first `acked[i]` entries; returns how many.
    pub async fn delete(
        &mut self,
        conn: &mut RedisConn,
        batches: &[OutboxRead],
        acked: &[usize],
    ) -> Result<usize, RelayError> {
        let deletes = batches
            .iter()
            .zip(acked)
            .filter(|(_, &n)| n > 0)
            .map(|(b, &n)| {
                let mut conn = conn.clone();
                // The entries read are the outbox's first, so the acknowledged
                // ones are a prefix: trimming below the next id removes them
                // and frees their nodes (XDEL would leave them as tombstones
                // that every later XRANGE steps over).
                let mut cmd = redis::cmd("XTRIM");
                cmd.arg(&b.key)
                    .arg("MINID")
                    .arg(id_after(&b.entries[n - 1].stream_id));
                async move { cmd.query_async::<u64>(&mut conn).await }
            });
        let mut total = 0;
        for deleted in join_all(deletes).await {
            total += deleted.map_err(crate::store::StoreError::from)? as usize;
        }
        Ok(total)
    }

    /// Cluster: the slots whose outboxes this round drained leave the dirty
    /// set, unless an entry arrived since.
    pub async fn forget_empty(
        &mut self,
        conn: &mut RedisConn,
        batches: &[OutboxRead],
    ) -> Result<(), RelayError> {
        let drained: Vec<u16> = batches
            .iter()
            .filter(|b| b.entries.len() < b.asked)
            .filter_map(|b| b.slot)
            .collect();
        if !self.cluster || drained.is_empty() {
            return Ok(());
        }
        let dirty = self.layout.outbox_dirty_key();
        let _: () = redis::cmd("SREM")
            .arg(&dirty)
            .arg(&drained)
            .query_async(conn)
            .await
            .map_err(crate::store::StoreError::from)?;
        let lengths = drained.iter().map(|&slot| {
            let mut conn = conn.clone();
            let key = self.layout.outbox_key(Some(slot));
            async move {
                (
                    slot,
                    redis::cmd("XLEN")
                        .arg(key)
                        .query_async::<u64>(&mut conn)
                        .await,
                )
            }
        });
        let mut again = Vec::new();
        for (slot, n) in join_all(lengths).await {
            if n.map_err(crate::store::StoreError::from)? > 0 {
                again.push(slot);
            }
        }
        if !again.is_empty() {
            let _: () = redis::cmd("SADD")
                .arg(&dirty)
                .arg(&again)
                .query_async(conn)
                .await
                .map_err(crate::store::StoreError::from)?;
        }
        Ok(())
    }

    /// Blocks on the bell for at most `wait`.
    pub async fn wait_bell(
        &mut self,
        conn: &mut RedisConn,
        wait: Duration,
    ) -> Result<(), RelayError> {
        let _: Value = redis::cmd("BLPOP")
            .arg(self.layout.outbox_bell_key(self.cluster))
            .arg(wait.as_secs_f64())
            .query_async(conn)
            .await
            .map_err(crate::store::StoreError::from)?;
        Ok(())
    }
}

/// The stream id just after `id` (`<ms>-<n>` → `<ms>-<n+1>`).
fn id_after(id: &str) -> String {
    match id.split_once('-').map(|(ms, n)| (ms, n.parse::<u64>())) {
        Some((ms, Ok(n))) => format!("{ms}-{}", n + 1),
        _ => id.to_string(),
    }
}

/// Every outbox that holds entries, and how many: on a cluster the length
/// of each of the 16,384 slots' outboxes ([`SWEEP_CONCURRENCY`] at once),
/// standalone the one outbox (`None`).
pub async fn nonempty_outboxes(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    cluster: bool,
) -> Result<Vec<(Option<u16>, u64)>, crate::store::StoreError> {
    let slots: Vec<Option<u16>> = match cluster {
        true => (0..crate::store::SLOTS).map(Some).collect(),
        false => vec![None],
    };
    let mut found = Vec::new();
    for chunk in slots.chunks(SWEEP_CONCURRENCY) {
        let lengths = chunk.iter().map(|&slot| {
            let mut conn = conn.clone();
            let key = layout.outbox_key(slot);
            async move {
                let n: Result<u64, _> = redis::cmd("XLEN").arg(key).query_async(&mut conn).await;
                (slot, n)
            }
        });
        for (slot, n) in join_all(lengths).await {
            let n = n?;
            if n > 0 {
                found.push((slot, n));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::id_after;

    #[test]
    fn the_id_after_an_entry_is_its_sequence_plus_one() {
        assert_eq!(id_after("1700000000123-0"), "1700000000123-1");
        assert_eq!(id_after("5-41"), "5-42");
    }
}
