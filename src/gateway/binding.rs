//! The gateway's Redis steps, each one script in one slot: BIND a key to
//! its event, STORE the response once the broker acknowledged it (or
//! RELEASE the lease after a failed produce), SWEEP the bindings whose
//! holder went away, and READ an entity with what idem decided of a seq.

use std::time::Duration;

use redis::{FromRedisValue, Value};

use crate::guard::id_generations;
use crate::store::script::Builder;
use crate::store::{hash_slot, KeyLayout, RedisConn, StoreError};

/// What BIND found for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// A new binding: produce the event at `seq`, holding `token`.
    New { seq: u64, token: u64 },
    /// A binding whose holder's lease expired: produce its event again.
    Retake {
        seq: u64,
        token: u64,
        topic: String,
        body: String,
        /// Since this key was first answered busy (`409`), if it was.
        waited: Option<Duration>,
    },
    /// Done before: where the bound event was acknowledged (the stored
    /// response's parts), and how long since this key was first answered
    /// busy, if it was and nobody was told yet.
    Stored {
        seq: u64,
        topic: String,
        partition: i32,
        offset: i64,
        waited: Option<Duration>,
    },
    /// Another request holds the key for this long yet.
    Busy(Duration),
    /// The key is bound to another request (at `seq`).
    Conflict { seq: u64 },
    /// The entity has this many bound seqs the broker has not acknowledged,
    /// or the next seq would be more than [`MAX_UNACKED`] above the lowest
    /// of them (`lowest`).
    Full { unacked: u64, lowest: Option<u64> },
}

/// What STORE (or RELEASE) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    Stored,
    Released,
    /// Another holder took the key over: its answer counts.
    Fenced,
    /// Stored already (by another holder of the same event).
    Done,
    /// No binding: it expired, or Redis lost it.
    Gone,
}

/// A binding the sweeper took over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub binding: String,
    pub seq: u64,
    pub token: u64,
    pub topic: String,
    pub entity: String,
    pub body: String,
}

/// An entity as READ answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: Option<u64>,
    pub deleted: bool,
    /// `dense`: `<base>:<mark>`.
    pub dense: Option<String>,
    pub dense_above: Option<String>,
    pub dense_closed: Option<String>,
    pub state: Vec<(String, String)>,
    pub counters: Vec<(String, String)>,
    /// The id mark of the asked seq's event, if the window remembers it.
    pub id_mark: Option<Vec<u8>>,
}

/// The scripts and the layout they write under.
#[derive(Clone)]
pub struct Bindings {
    conn: RedisConn,
    layout: KeyLayout,
    cluster: bool,
    bind: redis::Script,
    store: redis::Script,
    sweep: redis::Script,
    read: redis::Script,
}

/// `text` after fenced.lua: the epoch check and the clock every script
/// that binds or takes over a seq starts with, written once.
fn fenced(name: &str, text: &str) -> redis::Script {
    let mut script = Builder::new(None, &[]);
    script
        .file("src/gateway/fenced.lua", include_str!("fenced.lua"))
        .file(name, text);
    redis::Script::new(script.finish().source())
}

/// The most bound seqs of one entity not yet acknowledged by the broker,
/// and the most a new seq may be above the lowest of them: under the dense
/// rule a 33rd later seq decided ahead of a seq closes its gap, and only
/// seqs bound before its event is acknowledged can be decided ahead of it.
pub const MAX_UNACKED: u64 = 32;

impl Bindings {
    pub fn new(conn: RedisConn, layout: KeyLayout) -> Bindings {
        Bindings {
            cluster: conn.is_cluster(),
            conn,
            layout,
            bind: fenced("src/gateway/bind.lua", include_str!("bind.lua")),
            store: redis::Script::new(include_str!("store.lua")),
            sweep: fenced("src/gateway/sweep.lua", include_str!("sweep.lua")),
            read: redis::Script::new(include_str!("read.lua")),
        }
    }

    pub fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    /// A handle on the same connection.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The cluster slot of `entity`'s keys (`None` on one server).
    fn slot(&self, entity: &str) -> Option<u16> {
        self.cluster
            .then(|| hash_slot(self.layout.entity_base(entity).as_bytes()))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        &self,
        epoch: &str,
        entity: &str,
        key_hash: &str,
        fingerprint: &str,
        topic: &str,
        body: &str,
        window: Duration,
        lease: Duration,
    ) -> Result<Bound, StoreError> {
        let keys = self.layout.entity(entity);
        let slot = self.slot(entity);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .bind
            .key(self.layout.epoch_key(slot))
            .key(keys.meta())
            .key(keys.gateway())
            .key(keys.gateway_binding(key_hash))
            .key(self.layout.gateway_pending_key(slot))
            .arg(epoch)
            .arg(fingerprint)
            .arg(topic)
            .arg(entity)
            .arg(body)
            .arg(window.as_millis() as u64)
            .arg(lease.as_millis() as u64)
            .arg(MAX_UNACKED)
            .invoke_async(&mut conn)
            .await?;
        parse_bound(&reply)
    }

    /// STORE where the brokers acknowledged the event, `(partition,
    /// offset)` (or RELEASE the lease, with `None`) as the holder of `token`.
    pub async fn keep(
        &self,
        entity: &str,
        binding: &str,
        token: u64,
        acknowledged: Option<(i32, i64)>,
    ) -> Result<Kept, StoreError> {
        let (partition, offset) = acknowledged
            .map(|(p, o)| (p.to_string(), o.to_string()))
            .unwrap_or_default();
        let slot = self.slot(entity);
        let mut conn = self.conn.clone();
        let reply: String = self
            .store
            .key(binding)
            .key(self.layout.entity(entity).gateway())
            .key(self.layout.gateway_pending_key(slot))
            .arg(token)
            .arg(partition)
            .arg(offset)
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply.as_str() {
            "stored" => Kept::Stored,
            "released" => Kept::Released,
            "fenced" => Kept::Fenced,
            "done" => Kept::Done,
            "gone" => Kept::Gone,
            other => return Err(StoreError::Protocol(format!("STORE answered {other:?}"))),
        })
    }

    /// Every pending set: the one of a server, or each slot's that exists.
    pub async fn pending_sets(&self) -> Result<Vec<String>, StoreError> {
        if !self.cluster {
            return Ok(vec![self.layout.gateway_pending_key(None)]);
        }
        let mut conn = self.conn.clone();
        conn.scan_keys(&self.layout.gateway_pending_pattern()).await
    }

    /// SWEEP one pending set: at most `limit` bindings whose lease expired.
    pub async fn sweep(
        &self,
        epoch: &str,
        pending: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Taken>, StoreError> {
        let slot = self.cluster.then(|| hash_slot(pending.as_bytes()));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .sweep
            .key(self.layout.epoch_key(slot))
            .key(pending)
            .arg(epoch)
            .arg(lease.as_millis() as u64)
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        reply
            .chunks(6)
            .map(|c| {
                Ok(Taken {
                    binding: text(c.first())?,
                    seq: number(c.get(1))?,
                    token: number(c.get(2))?,
                    topic: text(c.get(3))?,
                    entity: text(c.get(4))?,
                    body: text(c.get(5))?,
                })
            })
            .collect()
    }

    /// READ `entity`, with the id mark of `id` (an event id) if given, in
    /// the window generations of `window` at `now_ms`.
    pub async fn read(
        &self,
        entity: &str,
        id: Option<&str>,
        window: Duration,
        now_ms: u64,
    ) -> Result<Snapshot, StoreError> {
        let keys = self.layout.entity(entity);
        let generations = id_generations(now_ms, window);
        let id_hash = id.map(|id| crate::event::id_hash(id).to_be_bytes().to_vec());
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .read
            .key(keys.meta())
            .key(keys.state())
            .key(keys.counters())
            .key(keys.ids(generations.current))
            .key(keys.ids(generations.previous))
            .arg(id_hash.unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        let field = |i: usize| -> Result<Option<String>, StoreError> {
            Ok(Option::<String>::from_redis_value(
                reply.get(i).unwrap_or(&Value::Nil),
            )?)
        };
        let pairs = |i: usize| -> Result<Vec<(String, String)>, StoreError> {
            let flat = Vec::<String>::from_redis_value(reply.get(i).unwrap_or(&Value::Nil))?;
            Ok(flat
                .chunks(2)
                .filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone())))
                .collect())
        };
        let mark = |i: usize| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(Option::<Vec<u8>>::from_redis_value(
                reply.get(i).unwrap_or(&Value::Nil),
            )?)
        };
        Ok(Snapshot {
            seq: field(0)?.and_then(|s| s.parse().ok()),
            deleted: field(1)?.as_deref() == Some("1"),
            dense: field(2)?,
            dense_above: field(3)?,
            dense_closed: field(4)?,
            state: pairs(5)?,
            counters: pairs(6)?,
            id_mark: mark(7)?.or(mark(8)?),
        })
    }
}

fn text(v: Option<&Value>) -> Result<String, StoreError> {
    Ok(String::from_redis_value(v.unwrap_or(&Value::Nil))?)
}

fn number(v: Option<&Value>) -> Result<u64, StoreError> {
    Ok(u64::from_redis_value(v.unwrap_or(&Value::Nil))?)
}

/// A `waited` field: ms, or empty for none.
fn waited(v: Option<&Value>) -> Option<Duration> {
    text(v).ok()?.parse().ok().map(Duration::from_millis)
}

/// BIND's reply, read.
fn parse_bound(reply: &[Value]) -> Result<Bound, StoreError> {
    let what = text(reply.first())?;
    Ok(match what.as_str() {
        "new" => Bound::New {
            seq: number(reply.get(1))?,
            token: number(reply.get(2))?,
        },
        "retake" => Bound::Retake {
            seq: number(reply.get(1))?,
            token: number(reply.get(2))?,
            topic: text(reply.get(3))?,
            body: text(reply.get(4))?,
            waited: waited(reply.get(5)),
        },
        "stored" => Bound::Stored {
            seq: number(reply.get(1))?,
            topic: text(reply.get(2))?,
            partition: i32::from_redis_value(reply.get(3).unwrap_or(&Value::Nil))?,
            offset: i64::from_redis_value(reply.get(4).unwrap_or(&Value::Nil))?,
            waited: waited(reply.get(5)),
        },
        "busy" => Bound::Busy(Duration::from_millis(number(reply.get(1))?)),
        "conflict" => Bound::Conflict {
            seq: number(reply.get(1))?,
        },
        "full" => Bound::Full {
            unacked: number(reply.get(1))?,
            lowest: number(reply.get(2)).ok(),
        },
        other => return Err(StoreError::Protocol(format!("BIND answered {other:?}"))),
    })
}
