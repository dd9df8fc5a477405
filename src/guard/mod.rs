//! The guard: dedupe check, sequence check and effect as one atomic Redis
//! script (`guard.lua`, beside this file), called for many events per round trip.
//!
//! Guarantee: for each event, the decision and its effect happen in one
//! script execution, so there is no moment where an id is remembered and its
//! effect is not, or the reverse. Calling `apply` again with the same events
//! (a retry after a lost reply) changes nothing: they come back `duplicate`.

use std::time::Duration;

use redis::Value;

use crate::event::{id_hash, Event, Op};
use crate::model::Outcome;
use crate::store::{hash_slot, DurableWait, KeyLayout, NodeAddr, RedisConn, SlotMap, StoreError};

const SCRIPT: &str = include_str!("guard.lua");

/// The guard's answer for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// For a duplicate: how long after its first sighting it arrived.
    pub duplicate_age: Option<Duration>,
    /// For a conflict: the fingerprint remembered for the id.
    pub remembered_fingerprint: Option<u64>,
    /// For a duplicate first seen by an earlier attempt of the same batch
    /// (whose reply was lost): what that attempt decided, applied or stale.
    pub earlier_attempt: Option<Outcome>,
}

/// One event to guard, with the dedupe window of its topic.
#[derive(Debug, Clone, Copy)]
pub struct GuardInput<'a> {
    pub event: &'a Event,
    pub window: Duration,
}

/// How long a cluster's slot map is used before it is read again.
const SLOT_MAP_MAX_AGE: Duration = Duration::from_secs(5);

/// Runs the guard script against one Redis.
pub struct Guard {
    conn: RedisConn,
    script: redis::Script,
    layout: KeyLayout,
    events_per_script: usize,
    wait: DurableWait,
    wait_timeout_ms: u64,
    /// Cluster: which master owns which slot, and when
    /// it was read (read again when old, dropped after any failure).
    slot_map: Option<(SlotMap, std::time::Instant)>,
    /// Written into every id mark: the same for every attempt of one batch
    /// (see `begin_batch`), so a retry recognises what its lost attempt did.
    batch_token: [u8; 4],
    batches: u32,
}

impl Guard {
    pub fn new(conn: RedisConn, layout: KeyLayout, events_per_script: usize) -> Self {
        Guard {
            conn,
            script: redis::Script::new(SCRIPT),
            layout,
            events_per_script: events_per_script.max(1),
            wait: DurableWait::None,
            wait_timeout_ms: 1000,
            slot_map: None,
            batch_token: [0; 4],
            batches: 0,
        }
        .with_new_token()
    }

    fn with_new_token(mut self) -> Self {
        self.begin_batch();
        self
    }

    /// Starts a new batch: the calls until the next `begin_batch` are
    /// attempts of the same batch (a retry after a lost reply), and their
    /// verdicts say which duplicates an earlier attempt decided.
    pub fn begin_batch(&mut self) {
        self.batches = self.batches.wrapping_add(1);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        let token =
            nanos ^ self.batches.wrapping_mul(0x9e37_79b9) ^ std::process::id().rotate_left(16);
        self.batch_token = token.to_be_bytes();
    }

    /// Makes every batch wait for replicas or an fsync before it counts as done.
    pub fn with_durable_wait(mut self, wait: DurableWait, timeout: Duration) -> Self {
        self.wait = wait;
        self.wait_timeout_ms = timeout.as_millis().max(1) as u64;
        self
    }

    /// Replaces the connection (after repeated failures, a fresh one can
    /// recover where a long-lived client stays stuck, e.g. after a cluster
    /// topology change).
    pub fn replace_connection(&mut self, conn: RedisConn) {
        self.conn = conn;
        self.slot_map = None;
    }

    /// Loads the script into Redis (done lazily on `NOSCRIPT` too; on a
    /// cluster each node loads it on first use).
    pub async fn load_script(&mut self) -> Result<(), StoreError> {
        if !self.conn.is_cluster() {
            self.script.load_async(&mut self.conn).await?;
        }
        Ok(())
    }

    /// Guards `inputs` in order, returning one verdict each. Events are sent
    /// `events_per_script` per script call, all calls in one pipeline.
    /// An error means any subset may have been applied; calling again is safe.
    pub async fn apply(&mut self, inputs: &[GuardInput<'_>]) -> Result<Vec<Verdict>, StoreError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        if self.conn.is_cluster() {
            return self.apply_cluster(inputs).await;
        }
        let chunks = chunk_by_entity(inputs, self.events_per_script);
        let pipe = self.build_pipeline(inputs, &chunks);
        let mut replies: Vec<Value> = match pipe.query_async(&mut self.conn).await {
            Ok(r) => r,
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                // Redis restarted or was flushed: load once and resend.
                self.load_script().await?;
                pipe.query_async(&mut self.conn).await?
            }
            Err(e) => return Err(e.into()),
        };
        if self.wait != DurableWait::None {
            let reply = replies.pop().unwrap_or(Value::Nil);
            check_durable(self.wait, &reply)?;
        }
        let replies: Vec<Vec<Value>> = replies
            .into_iter()
            .map(|v| match v {
                Value::Array(items) => Ok(items),
                other => Err(StoreError::Protocol(format!("guard reply {other:?}"))),
            })
            .collect::<Result<_, _>>()?;
        let in_chunk_order = parse_replies(&replies, inputs.len())?;
        // Back to input order.
        let mut verdicts = vec![None; inputs.len()];
        for (&i, v) in chunks.iter().flatten().zip(in_chunk_order) {
            verdicts[i] = Some(v);
        }
        Ok(verdicts
            .into_iter()
            .map(|v| v.expect("every input is in one chunk"))
            .collect())
    }

    /// Redis Cluster: one call per hash slot (a script may only touch one
    /// slot), sent concurrently; each is routed to the slot's owner. An
    /// entity's events are all in its slot's call, in order.
    async fn apply_cluster(
        &mut self,
        inputs: &[GuardInput<'_>],
    ) -> Result<Vec<Verdict>, StoreError> {
        let chunks = chunk_by_slot(inputs, &self.layout);
        let replies = match self.apply_per_master(inputs, &chunks).await {
            Ok(replies) => replies,
            Err(e) => {
                // The slots may have moved: read the map again before the retry.
                self.slot_map = None;
                return Err(e);
            }
        };
        verdicts_by_chunk(&chunks, replies.into_iter().map(Ok), inputs.len())
    }

    /// Redis Cluster: the slots' calls (a script may touch one slot only)
    /// grouped by the master that owns them, and for each master its calls
    /// in one pipeline sent to it by address, all masters concurrently: one
    /// round trip per master per batch. With a durable wait the pipeline
    /// ends with a barrier write and WAIT / WAITAOF: one wait per master per
    /// batch, always on the connection that ran the scripts. A retry
    /// resends the scripts too, so a WAIT reply never stands for writes that
    /// went elsewhere (a failover makes the scripts fail on the old address,
    /// or run again on the new master). A slot that moved answers MOVED: the
    /// batch is retried with a fresh map.
    async fn apply_per_master(
        &mut self,
        inputs: &[GuardInput<'_>],
        chunks: &[Vec<usize>],
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        // Read again now and then: a redirected pipeline succeeds on the new
        // owner, but each batch would first pay a round trip to the old one.
        if self
            .slot_map
            .as_ref()
            .is_none_or(|(_, read)| read.elapsed() > SLOT_MAP_MAX_AGE)
        {
            self.slot_map = self
                .conn
                .slot_map()
                .await?
                .map(|m| (m, std::time::Instant::now()));
        }
        let map = self.slot_map.clone().map(|(m, _)| m).unwrap_or_default();
        let slot_of = |chunk: &[usize]| {
            hash_slot(
                self.layout
                    .entity_base(&inputs[chunk[0]].event.entity)
                    .as_bytes(),
            )
        };
        let mut by_node: std::collections::BTreeMap<NodeAddr, Vec<usize>> = Default::default();
        for (c, chunk) in chunks.iter().enumerate() {
            let slot = slot_of(chunk);
            let node = map.owner(slot).cloned().ok_or_else(|| {
                StoreError::Protocol(format!("slot {slot} has no master in CLUSTER SLOTS"))
            })?;
            by_node.entry(node).or_default().push(c);
        }
        let this = &*self;
        let calls = by_node.into_iter().map(|(node, mine)| {
            let mut conn = this.conn.clone();
            let barrier = this.layout.slot_barrier_key(slot_of(&chunks[mine[0]]));
            async move {
                let pipeline = |with_source: bool| {
                    let mut pipe = redis::pipe();
                    for (n, &c) in mine.iter().enumerate() {
                        // One EVAL loads the script for the EVALSHAs after it.
                        pipe.add_command(this.script_cmd(
                            inputs,
                            &chunks[c],
                            with_source && n == 0,
                        ));
                    }
                    if this.wait != DurableWait::None {
                        pipe.cmd("INCR").arg(&barrier);
                        pipe.add_command(this.wait_cmd());
                    }
                    pipe
                };
                let node = Some(node);
                let mut replies = match conn.pipeline_on(&node, &pipeline(false)).await {
                    // This node has not seen the script yet: EVAL loads it.
                    Err(StoreError::Redis(e)) if e.kind() == redis::ErrorKind::NoScriptError => {
                        conn.pipeline_on(&node, &pipeline(true)).await?
                    }
                    other => other?,
                };
                if this.wait != DurableWait::None {
                    check_durable(this.wait, &replies.pop().unwrap_or(Value::Nil))?;
                    replies.pop(); // the barrier's count
                }
                let scripts = replies
                    .into_iter()
                    .map(|v| match v {
                        Value::Array(items) => Ok(items),
                        other => Err(StoreError::Protocol(format!("guard reply {other:?}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StoreError>(mine.into_iter().zip(scripts).collect::<Vec<_>>())
            }
        });
        let mut out = vec![Vec::new(); chunks.len()];
        for node_replies in futures_util::future::join_all(calls).await {
            for (c, items) in node_replies? {
                out[c] = items;
            }
        }
        Ok(out)
    }

    /// WAIT or WAITAOF for the configured durability.
    fn wait_cmd(&self) -> redis::Cmd {
        let mut c = match self.wait {
            DurableWait::Replicas(n) => {
                let mut c = redis::cmd("WAIT");
                c.arg(n);
                c
            }
            DurableWait::LocalAof | DurableWait::None => {
                let mut c = redis::cmd("WAITAOF");
                c.arg(1).arg(0);
                c
            }
        };
        c.arg(self.wait_timeout_ms);
        c
    }

    fn script_cmd(
        &self,
        inputs: &[GuardInput<'_>],
        chunk: &[usize],
        with_source: bool,
    ) -> redis::Cmd {
        let mut cmd = if with_source {
            let mut c = redis::cmd("EVAL");
            c.arg(SCRIPT);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.script.get_hash());
            c
        };
        cmd.arg(chunk.len() * 4);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // (generation, expiry) per event: the keys come first, the args after.
        let windows: Vec<(u64, u64)> = chunk
            .iter()
            .map(|&i| {
                let window = inputs[i].window.as_millis().max(1) as u64;
                let generation = now_ms / window;
                (generation, (generation + 2) * window)
            })
            .collect();
        for (&i, (generation, _)) in chunk.iter().zip(&windows) {
            let base = self.layout.entity_base(&inputs[i].event.entity);
            cmd.arg(format!("{base}:meta"))
                .arg(format!("{base}:state"))
                .arg(format!("{base}:ids:{generation}"))
                .arg(format!("{base}:ids:{}", generation.saturating_sub(1)));
        }
        cmd.arg(&self.batch_token[..]);
        for (&i, (_, expire_at)) in chunk.iter().zip(&windows) {
            push_event_args(&mut cmd, &inputs[i], *expire_at);
        }
        cmd
    }

    fn build_pipeline(&self, inputs: &[GuardInput<'_>], chunks: &[Vec<usize>]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for chunk in chunks {
            pipe.add_command(self.script_cmd(inputs, chunk, false));
        }
        if self.wait != DurableWait::None {
            // WAIT/WAITAOF only cover this connection's writes; a batch of
            // duplicates writes nothing, so write something to make the wait
            // cover everything sent on this connection before it.
            pipe.cmd("INCR")
                .arg(self.layout.durability_barrier_key())
                .ignore();
        }
        if self.wait != DurableWait::None {
            pipe.add_command(self.wait_cmd());
        }
        pipe
    }
}

/// Verdicts in input order from each chunk's script reply items.
fn verdicts_by_chunk(
    chunks: &[Vec<usize>],
    replies: impl Iterator<Item = Result<Vec<Value>, StoreError>>,
    inputs: usize,
) -> Result<Vec<Verdict>, StoreError> {
    let mut verdicts = vec![None; inputs];
    for (chunk, reply) in chunks.iter().zip(replies) {
        let parsed = parse_replies(&[reply?], chunk.len())?;
        for (&i, v) in chunk.iter().zip(parsed) {
            verdicts[i] = Some(v);
        }
    }
    Ok(verdicts
        .into_iter()
        .map(|v| v.expect("every input is in one chunk"))
        .collect())
}

/// Whether the WAIT / WAITAOF reply confirms durability.
fn check_durable(wait: DurableWait, reply: &Value) -> Result<(), StoreError> {
    let ok = match (wait, reply) {
        (DurableWait::Replicas(n), Value::Int(acked)) => *acked >= i64::from(n),
        (DurableWait::LocalAof, Value::Array(counts)) => {
            matches!(counts.first(), Some(Value::Int(local)) if *local >= 1)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        // The effects are in Redis but not durable yet: the batch is retried
        // (coming back as duplicates) and its offsets wait.
        Err(StoreError::NotDurable(format!(
            "{wait:?} answered {reply:?}"
        )))
    }
}

/// One call per hash slot, events in batch order within each.
pub fn chunk_by_slot(inputs: &[GuardInput<'_>], layout: &KeyLayout) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut chunk_of: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let slot = hash_slot(layout.entity_base(&input.event.entity).as_bytes());
        let c = *chunk_of.entry(slot).or_insert_with(|| {
            chunks.push(Vec::new());
            chunks.len() - 1
        });
        chunks[c].push(i);
    }
    chunks
}

/// Splits a batch into script calls of about `per_call` events, keeping all
/// events of one entity in the same call, in their order.
///
/// Why: Redis runs every call of a pipeline even when one fails halfway, and
/// the batch is then retried. If an entity's events were spread over two
/// calls and the first failed, the second would apply its newer events
/// first, and the retry would find the older ones stale: a reordering.
/// With one call per entity per batch, a retry resumes each entity exactly
/// where it stopped.
///
/// | batch (entities)      | per_call | calls                 |
/// |-----------------------|----------|-----------------------|
/// | a b c d               | 2        | [a b] [c d]           |
/// | a b a c               | 2        | [a b a] [c]           |
/// | a a a b               | 2        | [a a a] [b]           |
pub fn chunk_by_entity(inputs: &[GuardInput<'_>], per_call: usize) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut chunk_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut open: Option<usize> = None;
    for (i, input) in inputs.iter().enumerate() {
        let entity = input.event.entity.as_str();
        if let Some(&c) = chunk_of.get(entity) {
            chunks[c].push(i);
            continue;
        }
        let c = match open {
            Some(c) if chunks[c].len() < per_call => c,
            _ => {
                chunks.push(Vec::with_capacity(per_call));
                open = Some(chunks.len() - 1);
                chunks.len() - 1
            }
        };
        chunks[c].push(i);
        chunk_of.insert(entity, c);
    }
    chunks
}

fn push_event_args(cmd: &mut redis::Cmd, input: &GuardInput<'_>, expire_at_ms: u64) {
    let e = input.event;
    cmd.arg(expire_at_ms)
        .arg(&e.id)
        .arg(&id_hash(&e.id).to_be_bytes()[..])
        .arg(&e.fingerprint.to_be_bytes()[..])
        .arg(format!("{:016x}", e.fingerprint))
        .arg(e.seq)
        .arg(match e.op {
            Op::Upsert => "u",
            Op::Delete => "d",
        })
        .arg(e.set.len());
    for (k, v) in &e.set {
        cmd.arg(k).arg(v);
    }
    cmd.arg(e.unset.len());
    for k in &e.unset {
        cmd.arg(k);
    }
}

fn parse_replies(replies: &[Vec<Value>], expected: usize) -> Result<Vec<Verdict>, StoreError> {
    let mut verdicts = Vec::with_capacity(expected);
    for reply in replies {
        if reply.len() % 2 != 0 {
            return Err(StoreError::Protocol(format!(
                "guard reply of odd length {}",
                reply.len()
            )));
        }
        for pair in reply.chunks(2) {
            verdicts.push(parse_verdict(&pair[0], &pair[1])?);
        }
    }
    if verdicts.len() != expected {
        return Err(StoreError::Protocol(format!(
            "guard returned {} verdicts for {expected} events",
            verdicts.len()
        )));
    }
    Ok(verdicts)
}

fn parse_verdict(code: &Value, detail: &Value) -> Result<Verdict, StoreError> {
    let plain = |outcome| Verdict {
        outcome,
        duplicate_age: None,
        remembered_fingerprint: None,
        earlier_attempt: None,
    };
    match (code, detail) {
        (Value::Int(0), _) => Ok(plain(Outcome::Applied)),
        (Value::Int(code @ 1 | code @ 4 | code @ 5), Value::Int(age_ms)) => Ok(Verdict {
            duplicate_age: Some(Duration::from_millis((*age_ms).max(0) as u64)),
            earlier_attempt: match code {
                4 => Some(Outcome::Applied),
                5 => Some(Outcome::Stale),
                _ => None,
            },
            ..plain(Outcome::Duplicate)
        }),
        (Value::Int(2), _) => Ok(plain(Outcome::Stale)),
        (Value::Int(3), Value::BulkString(fp)) if fp.len() == 8 => Ok(Verdict {
            remembered_fingerprint: Some(u64::from_be_bytes(fp[..8].try_into().expect("8 bytes"))),
            ..plain(Outcome::Conflict)
        }),
        other => Err(StoreError::Protocol(format!(
            "unexpected guard verdict {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_each_entity_in_one_call() {
        let ev = |entity: &str| Event {
            id: String::new(),
            entity: entity.into(),
            seq: 0,
            op: Op::Upsert,
            set: vec![],
            unset: vec![],
            fingerprint: 0,
        };
        type Row = (&'static [&'static str], usize, &'static [&'static [usize]]);
        let table: &[Row] = &[
            (&["a", "b", "c", "d"], 2, &[&[0, 1], &[2, 3]]),
            (&["a", "b", "a", "c"], 2, &[&[0, 1, 2], &[3]]),
            (&["a", "a", "a", "b"], 2, &[&[0, 1, 2], &[3]]),
            (&["a", "b", "c", "a"], 1, &[&[0, 3], &[1], &[2]]),
        ];
        for (entities, per_call, want) in table {
            let events: Vec<Event> = entities.iter().map(|e| ev(e)).collect();
            let inputs: Vec<GuardInput<'_>> = events
                .iter()
                .map(|event| GuardInput {
                    event,
                    window: Duration::from_secs(1),
                })
                .collect();
            let got = chunk_by_entity(&inputs, *per_call);
            let want: Vec<Vec<usize>> = want.iter().map(|c| c.to_vec()).collect();
            assert_eq!(got, want, "{entities:?}");
        }
    }

    #[test]
    fn verdicts_parse_by_table() {
        let fp = 0x0102030405060708u64.to_be_bytes().to_vec();
        let replies = vec![
            vec![
                Value::Int(0),
                Value::Int(0),
                Value::Int(1),
                Value::Int(1500),
            ],
            vec![
                Value::Int(2),
                Value::BulkString(b"7".to_vec()),
                Value::Int(3),
                Value::BulkString(fp),
            ],
        ];
        let v = parse_replies(&replies, 4).unwrap();
        assert_eq!(
            v.iter().map(|v| v.outcome).collect::<Vec<_>>(),
            vec![
                Outcome::Applied,
                Outcome::Duplicate,
                Outcome::Stale,
                Outcome::Conflict
            ]
        );
        assert_eq!(v[1].duplicate_age, Some(Duration::from_millis(1500)));
        assert_eq!(v[3].remembered_fingerprint, Some(0x0102030405060708));
        assert!(parse_replies(&replies, 5).is_err());
        assert!(parse_replies(&[vec![Value::Int(9), Value::Int(0)]], 1).is_err());
    }
}
