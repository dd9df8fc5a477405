//! The guard script held to the pure model (`idem::model`) on random
//! sequences against a real Redis: every verdict and every entity's state,
//! counters, ledger and sets, with a random mix of every built-in effect.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use idem::config::TopicPolicy;
use idem::effects::{Amount, Effects, Mutation, StateEffect, StateOrder};
use idem::event::{Event, Op};
use idem::guard::{Guard, GuardInput, Place};
use idem::model::{Model, Outcome};
use idem::store::progress::ProgressStore;
use idem::store::KeyLayout;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// A random amount: mostly small with 0 or 2 decimals, sometimes 30 or 37
/// digits (so sums pass 38 digits and are rejected).
fn random_amount(rng: &mut StdRng, scale: u8) -> Amount {
    let magnitude: i128 = match rng.random_range(0..20) {
        0 => 10i128.pow(29) + i128::from(rng.random::<u32>()),
        1 => 10i128.pow(37) * i128::from(rng.random_range(1..10u32)),
        _ => i128::from(rng.random_range(0..100_000u32)),
    };
    let units = if rng.random_range(0..3) == 0 {
        -magnitude
    } else {
        magnitude
    };
    Amount { units, scale }
}

/// Random effects: a state rule, counters, a trimmed ledger, set adds and
/// removes on a few members; a quarter of the events have none (merge).
fn random_effects(rng: &mut StdRng, id: &str, seq: u64, state_order: StateOrder) -> Effects {
    if rng.random_range(0..4) == 0 {
        return Effects::default();
    }
    let state = match rng.random_range(0..4) {
        0 => StateEffect::Replace,
        1 => StateEffect::Keep,
        _ => StateEffect::Merge,
    };
    let fields = (rng.random_range(0..4) == 0).then(|| vec!["f0".to_string(), "f1".to_string()]);
    let mut mutations = Vec::new();
    for _ in 0..rng.random_range(0..3) {
        let (field, scale) = if rng.random_range(0..2) == 0 {
            ("bal", 2)
        } else {
            ("n", 0)
        };
        mutations.push(Mutation::Count {
            field: field.into(),
            amount: random_amount(rng, scale),
        });
    }
    if rng.random_range(0..2) == 0 {
        mutations.push(Mutation::Append {
            stream: "l".into(),
            entry: vec![("id".into(), id.into()), ("seq".into(), seq.to_string())],
            max_len: 3,
            max_age_ms: 0,
        });
    }
    for _ in 0..rng.random_range(0..2) {
        let (set, member) = ("s".to_string(), format!("m{}", rng.random_range(0..3)));
        mutations.push(if rng.random_range(0..3) == 0 {
            Mutation::SetRemove { set, member }
        } else {
            Mutation::SetAdd { set, member }
        });
    }
    // A chained idem's counter set to a value (changes = true, refused
    // under per-field order): ordered, so a late event leaves it.
    if state_order == StateOrder::PerEntity && rng.random_range(0..3) == 0 {
        let values = [Some("1.50"), Some("-3"), Some("0.00"), None];
        mutations.push(Mutation::SetCounter {
            field: "abs".into(),
            value: values[rng.random_range(0..4) as usize].map(String::from),
        });
    }
    Effects {
        state,
        fields,
        mutations,
    }
}

/// An entity's dense-seq meta fields: `dense`, `dense_above`, `dense_closed`.
async fn dense_fields(
    conn: &mut idem::store::RedisConn,
    prefix: &str,
    entity: &str,
) -> (Option<String>, Option<String>, Option<String>) {
    redis::cmd("HMGET")
        .arg(KeyLayout::new(prefix).entity(entity).meta())
        .arg("dense")
        .arg("dense_above")
        .arg("dense_closed")
        .query_async(conn)
        .await
        .unwrap()
}

/// Forgets every id of `entity`, as the window does when it has passed.
async fn expire_ids(
    conn: &mut idem::store::RedisConn,
    prefix: &str,
    entity: &str,
    model: &mut Model,
) {
    let keys = KeyLayout::new(prefix).entity(entity);
    // The guard's own generations (window 1 h, as `differential` runs), and
    // the next one: the clock may pass into it while the test runs.
    let ids = idem::guard::id_generations(
        idem::pipeline::unix_millis() as u64,
        Duration::from_secs(3600),
    );
    let _: () = redis::cmd("DEL")
        .arg(keys.ids(ids.previous))
        .arg(keys.ids(ids.current))
        .arg(keys.ids(ids.current + 1))
        .query_async(conn)
        .await
        .unwrap();
    if let Some(e) = model.entities.get_mut(entity) {
        e.remembered.clear();
    }
}

/// One step of a differential case, at the script's level: what a
/// consumer group and an operator can do to the guard. A failing case is
/// shrunk to the fewest, simplest steps that still break.
#[derive(Debug, Clone)]
enum Step {
    /// A new event at the end of partition `p`'s log (`gap`: offsets
    /// skipped before it, as transaction markers or compaction leave).
    Produce {
        p: usize,
        entity: u8,
        seq: u64,
        delete: bool,
        fields: Vec<(u8, u8)>,
        unset: Option<u8>,
        per_field: bool,
        effects: u64,
        gap: bool,
    },
    /// A copy of an earlier record (by index, modulo how many there are)
    /// at a new offset of partition `p`: the same event (a producer's
    /// retry), under another id (a copy after the window), or the same id
    /// with another payload (a conflict).
    Copy { of: usize, p: usize, kind: CopyKind },
    /// Partition `p`'s next records (at most `max`) decided as one batch;
    /// with `lost`, an earlier attempt went through for the entities in
    /// the mask and its reply was lost, so the batch is retried whole.
    Deliver {
        p: usize,
        max: usize,
        lost: Option<u8>,
    },
    /// Partition `p` read again from its record `from` (modulo the log's
    /// length + 1), a new run: a replay, a rewind or a forward skip.
    Reread { p: usize, from: usize },
    /// Redis's keys under the prefix saved (DUMP), the model with them.
    Save,
    /// Redis rolled back to the last save (RESTORE), the model with it.
    Rollback,
    /// The window passes: every id forgotten.
    ExpireWindow,
}

#[derive(Debug, Clone, Copy)]
enum CopyKind {
    SameEvent,
    OtherId,
    OtherPayload,
}

/// A case: its steps and the settings every event of it shares.
#[derive(Debug, Clone)]
struct Case {
    /// The topic numbers each entity's seqs densely (dedupe.dense_seq_topics).
    dense: bool,
    /// The topic's changes go to the outbox (changelog.topics).
    changelog: bool,
    /// Which partitions have a topic id (offset marks); the others decide
    /// as before.
    marked: [bool; 2],
    events_per_script: usize,
    steps: Vec<Step>,
}

fn step() -> impl Strategy<Value = Step> {
    let produce = (
        0..2usize,
        0..3u8,
        0..8u64,
        prop::bool::weighted(0.1),
        prop::collection::vec((0..4u8, 0..4u8), 0..4),
        prop::option::weighted(0.25, 0..4u8),
        any::<bool>(),
        any::<u64>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(p, entity, seq, delete, fields, unset, per_field, effects, gap)| Step::Produce {
                p,
                entity,
                seq,
                delete,
                fields,
                unset,
                per_field,
                effects,
                gap,
            },
        );
    let copy = (
        any::<usize>(),
        0..2usize,
        prop_oneof![
            Just(CopyKind::SameEvent),
            Just(CopyKind::OtherId),
            Just(CopyKind::OtherPayload)
        ],
    )
        .prop_map(|(of, p, kind)| Step::Copy { of, p, kind });
    let deliver = (
        0..2usize,
        1..7usize,
        prop::option::weighted(0.2, any::<u8>()),
    )
        .prop_map(|(p, max, lost)| Step::Deliver { p, max, lost });
    prop_oneof![
        8 => produce,
        3 => copy,
        8 => deliver,
        1 => (0..2usize, any::<usize>()).prop_map(|(p, from)| Step::Reread { p, from }),
        1 => Just(Step::Save),
        1 => Just(Step::Rollback),
        1 => Just(Step::ExpireWindow),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        any::<bool>(),
        (prop::bool::weighted(0.8), prop::bool::weighted(0.8)),
        1..40usize,
        prop::collection::vec(step(), 1..40),
    )
        .prop_map(
            |(dense, changelog, marked, events_per_script, steps)| Case {
                dense,
                changelog,
                marked: [marked.0, marked.1],
                events_per_script,
                steps,
            },
        )
}

/// A partition's log and where its consumer is.
#[derive(Default, Clone)]
struct Log {
    /// (record index, offset).
    records: Vec<(usize, i64)>,
    next: usize,
    run_start: i64,
}

/// A save: the case's keys as DUMP gave them (with their times to live),
/// the model and the changes of that moment.
type Saved = (
    Vec<(String, Vec<u8>, i64)>,
    Model,
    BTreeMap<String, Vec<String>>,
);

/// What a case has made so far: the records, the logs, what the model and
/// Redis hold (and the last save of both).
struct Run {
    prefix: String,
    /// Each record's event, effects and policy (an index into `policies`).
    records: Vec<(Event, Effects, usize)>,
    /// The case's topic under per-entity order (0) and per-field order (1):
    /// a step picks its event's order, so the script meets both mixed.
    policies: [TopicPolicy; 2],
    logs: [Log; 2],
    next_seq: [u64; 3],
    model: Model,
    /// Per entity, the ids whose decision wrote a change.
    changes: BTreeMap<String, Vec<String>>,
    saved: Option<Saved>,
    token: u32,
    /// Whether the Redis under test is a cluster (read once per case).
    cluster: bool,
}

impl Run {
    fn produce(&mut self, case: &Case, step: &Step) {
        let Step::Produce {
            p,
            entity,
            seq,
            delete,
            fields,
            unset,
            per_field,
            effects,
            gap,
        } = step
        else {
            unreachable!()
        };
        let i = self.records.len();
        let e = usize::from(*entity);
        let seq = if case.dense {
            // A gap now and then: a seq never produced.
            self.next_seq[e] += u64::from(*seq == 7) + 1;
            self.next_seq[e] - 1
        } else {
            *seq
        };
        let id = format!("{}-{i}", self.prefix);
        let op = if *delete { Op::Delete } else { Op::Upsert };
        let mut set: Vec<(String, String)> = Vec::new();
        if op == Op::Upsert {
            for (f, v) in fields {
                set.retain(|(k, _)| *k != format!("f{f}"));
                set.push((format!("f{f}"), format!("v{v}")));
            }
        }
        let unset: Vec<String> = unset
            .filter(|_| op == Op::Upsert)
            .map(|f| format!("f{f}"))
            .into_iter()
            .collect();
        set.retain(|(k, _)| !unset.contains(k));
        let order = if *per_field {
            StateOrder::PerField
        } else {
            StateOrder::PerEntity
        };
        let mut rng = StdRng::seed_from_u64(*effects);
        let effects = random_effects(&mut rng, &id, seq, order);
        let event = Event {
            ts: None,
            change: None,
            id,
            entity: format!("{}:{e}", self.prefix),
            seq,
            op,
            kind: None,
            set,
            unset,
            fingerprint: rng.random::<u64>(),
        };
        self.records.push((event, effects, usize::from(*per_field)));
        self.append(*p, i, *gap);
    }

    fn copy(&mut self, of: usize, p: usize, kind: CopyKind) {
        if self.records.is_empty() {
            return;
        }
        let i = self.records.len();
        let mut c = self.records[of % i].clone();
        match kind {
            CopyKind::SameEvent => {}
            CopyKind::OtherId => c.0.id = format!("{}-{i}-copy", self.prefix),
            CopyKind::OtherPayload => {
                c.0.fingerprint ^= 0x5555;
                c.0.set.push(("conflict".into(), "1".into()));
            }
        }
        self.records.push(c);
        self.append(p, i, false);
    }

    fn append(&mut self, p: usize, i: usize, gap: bool) {
        let log = &mut self.logs[p];
        let offset = log.records.last().map_or(0, |&(_, o)| o + 1) + i64::from(gap) * 2;
        log.records.push((i, offset));
    }

    fn reread(&mut self, p: usize, from: usize) {
        let log = &mut self.logs[p];
        log.next = from % (log.records.len() + 1);
        log.run_start = match log.next {
            0 => 0,
            n => log.records[n - 1].1 + 1,
        };
    }

    /// Decides partition `p`'s next records with the guard and the model.
    async fn deliver(
        &mut self,
        case: &Case,
        guard: &mut Guard,
        p: usize,
        max: usize,
        lost: Option<u8>,
    ) {
        let log = self.logs[p].clone();
        let batch: Vec<(usize, i64)> = log.records[log.next..].iter().take(max).copied().collect();
        if batch.is_empty() {
            return;
        }
        self.logs[p].next += batch.len();
        let field = format!("o:000000000000:{p}");
        guard.begin_batch();
        self.token += 1;
        let mut attempts = vec![batch.clone()];
        if let Some(mask) = lost {
            // An earlier attempt whose reply was lost: the calls of the
            // entities in the mask went through.
            let through = |i: usize| {
                let e: u32 = self.records[i]
                    .0
                    .entity
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                mask & (1 << e) != 0
            };
            attempts.insert(
                0,
                batch.iter().copied().filter(|&(i, _)| through(i)).collect(),
            );
        }
        for attempt in attempts {
            let inputs: Vec<GuardInput<'_>> = attempt
                .iter()
                .map(|&(i, offset)| GuardInput {
                    event: &self.records[i].0,
                    policy: &self.policies[self.records[i].2],
                    effects: &self.records[i].1,
                    place: case.marked[p].then_some(Place {
                        mark_field: &field,
                        offset,
                        run_start: log.run_start,
                    }),
                })
                .collect();
            let verdicts = guard.apply(&inputs).await.unwrap();
            let want = self.model.apply_batch(&inputs, self.token);
            for ((got, want), input) in verdicts.iter().zip(&want).zip(&inputs) {
                assert_eq!(
                    (got.outcome, got.earlier_attempt),
                    (want.outcome, want.earlier_attempt),
                    "verdict for {:?} with {:?}",
                    input.event,
                    input.effects
                );
                if case.changelog
                    && want.earlier_attempt.is_none()
                    && matches!(
                        want.outcome,
                        Outcome::Applied | Outcome::Late | Outcome::Partial
                    )
                {
                    self.changes
                        .entry(input.event.entity.clone())
                        .or_default()
                        .push(input.event.id.clone());
                }
            }
        }
    }

    /// Every key the case can write: its entities' and their outboxes (a
    /// SCAN would walk every test's keys).
    fn keys(&self) -> BTreeSet<String> {
        let layout = KeyLayout::new(&self.prefix);
        let cluster = self.cluster;
        let ids = idem::guard::id_generations(
            idem::pipeline::unix_millis() as u64,
            Duration::from_secs(3600),
        );
        let mut keys = BTreeSet::new();
        for name in self.model.entities.keys() {
            let k = layout.entity(name);
            let slot = cluster.then(|| idem::store::hash_slot(k.base().as_bytes()));
            keys.extend([
                k.meta(),
                k.state(),
                k.ids(ids.previous),
                k.ids(ids.current),
                k.ids(ids.current + 1),
                k.counters(),
                k.ledger("l"),
                k.set("s"),
                k.set_seqs("s"),
                k.field_seqs(),
                layout.outbox_key(slot),
            ]);
        }
        keys
    }

    /// The case's keys by slot: a cluster pipelines one slot at a time.
    fn keys_by_slot(&self) -> BTreeMap<u16, Vec<String>> {
        let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for key in self.keys() {
            out.entry(idem::store::hash_slot(key.as_bytes()))
                .or_default()
                .push(key);
        }
        out
    }

    /// The case's keys saved with their values (DUMP) and times to live.
    async fn save(&mut self, conn: &mut idem::store::RedisConn) {
        let mut saved = Vec::new();
        for keys in self.keys_by_slot().into_values() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("DUMP").arg(key).cmd("PTTL").arg(key);
            }
            let replies: Vec<(Option<Vec<u8>>, i64)> = pipe.query_async(conn).await.unwrap();
            saved.extend(
                keys.into_iter()
                    .zip(replies)
                    .filter_map(|(key, (dump, ttl))| dump.map(|d| (key, d, ttl.max(0)))),
            );
        }
        self.saved = Some((saved, self.model.clone(), self.changes.clone()));
    }

    /// Redis back to the last save: every key of the case replaced.
    async fn rollback(&mut self, conn: &mut idem::store::RedisConn) {
        let Some((saved, model, changes)) = self.saved.clone() else {
            return;
        };
        for (slot, keys) in self.keys_by_slot() {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("DEL").arg(key).ignore();
            }
            let restored = saved
                .iter()
                .filter(|(key, _, _)| idem::store::hash_slot(key.as_bytes()) == slot);
            for (key, dump, ttl) in restored {
                pipe.cmd("RESTORE")
                    .arg(key)
                    .arg(ttl)
                    .arg(dump)
                    .arg("REPLACE")
                    .ignore();
            }
            let _: () = pipe.query_async(conn).await.unwrap();
        }
        self.model = model;
        self.changes = changes;
    }
}

/// Runs one case on a fresh prefix and checks every verdict, then every
/// entity (state, counters, ledgers, sets, field seqs, dense marks, offset
/// marks) and the changes in the outbox against the model.
async fn run_case(conn: &idem::store::RedisConn, prefix: String, case: &Case) {
    let mut conn = conn.clone();
    // The epoch marker the guard checks, in each slot the case can write
    // (what `ProgressStore::establish_epoch` leaves, without its walk over
    // every master on a cluster).
    let layout = KeyLayout::new(&prefix);
    let cluster = redis_mode(&redis_url()) == idem::config::RedisMode::Cluster;
    for e in 0..3 {
        let base = layout.entity_base(&format!("{prefix}:{e}"));
        let slot = cluster.then(|| idem::store::hash_slot(base.as_bytes()));
        let _: () = redis::cmd("SET")
            .arg(layout.epoch_key(slot))
            .arg("E")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let epoch = String::from("E");
    let mut guard = Guard::new(
        conn.clone(),
        KeyLayout::new(&prefix),
        case.events_per_script,
        epoch,
    );
    let policy = |state_order| TopicPolicy {
        dense_seqs: case.dense,
        changelog: case.changelog,
        state_order,
        ..hour()
    };
    let mut run = Run {
        prefix: prefix.clone(),
        records: Vec::new(),
        policies: [policy(StateOrder::PerEntity), policy(StateOrder::PerField)],
        logs: Default::default(),
        next_seq: [1; 3],
        model: Model::default(),
        changes: BTreeMap::new(),
        saved: None,
        token: 0,
        cluster,
    };
    for step in &case.steps {
        match step {
            Step::Produce { .. } => run.produce(case, step),
            Step::Copy { of, p, kind } => run.copy(*of, *p, *kind),
            Step::Deliver { p, max, lost } => run.deliver(case, &mut guard, *p, *max, *lost).await,
            Step::Reread { p, from } => run.reread(*p, *from),
            Step::Save => run.save(&mut conn).await,
            Step::Rollback => run.rollback(&mut conn).await,
            Step::ExpireWindow => {
                let entities: Vec<String> = run.model.entities.keys().cloned().collect();
                for entity in entities {
                    expire_ids(&mut conn, &prefix, &entity, &mut run.model).await;
                }
            }
        }
    }
    assert_entities_match(&mut conn, &prefix, &run.model).await;
    if case.changelog {
        let entities: BTreeSet<&String> = run.model.entities.keys().collect();
        assert_changes_rebuild_the_view(&mut conn, &prefix, &run.model, &entities, &run.changes)
            .await;
    }
}

/// The script and the model decide the same, record by record, and leave
/// the same entities and changes, on cases built of steps (events, copies
/// at new offsets, batches retried after a lost reply, re-reads, rollbacks
/// of Redis, the window passing), each on a fresh prefix. proptest shrinks
/// a failing case to the shortest steps that still break and prints it.
/// `IDEM_DIFFERENTIAL_CASES` sets how many (10,000; 2,000 on the cluster,
/// which checks the same script through slot routing).
#[test]
fn guard_script_matches_the_model_step_by_step() {
    let cluster = redis_mode(&redis_url()) == idem::config::RedisMode::Cluster;
    let cases = std::env::var("IDEM_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cluster { 2_000 } else { 10_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(redis_conn(&redis_url()));
    let base = unique("diff");
    let counter = std::sync::atomic::AtomicU64::new(0);
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let result = runner.run(&case(), |case| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(run_case(&conn, format!("{base}c{n}"), &case));
        Ok(())
    });
    if let Err(e) = result {
        panic!("the script and the model differ: {e}");
    }
    let n = counter.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("differential: {n} cases (steps of events, copies, retries, re-reads, rollbacks), Lua == model");
}

/// The changes in the outbox under `prefix` (read, then deleted for the
/// next round), per entity in the order written: what the relay publishes.
async fn take_outbox(
    conn: &mut idem::store::RedisConn,
    prefix: &str,
    entities: impl Iterator<Item = &String>,
) -> BTreeMap<String, Vec<Value>> {
    let layout = KeyLayout::new(prefix);
    let cluster = redis_mode(&redis_url()) == idem::config::RedisMode::Cluster;
    let keys: BTreeSet<String> = entities
        .map(|e| {
            let slot = cluster.then(|| idem::store::hash_slot(layout.entity_base(e).as_bytes()));
            layout.outbox_key(slot)
        })
        .collect();
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for key in keys {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        // Read as the relay reads them: the record it publishes.
        for entry in idem::relay::parse_entries(reply).expect("entries the script wrote") {
            let record: Value = serde_json::from_slice(&entry.record).expect("a record is JSON");
            assert_eq!(record["entity"].as_str(), Some(entry.entity.as_str()));
            assert_eq!(record["seq"].as_u64(), Some(entry.version));
            assert_eq!(entry.topic, "src");
            out.entry(entry.entity.clone()).or_default().push(record);
        }
        let _: () = redis::cmd("DEL").arg(&key).query_async(conn).await.unwrap();
    }
    out
}

/// Each entity of a changelog topic has one change per event that changed
/// it (applied, late or partial: `changes`), numbered 1, 2, 3, … in the
/// outbox's order; its last state, and its counters, sets and ledger
/// folded from its changes, are what Redis holds. Entities of other topics
/// have none. Returns how many changes there were.
async fn assert_changes_rebuild_the_view(
    conn: &mut idem::store::RedisConn,
    prefix: &str,
    model: &Model,
    changelog: &BTreeSet<&String>,
    changes: &BTreeMap<String, Vec<String>>,
) -> usize {
    let outbox = take_outbox(conn, prefix, model.entities.keys()).await;
    let layout = KeyLayout::new(prefix);
    let mut views = BTreeMap::new();
    for name in model.entities.keys() {
        let view = idem::store::read_entity(conn, &layout, name).await.unwrap();
        views.insert(name.clone(), view);
    }
    let mut total = 0;
    for (name, want) in &model.entities {
        let records = outbox.get(name).map_or(&[][..], Vec::as_slice);
        total += records.len();
        if !changelog.contains(name) {
            assert!(
                records.is_empty(),
                "{name} is not of a changelog topic: {records:?}"
            );
            continue;
        }
        let mut ids: Vec<&str> = records
            .iter()
            .map(|r| r["change"]["event"]["id"].as_str().unwrap())
            .collect();
        let mut want_ids: Vec<&str> = changes
            .get(name)
            .map_or(Vec::new(), |v| v.iter().map(String::as_str).collect());
        ids.sort_unstable();
        want_ids.sort_unstable();
        assert_eq!(
            ids, want_ids,
            "the events whose changes {name}'s outbox holds"
        );
        for (i, r) in records.iter().enumerate() {
            assert_eq!(
                (r["seq"].as_u64(), r["id"].as_str()),
                (
                    Some(i as u64 + 1),
                    Some(format!("{name}#{}", i + 1).as_str())
                ),
                "{r}"
            );
        }
        let Some(last) = records.last() else { continue };
        let state: BTreeMap<String, String> = serde_json::from_value(last["data"].clone()).unwrap();
        assert_eq!(
            state, views[name].state,
            "{name}'s last change holds its state"
        );
        let mut rebuilt = idem::effects::CommutativeView::default();
        let mut ledger: Vec<BTreeMap<String, String>> = Vec::new();
        for r in records {
            for (field, value) in r["change"]["counters"].as_object().into_iter().flatten() {
                match value.as_str() {
                    Some(v) => rebuilt.counters.insert(field.clone(), v.to_string()),
                    None => rebuilt.counters.remove(field),
                };
            }
            for (set, members) in r["change"]["sets"].as_object().into_iter().flatten() {
                let held = rebuilt.sets.entry(set.clone()).or_default();
                for (member, added) in members.as_object().unwrap() {
                    if added.as_bool().unwrap() {
                        held.insert(member.clone());
                    } else {
                        held.remove(member);
                    }
                }
            }
            if let Some(entry) = r["change"]["ledger"].get("l") {
                ledger.push(serde_json::from_value(entry.clone()).unwrap());
            }
        }
        rebuilt.sets.retain(|_, members| !members.is_empty());
        let view = want.commutative_view();
        assert_eq!(
            (&rebuilt.counters, &rebuilt.sets),
            (&view.counters, &view.sets),
            "{name}'s counters and sets from its changes"
        );
        let kept: Vec<BTreeMap<String, String>> = view
            .ledgers
            .get("l")
            .into_iter()
            .flatten()
            .map(|entry| entry.iter().cloned().collect())
            .collect();
        assert_eq!(
            &ledger[ledger.len() - kept.len()..],
            &kept[..],
            "{name}'s ledger entries are its changes' last ones"
        );
    }
    total
}

/// Every entity of `model` as Redis holds it under `prefix`.
/// The entities are read at once, over the one multiplexed connection.
async fn assert_entities_match(conn: &mut idem::store::RedisConn, prefix: &str, model: &Model) {
    let checks = model
        .entities
        .iter()
        .map(|(name, want)| assert_entity_matches(conn.clone(), prefix, name, want));
    futures_util::future::join_all(checks).await;
}

async fn assert_entity_matches(
    mut conn: idem::store::RedisConn,
    prefix: &str,
    name: &str,
    want: &idem::model::EntityModel,
) {
    let conn = &mut conn;
    let layout = KeyLayout::new(prefix);
    {
        let got = &idem::store::read_entity(conn, &layout, name).await.unwrap();
        assert_eq!(
            (
                got.seq,
                got.deleted,
                got.applied,
                &got.state,
                got.last_id.as_ref()
            ),
            (
                want.seq,
                want.deleted,
                want.applied,
                &want.state,
                want.last_id.as_ref()
            ),
            "state of {name}"
        );
        let commutative = idem::store::commutative::read(
            conn,
            &KeyLayout::new(prefix),
            name,
            &["l".to_string()],
            &["s".to_string()],
        )
        .await
        .unwrap();
        assert_eq!(
            commutative,
            want.commutative_view(),
            "counters, ledger and sets of {name}"
        );
        let field_seqs: std::collections::BTreeMap<String, u64> = redis::cmd("HGETALL")
            .arg(KeyLayout::new(prefix).entity(name).field_seqs())
            .query_async(conn)
            .await
            .unwrap();
        assert_eq!(field_seqs, want.field_seqs, "field seqs of {name}");
        let dense = dense_fields(conn, prefix, name).await;
        let want_dense = want.dense.as_ref().map(|d| d.encode());
        assert_eq!(
            (dense.0, dense.1, dense.2),
            want_dense.map_or((None, None, None), |(m, a, c)| (Some(m), a, c)),
            "dense seqs of {name}"
        );
        let meta: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(KeyLayout::new(prefix).entity(name).meta())
            .query_async(conn)
            .await
            .unwrap();
        let marks: std::collections::BTreeMap<String, String> = meta
            .into_iter()
            .filter(|(k, _)| k.starts_with("o:"))
            .collect();
        let want_marks: std::collections::BTreeMap<String, String> = want
            .marks
            .iter()
            .map(|(k, m)| (k.clone(), m.encode()))
            .collect();
        assert_eq!(marks, want_marks, "offset marks of {name}");
        // Every ids hash expires, whatever deleted or expired one before.
        let keys = KeyLayout::new(prefix).entity(name);
        let ids = idem::guard::id_generations(
            idem::pipeline::unix_millis() as u64,
            Duration::from_secs(3600),
        );
        for key in [keys.ids(ids.previous), keys.ids(ids.current)] {
            let at: i64 = redis::cmd("PEXPIRETIME")
                .arg(&key)
                .query_async(conn)
                .await
                .unwrap();
            // -2: no such key; -1: a key without an expiry.
            assert!(at != -1, "{key} has no expiry");
        }
    }
}

/// What the script parses, for one call with every mutation kind and
/// every state rule, equals what each typed input means: the encoder
/// (src/guard/args.rs) and the script's readers (src/guard/lua/) agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_parses_every_mutation_kind_as_the_encoder_meant_it() {
    use idem::effects::Order;
    use serde_json::json;
    let prefix = unique("parse");
    let conn = redis_conn(&redis_url()).await;
    let layout = KeyLayout::new(&prefix);
    let mut guard = Guard::new(conn, layout.clone(), 100, "E".into());
    let event = |id: &str, op, set: &[(&str, &str)], unset: &[&str]| Event {
        ts: None,
        change: None,
        id: id.into(),
        entity: format!("{prefix}:acct"),
        seq: 7,
        op,
        kind: Some("deposit".into()),
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        unset: unset.iter().map(|k| k.to_string()).collect(),
        fingerprint: 0xab,
    };
    let mutations = vec![
        Mutation::Count {
            field: "balance".into(),
            amount: Amount {
                units: -1250,
                scale: 2,
            },
        },
        Mutation::Append {
            stream: "moves".into(),
            entry: vec![("id".into(), "a".into()), ("amount".into(), "12.50".into())],
            max_len: 10,
            max_age_ms: 60_000,
        },
        Mutation::SetAdd {
            set: "tags".into(),
            member: "vip".into(),
        },
        Mutation::SetRemove {
            set: "tags".into(),
            member: "new".into(),
        },
        Mutation::SetCounter {
            field: "points".into(),
            value: Some("40".into()),
        },
        Mutation::SetCounter {
            field: "old".into(),
            value: None,
        },
        Mutation::Custom {
            snippet: 1,
            order: Order::Commutative,
        },
        Mutation::Custom {
            snippet: 0,
            order: Order::Ordered,
        },
    ];
    let plain = TopicPolicy {
        topic: "orders".into(),
        ..hour()
    };
    let per_field = TopicPolicy {
        state_order: StateOrder::PerField,
        ..plain.clone()
    };
    let cases = [
        (
            event(
                "a",
                Op::Upsert,
                &[("amount", "12.50"), ("note", "x")],
                &["old"],
            ),
            Effects {
                state: StateEffect::Merge,
                fields: None,
                mutations: mutations.clone(),
            },
            &plain,
            "merge",
        ),
        (
            event("b", Op::Upsert, &[("k", "v")], &[]),
            Effects {
                state: StateEffect::Replace,
                fields: None,
                mutations: Vec::new(),
            },
            &TopicPolicy {
                changelog: true,
                ..plain.clone()
            },
            "replace",
        ),
        (
            event("c", Op::Upsert, &[], &[]),
            Effects {
                state: StateEffect::Keep,
                fields: None,
                mutations: vec![mutations[2].clone()],
            },
            &plain,
            "keep",
        ),
        (
            event("d", Op::Delete, &[], &[]),
            Effects::default(),
            &plain,
            "delete",
        ),
        // Per-field order: the field seqs are the event's first effect key.
        (
            event("e", Op::Upsert, &[("k", "v")], &["gone"]),
            Effects {
                state: StateEffect::Merge,
                fields: None,
                mutations: mutations.clone(),
            },
            &TopicPolicy {
                dense_seqs: true,
                ..per_field.clone()
            },
            "merge",
        ),
        (
            event("f", Op::Delete, &[], &[]),
            Effects::default(),
            &per_field,
            "delete",
        ),
    ];
    // The first event carries its place in the log, the others none.
    let place = |i: usize| {
        (i == 0).then_some(Place {
            mark_field: "o:0123456789ab:3",
            offset: 17,
            run_start: 5,
        })
    };
    let inputs: Vec<GuardInput<'_>> = cases
        .iter()
        .enumerate()
        .map(|(i, (event, effects, policy, _))| GuardInput {
            event,
            policy,
            effects,
            place: place(i),
        })
        .collect();
    let parsed = guard.parsed_by_script(&inputs).await.unwrap();

    let keys = layout.entity(&format!("{prefix}:acct"));
    // What each typed mutation means, said independently of the encoder.
    let meaning = |m: &Mutation, set: &[(String, String)]| match m {
        Mutation::Count { field, amount } => json!({
            "kind": "counter", "key": keys.counters(), "field": field,
            "units": amount.units.to_string(), "scale": amount.scale }),
        Mutation::Append {
            stream,
            entry,
            max_len,
            max_age_ms,
        } => json!({
            "kind": "ledger", "key": keys.ledger(stream), "max_len": max_len.to_string(),
            "max_age_ms": max_age_ms,
            "entry": entry.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect::<Vec<_>>() }),
        Mutation::SetAdd { set: s, member } => json!({
            "kind": "set_add", "key": keys.set(s), "seqkey": keys.set_seqs(s), "member": member }),
        Mutation::SetRemove { set: s, member } => json!({
            "kind": "set_remove", "key": keys.set(s), "seqkey": keys.set_seqs(s), "member": member }),
        Mutation::SetCounter { field, value } => json!({
            "kind": "counter_set", "key": keys.counters(), "field": field,
            "present": value.is_some(), "value": value.clone().unwrap_or_default() }),
        Mutation::Custom { snippet, order } => json!({
            "kind": "custom", "snippet": snippet + 1, "key": keys.counters(),
            "order": if *order == Order::Ordered { "ordered" } else { "commutative" },
            "data": set.iter().cloned().collect::<std::collections::BTreeMap<_, _>>() }),
    };
    let expected: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (e, effects, policy, op))| {
            let written = |k: &String| effects.writes_field(k);
            // Each effect key once, in the order the mutations name them,
            // after the field seqs under per-field order.
            let per_field = policy.per_field();
            let mut effect_keys: Vec<String> = Vec::new();
            if per_field {
                effect_keys.push(keys.field_seqs());
            }
            for m in &effects.mutations {
                let named = match m {
                    Mutation::Count { .. }
                    | Mutation::SetCounter { .. }
                    | Mutation::Custom { .. } => vec![keys.counters()],
                    Mutation::Append { stream, .. } => vec![keys.ledger(stream)],
                    Mutation::SetAdd { set, .. } | Mutation::SetRemove { set, .. } => {
                        vec![keys.set(set), keys.set_seqs(set)]
                    }
                };
                for k in named {
                    if !effect_keys.contains(&k) {
                        effect_keys.push(k);
                    }
                }
            }
            json!({
                "meta": keys.meta(), "state": keys.state(), "id": e.id,
                "id_hash": format!("{:016x}", idem::event::id_hash(&e.id)),
                "fingerprint_bytes": format!("{:016x}", e.fingerprint),
                "keys": effect_keys,
                "fingerprint": format!("{:016x}", e.fingerprint), "seq": e.seq.to_string(),
                "mark_field": place(i).map_or("", |p| p.mark_field),
                "offset": place(i).map_or(0, |p| p.offset),
                "mark": place(i).map_or(String::new(), |p| format!("{}:{}", p.run_start, p.offset)),
                "op": op, "per_field": per_field, "dense": policy.dense_seqs, "type": "deposit",
                "set": e.set.iter().filter(|(k, _)| written(k))
                    .flat_map(|(k, v)| [k.clone(), v.clone()]).collect::<Vec<_>>(),
                "unset": e.unset.iter().filter(|k| written(k)).collect::<Vec<_>>(),
                "mutations": effects.mutations.iter().map(|m| meaning(m, &e.set)).collect::<Vec<_>>(),
                "commutative": effects.mutations.iter().any(Mutation::commutes),
                "changelog": if policy.changelog { "orders" } else { "" },
            })
        })
        .collect();
    let parsed = normalise(parsed);
    let events = parsed.as_array().expect("one report per event");
    assert_eq!(events.len(), expected.len());
    for (got, want) in events
        .iter()
        .zip(normalise(Value::Array(expected)).as_array().unwrap())
    {
        // The id generations depend on the clock: named by the layout, checked apart.
        let mut got = got.clone();
        for generation in ["current", "previous"] {
            let key = got[generation].as_str().unwrap().to_string();
            assert!(key.starts_with(&format!("{}:ids:", keys.base())), "{key}");
            got.as_object_mut().unwrap().remove(generation);
        }
        // When the current generation ends: in the future, within two windows.
        let expire_at: u64 = got["expire_at"].as_str().unwrap().parse().unwrap();
        let now_ms = idem::pipeline::unix_millis() as u64;
        assert!(
            expire_at > now_ms && expire_at <= now_ms + 2 * 3_600_000,
            "{expire_at}"
        );
        got.as_object_mut().unwrap().remove("expire_at");
        assert_eq!(&got, want);
    }
}

/// Lua's cjson writes an empty table as `{}`: an empty list or map alike.
fn normalise(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) if m.is_empty() => Value::Array(Vec::new()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, normalise(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(normalise).collect()),
        other => other,
    }
}

/// A ledger with `max_age` drops the entries older than it at the next
/// append (XTRIM MINID, the Redis server's clock): the branch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_with_max_age_drops_entries_older_than_it() {
    let prefix = unique("maxage");
    let conn = redis_conn(&redis_url()).await;
    let layout = KeyLayout::new(&prefix);
    let epoch = ProgressStore::new(conn.clone(), layout.clone())
        .establish_epoch()
        .await
        .expect("epoch");
    let mut guard = Guard::new(conn.clone(), layout.clone(), 10, epoch);
    let entity = format!("{prefix}:acct");
    let deposit = |seq: u64| {
        let event = Event {
            ts: None,
            change: None,
            id: format!("d{seq}"),
            entity: entity.clone(),
            seq,
            op: Op::Upsert,
            kind: None,
            set: Vec::new(),
            unset: Vec::new(),
            fingerprint: seq,
        };
        let effects = Effects {
            state: StateEffect::Keep,
            fields: None,
            mutations: vec![Mutation::Append {
                stream: "moves".into(),
                entry: vec![("seq".into(), seq.to_string())],
                max_len: 0,
                max_age_ms: 300,
            }],
        };
        (event, effects)
    };
    let ledger = layout.entity(&entity).ledger("moves");
    let seqs = |conn: idem::store::RedisConn| {
        let ledger = ledger.clone();
        async move {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&ledger)
                .arg("-")
                .arg("+")
                .query_async(&mut conn.clone())
                .await
                .unwrap();
            entries
                .into_iter()
                .map(|(_, fields)| fields[0].1.clone())
                .collect::<Vec<_>>()
        }
    };
    for seq in [1, 2, 3] {
        if seq == 3 {
            assert_eq!(seqs(conn.clone()).await, ["1", "2"], "both within max_age");
            // The trim is by the server's clock: let max_age pass on it.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let (event, effects) = deposit(seq);
        let input = GuardInput {
            event: &event,
            policy: &hour(),
            effects: &effects,
            place: None,
        };
        guard.begin_batch();
        guard.apply(&[input]).await.unwrap();
    }
    assert_eq!(
        seqs(conn).await,
        ["3"],
        "entries older than max_age are gone"
    );
}

/// Offset marks in the script: a record decided before is `replayed`
/// (nothing written), a copy at another offset stays a `duplicate`, and a
/// dead-lettered record (a conflict) holds its entity's mark for the rest of
/// the call, so a retry of the batch (its reply lost) decides it again and
/// it is dead-lettered again instead of being called replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_marks_replay_decided_records_and_hold_at_a_conflict() {
    use idem::model::Outcome::*;
    let prefix = unique("marks");
    let conn = redis_conn(&redis_url()).await;
    let epoch = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix))
        .establish_epoch()
        .await
        .expect("epoch");
    let mut guard = Guard::new(conn.clone(), KeyLayout::new(&prefix), 100, epoch);
    let entity = format!("{prefix}:acct");
    let event = |id: &str, seq: u64, fingerprint: u64| Event {
        ts: None,
        change: None,
        id: id.into(),
        entity: entity.clone(),
        seq,
        op: Op::Upsert,
        kind: None,
        set: vec![("v".into(), id.into())],
        unset: Vec::new(),
        fingerprint,
    };
    let (first, conflicting, later, copy) = (
        event("a", 1, 1),
        event("a", 2, 2),
        event("b", 3, 3),
        event("b", 3, 3),
    );
    let effects = Effects::default();
    let policy: &'static TopicPolicy = Box::leak(Box::new(hour()));
    let at = |event: &'static Event, offset: i64| GuardInput {
        event,
        policy,
        effects: Box::leak(Box::new(effects.clone())),
        place: Some(Place {
            mark_field: "o:0123456789ab:0",
            offset,
            run_start: 0,
        }),
    };
    let leak = |e: Event| -> &'static Event { Box::leak(Box::new(e)) };
    let (first, conflicting, later, copy) =
        (leak(first), leak(conflicting), leak(later), leak(copy));
    let outcomes =
        |v: Vec<idem::guard::Verdict>| v.into_iter().map(|v| v.outcome).collect::<Vec<_>>();

    guard.begin_batch();
    assert_eq!(
        outcomes(guard.apply(&[at(first, 10)]).await.unwrap()),
        [Applied]
    );
    guard.begin_batch();
    let batch = [at(conflicting, 11), at(later, 12)];
    assert_eq!(
        outcomes(guard.apply(&batch).await.unwrap()),
        [Conflict, Applied]
    );
    // The same batch again (same token): the conflict is decided again.
    let retried = guard.apply(&batch).await.unwrap();
    assert_eq!(retried[0].outcome, Conflict);
    assert_eq!(retried[1].earlier_attempt, Some(Applied));
    // Later batches: the first record read again is replayed; a copy of
    // `later` at another offset is a duplicate and moves the mark on.
    guard.begin_batch();
    assert_eq!(
        outcomes(guard.apply(&[at(first, 10)]).await.unwrap()),
        [Replayed]
    );
    guard.begin_batch();
    assert_eq!(
        outcomes(guard.apply(&[at(copy, 13)]).await.unwrap()),
        [Duplicate]
    );
    guard.begin_batch();
    assert_eq!(
        outcomes(guard.apply(&[at(later, 12), at(copy, 13)]).await.unwrap()),
        [Replayed, Replayed]
    );
    let view = &read_entities(&redis_url(), &prefix, [&entity].into_iter()).await[&entity];
    assert_eq!(
        (view.seq, view.applied),
        (Some(3), 2),
        "nothing written twice"
    );
}

/// Dense seqs over long histories, where more than 32 seqs wait above a
/// gap and the cap closes it: the script decides every event and keeps
/// the mark, the waiting seqs and the closed gaps as the model does; a late
/// original in a closed gap is refused (dead-lettered), never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_seqs_close_gaps_at_the_cap_as_the_model_does() {
    let prefix = unique("dense");
    let mut conn = redis_conn(&redis_url()).await;
    let mut rng = StdRng::seed_from_u64(0xDE45E);
    let epoch = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix))
        .establish_epoch()
        .await
        .expect("epoch");
    let mut guard = Guard::new(conn.clone(), KeyLayout::new(&prefix), 64, epoch);
    let effects = Effects::default();
    let dense = TopicPolicy {
        dense_seqs: true,
        ..hour()
    };
    let mut model = Model::default();
    let (mut closed_gaps, mut refused) = (0, 0);
    for history in 0..60 {
        let entity = format!("{prefix}:e{history}");
        let event = |id: String, seq: u64, fingerprint: u64| Event {
            ts: None,
            change: None,
            id,
            entity: entity.clone(),
            seq,
            op: Op::Upsert,
            kind: None,
            set: vec![("v".into(), seq.to_string())],
            unset: vec![],
            fingerprint,
        };
        let mut events = Vec::new();
        let mut skipped = Vec::new();
        for seq in 1..(60 + rng.random_range(0..120)) {
            if rng.random_range(0..8) == 0 {
                skipped.push(seq);
                continue;
            }
            events.push(event(format!("{history}-{seq}"), seq, seq));
            if rng.random_range(0..10) == 0 {
                // A copy at another id, or another event at the seq.
                let fp = if rng.random_range(0..2) == 0 {
                    seq
                } else {
                    seq ^ 0xF0
                };
                events.push(event(format!("{history}-{seq}-again"), seq, fp));
            }
        }
        for i in 1..events.len() {
            if rng.random_range(0..4) == 0 {
                events.swap(i - 1, i);
            }
        }
        // Some skipped seqs arrive at last: late originals.
        for seq in skipped.iter().filter(|_| rng.random_range(0..2) == 0) {
            events.push(event(format!("{history}-{seq}"), *seq, *seq));
        }
        let inputs = unplaced(&events, &effects, &dense);
        let verdicts = guard.apply(&inputs).await.unwrap();
        for (e, v) in events.iter().zip(&verdicts) {
            let want = model.apply_effects(e, &effects, &dense);
            assert_eq!(v.outcome, want, "{e:?}");
            closed_gaps += v.dense_seqs_closed;
            if want == idem::model::Outcome::Invalid {
                refused += 1;
                assert_eq!(
                    v.rejection.as_ref().map(|r| r.reason),
                    Some(idem::event::Reason::SeqGapClosed)
                );
            }
        }
        let (mark, above, closed) = dense_fields(&mut conn, &prefix, &entity).await;
        let want = model.entities[&entity]
            .dense
            .as_ref()
            .expect("dense")
            .clone();
        let (m, a, c) = want.encode();
        assert_eq!((mark, above, closed), (Some(m), a, c), "{entity}");
        assert!(want.above.len() <= idem::model::DenseMark::MAX_ABOVE);
        assert!(want.closed.len() <= idem::model::DenseMark::MAX_CLOSED);
    }
    assert!(
        closed_gaps > 0 && refused > 0,
        "closed {closed_gaps}, refused {refused}"
    );
    eprintln!("dense: {closed_gaps} seqs closed at the cap, {refused} late originals refused");
}

/// A plain topic's policy with a one-hour window.
fn hour() -> TopicPolicy {
    TopicPolicy {
        topic: "src".into(),
        window: Duration::from_secs(3600),
        ..TopicPolicy::default()
    }
}

/// `events` to guard under `policy`, with no place in a log (no offset marks).
fn unplaced<'a>(
    events: &'a [Event],
    effects: &'a Effects,
    policy: &'a TopicPolicy,
) -> Vec<GuardInput<'a>> {
    events
        .iter()
        .map(|event| GuardInput {
            event,
            policy,
            effects,
            place: None,
        })
        .collect()
}

/// A batch's calls go out in several pipelines, each as soon as it is
/// built: a script cache flushed under them is loaded again and the batch
/// resent, with the outcomes of the calls that had run kept (they come back
/// as this batch's own duplicates). With a durable wait, the calls and the
/// wait share one pipeline and the wait's answer is checked. A private
/// Redis: the test flushes its scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_as_built_survive_a_flushed_script_cache_and_a_durable_wait_is_checked() {
    use idem::model::Outcome::*;
    use idem::store::DurableWait;
    let redis = private_redis(None).await;
    let prefix = unique("sent");
    let conn = redis_conn(&redis.url()).await;
    let epoch = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix))
        .establish_epoch()
        .await
        .expect("epoch");
    // One event per call: 24 calls, so several pipelines per batch.
    let guard_conn = conn.clone();
    let new_guard = || {
        Guard::new(
            guard_conn.clone(),
            KeyLayout::new(&prefix),
            1,
            epoch.clone(),
        )
    };
    let guard_waiting_for = |replicas: u32| {
        new_guard().with_durable_wait(DurableWait::Replicas(replicas), Duration::from_millis(100))
    };
    let mut guard = new_guard();
    let events: Vec<Event> = (0..24)
        .map(|i| Event {
            ts: None,
            change: None,
            id: format!("e{i}"),
            entity: format!("{prefix}:n{i}"),
            seq: 1,
            op: Op::Upsert,
            kind: None,
            set: vec![("v".into(), i.to_string())],
            unset: Vec::new(),
            fingerprint: i,
        })
        .collect();
    let effects = Effects::default();
    let plain = hour();
    let inputs = unplaced(&events, &effects, &plain);
    let flush = || {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut conn)
                .await
                .expect("SCRIPT FLUSH");
        }
    };

    guard.begin_batch();
    // An attempt of the batch in which only the first ten calls ran.
    flush().await;
    let first = guard.apply(&inputs[..10]).await.expect("first attempt");
    assert!(first.iter().all(|v| v.outcome == Applied), "{first:?}");
    // The cache is empty again: every pipeline answers NOSCRIPT, the script
    // is loaded and the whole batch sent again.
    flush().await;
    let verdicts = guard.apply(&inputs).await.expect("the batch, resent");
    let seen: Vec<_> = verdicts
        .iter()
        .map(|v| (v.outcome, v.earlier_attempt))
        .collect();
    let mut want = vec![(Duplicate, Some(Applied)); 10];
    want.resize(24, (Applied, None));
    assert_eq!(seen, want);
    let entities: Vec<String> = events.iter().map(|e| e.entity.clone()).collect();
    let views = read_entities(&redis.url(), &prefix, entities.iter()).await;
    assert!(
        entities
            .iter()
            .all(|e| views[e].seq == Some(1) && views[e].applied == 1),
        "every entity applied once: {views:?}"
    );

    // A wait for no replica is met: the batch is applied (the barrier's
    // reply is not taken for a call's).
    let more: Vec<Event> = events
        .iter()
        .map(|e| Event {
            id: format!("{}-again", e.id),
            seq: 2,
            ..e.clone()
        })
        .collect();
    let again = |range: std::ops::Range<usize>| unplaced(&more[range], &effects, &plain);
    let mut guard = guard_waiting_for(0);
    guard.begin_batch();
    let waited = guard.apply(&again(0..6)).await.expect("WAIT 0 is met");
    assert!(waited.iter().all(|v| v.outcome == Applied), "{waited:?}");
    // The server has no replica: a wait for one is refused, the batch is not durable.
    let mut guard = guard_waiting_for(1);
    guard.begin_batch();
    let refused = guard.apply(&again(6..7)).await;
    assert!(
        matches!(refused, Err(idem::store::StoreError::NotDurable(_))),
        "the durable wait was not checked: {refused:?}"
    );
}

/// An event whose effects are more than a Lua call can pass as pairs
/// (4,100 set members: 8,200 values, past the ~8,000 of a Lua unpack): its change goes to the outbox with
/// them as one JSON list, and the relay reads every member back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_with_thousands_of_effects_reaches_the_outbox_whole() {
    const MEMBERS: usize = 4_100;
    let prefix = unique("wide-fx");
    let conn = redis_conn(&redis_url()).await;
    let layout = KeyLayout::new(&prefix);
    let epoch = ProgressStore::new(conn.clone(), layout.clone())
        .establish_epoch()
        .await
        .expect("epoch");
    let mut guard = Guard::new(conn.clone(), layout.clone(), 10, epoch);
    let event = Event {
        id: "w".into(),
        entity: format!("{prefix}:e"),
        seq: 1,
        op: Op::Upsert,
        kind: Some("tagged".into()),
        set: vec![("a".into(), "1".into())],
        unset: vec![],
        fingerprint: 1,
        ts: None,
        change: None,
    };
    let effects = Effects {
        state: StateEffect::Merge,
        fields: None,
        mutations: (0..MEMBERS)
            .map(|i| Mutation::SetAdd {
                set: "tags".into(),
                member: format!("m{i}"),
            })
            .collect(),
    };
    let changelog = TopicPolicy {
        changelog: true,
        ..hour()
    };
    let input = GuardInput {
        event: &event,
        policy: &changelog,
        effects: &effects,
        place: None,
    };
    guard.begin_batch();
    let verdicts = guard.apply(&[input]).await.expect("applied");
    assert_eq!(verdicts[0].outcome, Outcome::Applied);
    let outbox = take_outbox(&mut conn.clone(), &prefix, [event.entity.clone()].iter()).await;
    let record = &outbox[&event.entity][0];
    let tags = record["change"]["sets"]["tags"].as_object().unwrap();
    assert_eq!(tags.len(), MEMBERS, "every member");
    assert!(tags.values().all(|added| added == true));
    assert_eq!(record["data"], serde_json::json!({ "a": "1" }));
}

/// An error raised inside the guard script names the file and line it
/// came from, not a line of the joined script: a call with a mutation
/// kind no version knows is refused by mutations.lua's reader.
#[tokio::test]
async fn an_error_raised_in_the_script_names_its_file_and_line() {
    use idem::guard::script::{assemble, Ending};
    let prefix = unique("located");
    let mut conn = redis_conn(&redis_url()).await;
    let script = assemble(&[], Ending::Run);
    // Every key in one slot (the cluster pass runs it too).
    let base = format!("{prefix}:{{e}}");
    let marker = format!("{base}:epoch");
    let _: () = redis::cmd("SET")
        .arg(&marker)
        .arg("E")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script.source())
        .arg(6)
        .arg(&marker)
        .arg(format!("{base}:outbox"));
    for suffix in [":meta", ":state", ":ids:1", ":ids:0"] {
        cmd.arg(format!("{base}{suffix}"));
    }
    // token, epoch, one context (expire_at, no mark field, no prefix, not
    // dense, no changelog); then one event's head, no fields, one
    // mutation of an unknown kind.
    let call = [
        "tokn",
        "E",
        "1",
        "99999999999999",
        "",
        "",
        "",
        "",
        "1",
        "id",
        "idhash!!",
        "fprint!!",
        "0000000000000001",
        "1",
        "0",
        "merge",
        "0",
        "0",
        "0",
        "",
        "1",
        "bogus",
    ];
    for arg in call {
        cmd.arg(arg);
    }
    let err = cmd
        .query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_err();
    let raw = err.to_string();
    assert!(raw.contains("IDEMPROTOCOL unknown mutation bogus"), "{raw}");
    let reader = include_str!("../src/guard/lua/mutations.lua");
    let line = reader
        .lines()
        .position(|l| l.contains("error('IDEMPROTOCOL unknown mutation"))
        .unwrap()
        + 1;
    let located = script.locate(&raw);
    assert!(
        located.contains(&format!("src/guard/lua/mutations.lua:{line}:")),
        "{raw} located as {located}"
    );
    assert!(!located.contains("user_script:"), "{located}");
}
