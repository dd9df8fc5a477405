//! Reading an entity's commutative state (counters, ledgers, sets) back
//! from Redis, in the form the model predicts (for `inspect`, `reconcile`
//! and the tests).

use std::collections::{BTreeMap, BTreeSet};

use super::{KeyLayout, RedisConn, StoreError};
use crate::effects::CommutativeView;

type Entry = (String, Vec<String>);

/// Reads `entity`'s counters and the named ledgers and sets.
pub async fn read(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    entity: &str,
    streams: &[String],
    sets: &[String],
) -> Result<CommutativeView, StoreError> {
    let keys = layout.entity(entity);
    let mut view = CommutativeView {
        counters: redis::cmd("HGETALL")
            .arg(keys.counters())
            .query_async(conn)
            .await?,
        ..CommutativeView::default()
    };
    for s in streams {
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(keys.ledger(s))
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
            .arg(keys.set(s))
            .query_async(conn)
            .await?;
        if !members.is_empty() {
            view.sets.insert(s.clone(), members);
        }
        let seqs: BTreeMap<String, u64> = redis::cmd("HGETALL")
            .arg(keys.set_seqs(s))
            .query_async(conn)
            .await?;
        if !seqs.is_empty() {
            view.set_seqs.insert(s.clone(), seqs);
        }
    }
    Ok(view)
}

/// What `idem inspect entity` shows of the commutative state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub counters: BTreeMap<String, String>,
    /// Stream → its length and newest entry.
    pub ledgers: BTreeMap<String, LedgerSummary>,
    /// Set → its size.
    pub sets: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerSummary {
    pub length: u64,
    /// The newest entry's stream id and fields.
    pub last_id: Option<String>,
    pub last: Vec<(String, String)>,
}

impl Summary {
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.ledgers.is_empty() && self.sets.is_empty()
    }
}

/// `entity`'s counters, and the length and newest entry of each named
/// ledger and the size of each named set that exists.
pub async fn summary(
    conn: &mut RedisConn,
    layout: &KeyLayout,
    entity: &str,
    streams: &[String],
    sets: &[String],
) -> Result<Summary, StoreError> {
    let keys = layout.entity(entity);
    let mut out = Summary {
        counters: redis::cmd("HGETALL")
            .arg(keys.counters())
            .query_async(conn)
            .await?,
        ..Summary::default()
    };
    for s in streams {
        let key = keys.ledger(s);
        let length: u64 = redis::cmd("XLEN").arg(&key).query_async(conn).await?;
        if length == 0 {
            continue;
        }
        let newest: Vec<Entry> = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let (last_id, last) = newest
            .into_iter()
            .next()
            .map_or((None, Vec::new()), |(id, flat)| {
                (
                    Some(id),
                    flat.chunks(2)
                        .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
                        .collect(),
                )
            });
        out.ledgers.insert(
            s.clone(),
            LedgerSummary {
                length,
                last_id,
                last,
            },
        );
    }
    for s in sets {
        let size: u64 = redis::cmd("SCARD")
            .arg(keys.set(s))
            .query_async(conn)
            .await?;
        if size > 0 {
            out.sets.insert(s.clone(), size);
        }
    }
    Ok(out)
}
