//! The guard script held to the pure model (`idem::model`) on random
//! sequences against a real Redis: every verdict and every entity's state,
//! counters, ledger and sets, with a random mix of every built-in effect.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use idem::consumed::Mark;
use idem::effects::{Amount, Effects, Mutation, StateEffect, StateOrder};
use idem::event::{Event, Op};
use idem::guard::{Guard, GuardInput, Place};
use idem::model::{Delivery, Model, Outcome};
use idem::store::progress::ProgressStore;
use idem::store::KeyLayout;
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
        return Effects {
            state_order,
            ..Effects::default()
        };
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
        state_order,
        dense_seqs: false,
        changelog: None,
    }
}

/// Random short sequences over a few entities, with redelivered copies,
/// reordering, conflicts, deletes and field removals; a third under
/// per-entity order, a third per field, a third switching event by event
/// (as a keyspace whose `state.order` changed, or a rolling change).
fn random_sequence(rng: &mut StdRng, tag: &str) -> Vec<(Event, Effects)> {
    let entities = 1 + rng.random_range(0..3) as usize;
    let mode = rng.random_range(0..3);
    // Half the sequences number each entity's seqs densely (with gaps,
    // swaps and copies at another id), as a dense topic's would be.
    let dense = rng.random_range(0..2) == 0;
    let mut next_seq = vec![1u64; entities];
    let mut out: Vec<(Event, Effects)> = Vec::new();
    for i in 0..(2 + rng.random_range(0..12)) {
        let roll = rng.random_range(0..10);
        if dense && roll == 4 && !out.is_empty() {
            // A copy under another id (the window forgot the first), or,
            // with another payload, a second event at a decided seq.
            let mut c = out[rng.random_range(0..out.len() as u64) as usize].clone();
            c.0.id = format!("{tag}-{i}-copy");
            if rng.random_range(0..2) == 0 {
                c.0.fingerprint ^= 0x7777;
            }
            out.push(c);
            continue;
        }
        if roll < 2 && !out.is_empty() {
            // A redelivered copy.
            let copy = out[rng.random_range(0..out.len() as u64) as usize].clone();
            out.push(copy);
            continue;
        }
        if roll == 2 && !out.is_empty() {
            // The same id with another payload.
            let mut c = out[rng.random_range(0..out.len() as u64) as usize].clone();
            c.0.fingerprint ^= 0x5555;
            c.0.set.push(("conflict".into(), "1".into()));
            out.push(c);
            continue;
        }
        let e = rng.random_range(0..entities as u64);
        let op = if roll == 3 { Op::Delete } else { Op::Upsert };
        let mut set = Vec::new();
        let mut unset = Vec::new();
        if op == Op::Upsert {
            for f in 0..rng.random_range(0..4) {
                set.push((
                    format!("f{}", (f + rng.random_range(0..3)) % 4),
                    format!("v{i}"),
                ));
            }
            if rng.random_range(0..4) == 0 {
                unset.push(format!("f{}", rng.random_range(0..4)));
                set.retain(|(k, _)| !unset.contains(k));
            }
        }
        let seq = if dense {
            // A gap now and then: a seq never produced.
            next_seq[e as usize] += u64::from(rng.random_range(0..8) == 0);
            next_seq[e as usize] += 1;
            next_seq[e as usize] - 1
        } else {
            rng.random_range(0..8)
        };
        let id = format!("{tag}-{i}");
        let state_order = match mode {
            0 => StateOrder::PerEntity,
            1 => StateOrder::PerField,
            _ if rng.random_range(0..2) == 0 => StateOrder::PerEntity,
            _ => StateOrder::PerField,
        };
        let mut effects = random_effects(rng, &id, seq, state_order);
        effects.dense_seqs = dense;
        let event = Event {
            ts: None,
            change: None,
            id,
            entity: format!("{tag}:{e}"),
            seq,
            op,
            kind: None,
            set,
            unset,
            fingerprint: rng.random::<u64>(),
        };
        out.push((event, effects));
    }
    if dense {
        for i in 1..out.len() {
            if rng.random_range(0..5) == 0 {
                out.swap(i - 1, i);
            }
        }
    }
    // Half the sequences are of a changelog topic: their changes go to the outbox.
    if rng.random_range(0..2) == 0 {
        for (_, effects) in &mut out {
            effects.changelog = Some("src".into());
        }
    }
    out
}

/// An entity's dense-seq meta fields: `dense`, `dense_above`, `dense_closed`.
async fn dense_fields(
    prefix: &str,
    entity: &str,
) -> (Option<String>, Option<String>, Option<String>) {
    redis::cmd("HMGET")
        .arg(KeyLayout::new(prefix).entity(entity).meta())
        .arg("dense")
        .arg("dense_above")
        .arg("dense_closed")
        .query_async(&mut redis_conn(&redis_url()).await)
        .await
        .unwrap()
}

/// One record of a round as delivered: (sequence, event, and its mark
/// field and mark, or none for a topic without an id).
type Delivered = (usize, usize, Option<(String, Mark)>);

/// How a round's logs are consumed, as batches in delivery order. Each
/// sequence's events are the log of one partition (sometimes two, so that
/// an entity's events span partitions; one in five has no topic id), at
/// offsets with gaps (transaction markers, compaction). Each partition is
/// read by runs: the first from offset 0 or, now and then, after a forward
/// skip (`latest`, `--allow-skip`), then perhaps a replay from earliest or
/// a rewind to a random offset, each a new run of consumption. A batch
/// holds the next few records of every partition, never across runs (a
/// batch that goes back in offset restarts consumption).
fn schedule(rng: &mut StdRng, sequences: &[Vec<(Event, Effects)>]) -> Vec<Vec<Delivered>> {
    let mut batches: Vec<Vec<Delivered>> = Vec::new();
    for (s, sequence) in sequences.iter().enumerate() {
        let count = 1 + usize::from(rng.random_range(0..4) == 0);
        let mut logs: Vec<Vec<(usize, i64)>> = vec![Vec::new(); count];
        for i in 0..sequence.len() {
            let log = &mut logs[rng.random_range(0..count as u64) as usize];
            let next = log.last().map_or(0, |&(_, o)| o + 1);
            let gap = if rng.random_range(0..5) == 0 {
                rng.random_range(1..4)
            } else {
                0
            };
            log.push((i, next + gap));
        }
        for (p, log) in logs.iter().enumerate() {
            let field = (rng.random_range(0..5) != 0).then(|| format!("o:000000000000:{s}.{p}"));
            let mut b = 0;
            let mut from = if rng.random_range(0..4) == 0 {
                rng.random_range(0..=log.len() as u64) as usize
            } else {
                0
            };
            loop {
                let run_start = if from == 0 { 0 } else { log[from - 1].1 + 1 };
                let run: Vec<Delivered> = log[from..]
                    .iter()
                    .map(|&(i, offset)| {
                        (s, i, field.clone().map(|f| (f, Mark { run_start, offset })))
                    })
                    .collect();
                for chunk in run.chunks(1 + rng.random_range(0..6) as usize) {
                    if batches.len() <= b {
                        batches.push(Vec::new());
                    }
                    batches[b].extend(chunk.iter().cloned());
                    b += 1;
                }
                if log.is_empty() || rng.random_range(0..3) != 0 {
                    break;
                }
                // A replay from earliest or a rewind: a new run.
                from = if rng.random_range(0..2) == 0 {
                    0
                } else {
                    rng.random_range(0..log.len() as u64) as usize
                };
            }
        }
    }
    batches
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

/// The script and the model decide the same, record by record, and leave
/// the same state, counters, ledgers, sets, field seqs, dense marks and
/// offset marks: random sequences (reorderings, copies, conflicts, gaps in
/// dense seqs, every order mode) read by runs with forward skips, replays
/// and rewinds, batches retried after a lost reply (whole or in part), and
/// ids forgotten as if the window had passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_script_matches_the_model_on_random_sequences() {
    // The cluster pass checks the same script through slot routing: a fifth
    // of the sequences is enough there.
    let cluster = redis_mode(&redis_url()) == idem::config::RedisMode::Cluster;
    let sequences_total: usize = if cluster { 2_000 } else { 10_000 };
    let prefix = unique("diff");
    let mut conn = redis_conn(&redis_url()).await;
    let mut rng = StdRng::seed_from_u64(0xD1FF);
    let (mut checked_events, mut retries) = (0, 0);
    let mut outcomes = std::collections::BTreeMap::new();
    let window = Duration::from_secs(3600);
    let epoch = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix))
        .establish_epoch()
        .await
        .expect("epoch");
    let mut token = 0u32;
    let mut changes_total = 0;
    for round in 0..(sequences_total / 100) {
        // 100 sequences per round; each sequence has its own entities.
        let events_per_script = 1 + rng.random_range(0..40) as usize;
        let mut guard = Guard::new(
            conn.clone(),
            KeyLayout::new(&prefix),
            events_per_script,
            epoch.clone(),
        );
        let sequences: Vec<Vec<(Event, Effects)>> = (0..100)
            .map(|s| random_sequence(&mut rng, &format!("r{round}s{s}")))
            .collect();
        let mut model = Model::default();
        // Per entity, the ids of the events whose decision made a change.
        let mut changes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for batch in schedule(&mut rng, &sequences) {
            guard.begin_batch();
            token += 1;
            let mut attempts = vec![batch.clone()];
            if rng.random_range(0..6) == 0 {
                // An earlier attempt whose reply was lost: some calls (whole
                // entities) or all of it went through.
                let entity = |d: &Delivered| sequences[d.0][d.1].0.entity.clone();
                let through: std::collections::BTreeSet<String> = batch
                    .iter()
                    .map(entity)
                    .filter(|_| rng.random_range(0..2) == 0)
                    .collect();
                let part: Vec<Delivered> = batch
                    .iter()
                    .filter(|d| through.contains(&entity(d)))
                    .cloned()
                    .collect();
                attempts.insert(0, part);
                retries += 1;
            }
            for attempt in attempts {
                let records: Vec<&(Event, Effects)> =
                    attempt.iter().map(|(s, i, _)| &sequences[*s][*i]).collect();
                let inputs: Vec<GuardInput<'_>> = records
                    .iter()
                    .zip(&attempt)
                    .map(|((event, effects), (_, _, place))| GuardInput {
                        event,
                        window,
                        effects,
                        place: place.as_ref().map(|(field, mark)| Place {
                            mark_field: field,
                            offset: mark.offset,
                            run_start: mark.run_start,
                        }),
                    })
                    .collect();
                let deliveries: Vec<Delivery<'_>> = records
                    .iter()
                    .zip(&attempt)
                    .map(|((event, effects), (_, _, place))| Delivery {
                        event,
                        effects,
                        place: place.as_ref().map(|(field, mark)| (field.as_str(), *mark)),
                    })
                    .collect();
                let verdicts = guard.apply(&inputs).await.unwrap();
                let want = model.apply_batch(&deliveries, token);
                for ((verdict, want), (event, effects)) in verdicts.iter().zip(&want).zip(&records)
                {
                    assert_eq!(
                        (verdict.outcome, verdict.earlier_attempt),
                        (want.outcome, want.earlier_attempt),
                        "outcome of {event:?} with {effects:?}"
                    );
                    *outcomes.entry(want.outcome.as_str()).or_insert(0u64) += 1;
                    if effects.changelog.is_some()
                        && want.earlier_attempt.is_none()
                        && matches!(
                            want.outcome,
                            Outcome::Applied | Outcome::Late | Outcome::Partial
                        )
                    {
                        changes
                            .entry(event.entity.clone())
                            .or_default()
                            .push(event.id.clone());
                    }
                }
                checked_events += records.len();
            }
            if rng.random_range(0..3) == 0 {
                // A sequence of this batch, whose later batches then read on
                // (or replay) with its ids forgotten.
                let s = batch[rng.random_range(0..batch.len() as u64) as usize].0;
                for entity in sequences[s]
                    .iter()
                    .map(|(e, _)| &e.entity)
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    expire_ids(&mut conn, &prefix, entity, &mut model).await;
                }
            }
        }
        assert_entities_match(&mut conn, &prefix, &model).await;
        let changelog: BTreeSet<&String> = sequences
            .iter()
            .flatten()
            .filter(|(_, effects)| effects.changelog.is_some())
            .map(|(e, _)| &e.entity)
            .collect();
        changes_total +=
            assert_changes_rebuild_the_view(&mut conn, &prefix, &model, &changelog, &changes).await;
    }
    eprintln!("differential: {changes_total} changes in the outbox rebuild their views;");
    eprintln!("differential: {sequences_total} sequences, {checked_events} records delivered ({retries} batches retried), Lua == model; outcomes {outcomes:?}");
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
    let views = read_entities(&redis_url(), prefix, model.entities.keys()).await;
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
async fn assert_entities_match(conn: &mut idem::store::RedisConn, prefix: &str, model: &Model) {
    let views = read_entities(&redis_url(), prefix, model.entities.keys()).await;
    for (name, want) in &model.entities {
        let got = &views[name];
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
        let dense = dense_fields(prefix, name).await;
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
/// (src/guard/args.rs) and the script's readers (guard.lua) agree.
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
                state_order: StateOrder::PerEntity,
                dense_seqs: false,
                changelog: None,
            },
            "merge",
        ),
        (
            event("b", Op::Upsert, &[("k", "v")], &[]),
            Effects {
                state: StateEffect::Replace,
                fields: None,
                mutations: Vec::new(),
                state_order: StateOrder::PerEntity,
                dense_seqs: false,
                changelog: Some("orders".into()),
            },
            "replace",
        ),
        (
            event("c", Op::Upsert, &[], &[]),
            Effects {
                state: StateEffect::Keep,
                fields: None,
                mutations: vec![mutations[2].clone()],
                state_order: StateOrder::PerEntity,
                dense_seqs: false,
                changelog: None,
            },
            "keep",
        ),
        (
            event("d", Op::Delete, &[], &[]),
            Effects::default(),
            "delete",
        ),
        // Per-field order: the field seqs are the event's first effect key.
        (
            event("e", Op::Upsert, &[("k", "v")], &["gone"]),
            Effects {
                state: StateEffect::Merge,
                fields: None,
                mutations: mutations.clone(),
                state_order: StateOrder::PerField,
                dense_seqs: true,
                changelog: None,
            },
            "merge",
        ),
        (
            event("f", Op::Delete, &[], &[]),
            Effects {
                state_order: StateOrder::PerField,
                ..Effects::default()
            },
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
        .map(|(i, (event, effects, _))| GuardInput {
            event,
            window: Duration::from_secs(3600),
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
        .map(|(i, (e, effects, op))| {
            let written = |k: &String| effects.writes_field(k);
            // Each effect key once, in the order the mutations name them,
            // after the field seqs under per-field order.
            let per_field = effects.state_order == StateOrder::PerField;
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
                "op": op, "per_field": per_field, "dense": effects.dense_seqs, "type": "deposit",
                "set": e.set.iter().filter(|(k, _)| written(k))
                    .flat_map(|(k, v)| [k.clone(), v.clone()]).collect::<Vec<_>>(),
                "unset": e.unset.iter().filter(|k| written(k)).collect::<Vec<_>>(),
                "mutations": effects.mutations.iter().map(|m| meaning(m, &e.set)).collect::<Vec<_>>(),
                "commutative": effects.mutations.iter().any(Mutation::commutes),
                "changelog": effects.changelog.as_deref().unwrap_or(""),
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
            state_order: StateOrder::PerEntity,
            dense_seqs: false,
            changelog: None,
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
            window: Duration::from_secs(3600),
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
    let at = |event: &'static Event, offset: i64| GuardInput {
        event,
        window: Duration::from_secs(3600),
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
    let conn = redis_conn(&redis_url()).await;
    let mut rng = StdRng::seed_from_u64(0xDE45E);
    let epoch = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix))
        .establish_epoch()
        .await
        .expect("epoch");
    let mut guard = Guard::new(conn.clone(), KeyLayout::new(&prefix), 64, epoch);
    let effects = Effects {
        dense_seqs: true,
        ..Effects::default()
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
        let inputs = unplaced(&events, &effects);
        let verdicts = guard.apply(&inputs).await.unwrap();
        for (e, v) in events.iter().zip(&verdicts) {
            let want = model.apply_effects(e, &effects);
            assert_eq!(v.outcome, want, "{e:?}");
            closed_gaps += v.dense_seqs_closed;
            if want == idem::model::Outcome::Invalid {
                refused += 1;
                assert_eq!(v.rejection.as_ref().map(|r| r.0), Some("seq_gap_closed"));
            }
        }
        let (mark, above, closed) = dense_fields(&prefix, &entity).await;
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

/// `events` to guard in a one-hour window, with no place in a log (no offset marks).
fn unplaced<'a>(events: &'a [Event], effects: &'a Effects) -> Vec<GuardInput<'a>> {
    events
        .iter()
        .map(|event| GuardInput {
            event,
            window: Duration::from_secs(3600),
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
    let inputs = unplaced(&events, &effects);
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
    let again = |range: std::ops::Range<usize>| unplaced(&more[range], &effects);
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
        state_order: StateOrder::PerEntity,
        dense_seqs: false,
        changelog: Some("src".into()),
    };
    let input = GuardInput {
        event: &event,
        window: Duration::from_secs(3600),
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
