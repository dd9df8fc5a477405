//! The guard: dedupe check, sequence check and effect as one atomic Redis
//! script (the files of `lua/`, beside this file, joined by [`script`]),
//! called for many events per round trip.
//!
//! Guarantee: for each event, the decision and its effect happen in one
//! script execution, so there is no moment where an id is remembered and its
//! effect is not, or the reverse. Calling `apply` again with the same events
//! (a retry after a lost reply) changes nothing: they come back `duplicate`.

use std::time::Duration;

use redis::Value;

use crate::effects::Snippet;
pub use crate::model::{GuardInput, Outcome, Place, Verdict};
use crate::store::progress::epoch_refusal;
use crate::store::script::Script;
use crate::store::{
    hash_slot, DurableWait, EntityKeys, KeyLayout, NodeAddr, RedisConn, SlotMap, StoreError,
};

mod args;
mod outbox;
mod plan;
mod reply;
pub mod script;
mod send;

use args::{contexts, push_event_args, Context, EffectParts};
pub use plan::{chunk_by_entity, chunk_by_slot, id_generations, IdGenerations};
use reply::{check_durable, script_items, verdicts_by_chunk};
use send::{is_noscript, send_as_built};

/// An error raised inside the script, its place named by file and line
/// (`user_script:<line>` means nothing to a reader).
fn located(e: StoreError, script: &Script) -> StoreError {
    match e {
        StoreError::Redis(error) if error.to_string().contains("user_script:") => {
            StoreError::Script {
                located: script.locate(&error.to_string()),
                error,
            }
        }
        other => other,
    }
}

/// A custom effect that does not compile (refused at start).
#[derive(Debug, thiserror::Error)]
#[error("custom effect {file} does not compile: {message}. Fix the snippet (docs/effects.md says what it receives and returns) and start again")]
pub struct SnippetError {
    pub file: String,
    pub message: String,
}

/// Compiles every custom effect in Redis before anything runs, so a
/// snippet with a syntax error stops the start instead of every batch.
/// Errors name the snippet's own file and line. A Redis that cannot answer
/// now is only logged: the script is compiled again on first use.
pub async fn check_snippets(
    conn: &mut RedisConn,
    snippets: &[Snippet],
) -> Result<(), SnippetError> {
    for snippet in snippets {
        let check = script::compile_check(snippet);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(check.source()).arg(0);
        match cmd.query_async::<Value>(conn).await {
            Ok(_) => {}
            Err(e) if is_compile_refusal(&e) => {
                return Err(SnippetError {
                    file: snippet.file.clone(),
                    message: check.locate(&e.to_string()),
                })
            }
            Err(e) => {
                tracing::warn!(file = %snippet.file, error = %e, "could not compile the custom effect now; it is compiled on first use")
            }
        }
    }
    Ok(())
}

/// Whether Redis answered a request to compile a script with a refusal (a
/// plain `ERR` reply: the Lua does not compile), rather than not answering.
pub fn is_compile_refusal(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::ResponseError
}

/// How long a cluster's slot map is used before it is read again.
const SLOT_MAP_MAX_AGE: Duration = Duration::from_secs(5);

/// Runs the guard script against one Redis.
pub struct Guard {
    conn: RedisConn,
    /// The script with the custom effects in it, and its SHA.
    source: std::sync::Arc<Script>,
    script: redis::Script,
    snippets: Vec<Snippet>,
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
    /// The epoch marker's value idem knows: every call is refused, before
    /// any write, where the marker differs (Redis lost its state since).
    epoch: String,
    /// The deepest outbox the last rings measured: its slot and length.
    deepest_outbox: std::sync::Arc<std::sync::Mutex<(Option<u16>, u64)>>,
}

impl Guard {
    /// `epoch`: what `ProgressStore::establish_epoch` answered.
    pub fn new(
        conn: RedisConn,
        layout: KeyLayout,
        events_per_script: usize,
        epoch: String,
    ) -> Self {
        // Put together and hashed once per process: restarts of consumption
        // make new guards.
        static PLAIN: std::sync::LazyLock<(std::sync::Arc<Script>, redis::Script)> =
            std::sync::LazyLock::new(|| {
                let source = script::assemble(&[], script::Ending::from_env());
                let hashed = redis::Script::new(source.source());
                (source.into(), hashed)
            });
        Guard {
            conn,
            script: PLAIN.1.clone(),
            source: PLAIN.0.clone(),
            snippets: Vec::new(),
            layout,
            events_per_script: events_per_script.max(1),
            wait: DurableWait::None,
            wait_timeout_ms: 1000,
            slot_map: None,
            batch_token: [0; 4],
            batches: 0,
            epoch,
            deepest_outbox: Default::default(),
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

    /// Runs the custom effects (`effects.snippets`) in the script.
    pub fn with_snippets(mut self, snippets: &[Snippet]) -> Self {
        if snippets.is_empty() {
            // The plain script (or the benchmark's stub) is in place.
            return self;
        }
        let source = script::assemble(snippets, script::Ending::Run);
        self.script = redis::Script::new(source.source());
        self.source = source.into();
        self.snippets = snippets.to_vec();
        self
    }

    /// `text` (an error Redis returned) with each place in the script
    /// named by its file and line.
    pub fn locate(&self, text: &str) -> String {
        self.source.locate(text)
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
    /// `events_per_script` per script call: on one server sent as they are
    /// built (`send_as_built`; with a durable wait, in one pipeline with
    /// it), on a cluster in one pipeline per master.
    /// An error means any subset may have been applied; calling again is
    /// safe. `EpochChanged`: the calls that met a changed marker wrote nothing.
    pub async fn apply(&mut self, inputs: &[GuardInput<'_>]) -> Result<Vec<Verdict>, StoreError> {
        let epoch = self.epoch.clone();
        let verdicts = self
            .apply_unchecked(inputs)
            .await
            .map_err(|e| located(epoch_refusal(e, &epoch), &self.source))?;
        self.ring_outboxes(inputs);
        Ok(verdicts)
    }

    async fn apply_unchecked(
        &mut self,
        inputs: &[GuardInput<'_>],
    ) -> Result<Vec<Verdict>, StoreError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        if self.conn.is_cluster() {
            return self.apply_cluster(inputs).await;
        }
        let chunks = chunk_by_entity(inputs, self.events_per_script);
        // With a durable wait the calls and the wait go in one pipeline: one
        // pass on one connection, so the wait's answer stands for the calls
        // (sent apart, a reconnect in between could take the wait to another
        // server, e.g. a new master behind the same address).
        let sent = if self.wait == DurableWait::None {
            let calls = chunks.iter().map(|c| self.script_cmd(inputs, c, None));
            send_as_built(&self.conn, Box::new(calls)).await
        } else {
            self.conn
                .pipeline_on(&None, &self.build_pipeline(inputs, &chunks))
                .await
        };
        let mut replies = match sent {
            Err(e) if is_noscript(&e) => {
                // Redis restarted or was flushed: load once and resend all
                // (calls that ran come back as this batch's duplicates).
                self.load_script().await?;
                self.conn
                    .pipeline_on(&None, &self.build_pipeline(inputs, &chunks))
                    .await?
            }
            other => other?,
        };
        if self.wait != DurableWait::None {
            check_durable(self.wait, &replies.pop().unwrap_or(Value::Nil))?;
            replies.pop(); // the barrier's count
        }
        let (verdicts, depths) = verdicts_by_chunk(&chunks, &script_items(replies)?, inputs.len())?;
        self.note_outbox_depths(depths.into_iter().map(|d| (None, d)));
        Ok(verdicts)
    }

    /// Every call of `chunks` in one pipeline, ended by the durable wait if
    /// one is configured: a barrier write, then `WAIT`/`WAITAOF`. The
    /// barrier makes the wait cover the batch even when it wrote nothing else.
    fn build_pipeline(&self, inputs: &[GuardInput<'_>], chunks: &[Vec<usize>]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for chunk in chunks {
            pipe.add_command(self.script_cmd(inputs, chunk, None));
        }
        if self.wait != DurableWait::None {
            pipe.cmd("INCR").arg(self.layout.durability_barrier_key());
            pipe.add_command(self.wait_cmd());
        }
        pipe
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
        let (verdicts, depths) = verdicts_by_chunk(&chunks, &replies, inputs.len())?;
        let slots = chunks.iter().map(|c| Some(self.slot_of(inputs, c)));
        self.note_outbox_depths(slots.zip(depths));
        Ok(verdicts)
    }

    /// The hash slot of a chunk's events (one slot per chunk on a cluster).
    fn slot_of(&self, inputs: &[GuardInput<'_>], chunk: &[usize]) -> u16 {
        hash_slot(
            self.layout
                .entity_base(&inputs[chunk[0]].event.entity)
                .as_bytes(),
        )
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
        let slot_of = |chunk: &[usize]| self.slot_of(inputs, chunk);
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
                        let source = (with_source && n == 0).then_some(this.source.source());
                        pipe.add_command(this.script_cmd(inputs, &chunks[c], source));
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
                    Err(e) if is_noscript(&e) => conn.pipeline_on(&node, &pipeline(true)).await?,
                    other => other?,
                };
                if this.wait != DurableWait::None {
                    check_durable(this.wait, &replies.pop().unwrap_or(Value::Nil))?;
                    replies.pop(); // the barrier's count
                }
                let scripts = script_items(replies)?;
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

    /// How the guard script parses one call of `inputs`, as the script itself
    /// reports it (JSON: per event its keys, head, state fields and
    /// mutations by name). Nothing is written. tests/guard.rs holds the
    /// encoder to it for every mutation kind, so the two cannot drift.
    pub async fn parsed_by_script(
        &mut self,
        inputs: &[GuardInput<'_>],
    ) -> Result<serde_json::Value, StoreError> {
        let report = script::assemble(&self.snippets, script::Ending::Report);
        let chunk: Vec<usize> = (0..inputs.len()).collect();
        // The same call, with report.lua in place of main.lua.
        let cmd = self.script_cmd(inputs, &chunk, Some(report.source()));
        let json: String = cmd.query_async(&mut self.conn).await?;
        serde_json::from_str(&json).map_err(|e| StoreError::Protocol(format!("parse report: {e}")))
    }

    /// One call of the script for `chunk`: `EVAL source` when a source is
    /// given (it loads the script), `EVALSHA` otherwise.
    fn script_cmd(
        &self,
        inputs: &[GuardInput<'_>],
        chunk: &[usize],
        source: Option<&str>,
    ) -> redis::Cmd {
        let mut cmd = if let Some(source) = source {
            let mut c = redis::cmd("EVAL");
            c.arg(source);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.script.get_hash());
            c
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entities: Vec<EntityKeys> = chunk
            .iter()
            .map(|&i| self.layout.entity(&inputs[i].event.entity))
            .collect();
        let generations: Vec<IdGenerations> = chunk
            .iter()
            .map(|&i| id_generations(now_ms, inputs[i].policy.window))
            .collect();
        let parts: Vec<EffectParts> = chunk
            .iter()
            .zip(&entities)
            .map(|(&i, keys)| {
                let input = &inputs[i];
                EffectParts::new(keys, input.event, input.effects, input.policy.per_field())
            })
            .collect();
        let keys = 2 + 4 * chunk.len() + parts.iter().map(|p| p.keys.len()).sum::<usize>();
        cmd.arg(keys);
        // The keys come first (the marker and the outbox of the call's
        // slot, then the events'), the args after.
        let slot = self
            .conn
            .is_cluster()
            .then(|| hash_slot(entities[0].base().as_bytes()));
        cmd.arg(self.layout.epoch_key(slot))
            .arg(self.layout.outbox_key(slot));
        for ((keys, ids), part) in entities.iter().zip(&generations).zip(&parts) {
            cmd.arg(keys.meta())
                .arg(keys.state())
                .arg(keys.ids(ids.current))
                .arg(keys.ids(ids.previous));
            for key in &part.keys {
                cmd.arg(key);
            }
        }
        cmd.arg(&self.batch_token[..]).arg(&self.epoch);
        let (distinct, context_of) = contexts(
            chunk
                .iter()
                .zip(&generations)
                .map(|(&i, ids)| Context::of(&inputs[i], ids.expire_at_ms)),
        );
        cmd.arg(distinct.len());
        for context in &distinct {
            context.push_args(&mut cmd);
        }
        for ((&i, context), part) in chunk.iter().zip(context_of).zip(&parts) {
            push_event_args(&mut cmd, &inputs[i], context, part);
        }
        cmd
    }
}
