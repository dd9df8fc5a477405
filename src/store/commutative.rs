//! Reading an entity's commutative state (counters, ledgers, sets) back
//! from Redis, in the form the model predicts (for `inspect`, `reconcile`
//! and the tests).

use std::collections::{BTreeMap, BTreeSet};

use super::{KeyLayout, RedisConn, StoreError};
use crate::effects::{keys, CommutativeView};

type Entry = (String, Vec<String>);

/// Reads `entity`'s counters and the named ledgers and sets.
pub async fn read(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    entity: &str,
    streams: &[String],
    sets: &[String],
) -> Result<CommutativeView, StoreError> {
    let base = layout.entity_base(entity);
    let mut view = CommutativeView {
        counters: redis::cmd("HGETALL")
            .arg(keys::counters(&base))
            .query_async(conn)
            .await?,
        ..CommutativeView::default()
    };
    for s in streams {
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(keys::ledger(&base, s))
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await?;
        if !entries.is_empty() {
            let pairs = entries
                .into_iter()
                .map(|(_, flat)| {
                    flat.chunks(2)
                        .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
                        .collect()
                })
                .collect();
            view.ledgers.insert(s.clone(), pairs);
        }
    }
    for s in sets {
        let members: BTreeSet<String> = redis::cmd("SMEMBERS")
            .arg(keys::set(&base, s))
            .query_async(conn)
            .await?;
        if !members.is_empty() {
            view.sets.insert(s.clone(), members);
        }
        let seqs: BTreeMap<String, u64> = redis::cmd("HGETALL")
            .arg(keys::set_seqs(&base, s))
            .query_async(conn)
            .await?;
        if !seqs.is_empty() {
            view.set_seqs.insert(s.clone(), seqs);
        }
    }
    Ok(view)
}
