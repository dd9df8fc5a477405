//! The model's own tests: outcomes by table and by example, and the
//! in-order state per field whatever the arrival order.

use super::*;
use crate::config::TopicPolicy;
use crate::effects::{Effects, StateEffect, StateOrder, MERGE};
use crate::event::{Event, Op};

mod marks;
mod mutations;
mod per_field;

/// A topic's policy under `state_order`, with a window of one second.
fn policy(state_order: StateOrder) -> TopicPolicy {
    TopicPolicy {
        window: std::time::Duration::from_secs(1),
        state_order,
        ..TopicPolicy::default()
    }
}

/// The labels are a contract (metrics, reports, alerts).
#[test]
fn outcome_labels() {
    let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(
        labels,
        [
            "applied",
            "duplicate",
            "stale",
            "conflict",
            "invalid",
            "late",
            "replayed",
            "partial"
        ]
    );
}

#[test]
fn classify_by_table() {
    use Outcome::*;
    let table = [
        (Some(1), 1, Some(9), 3, Duplicate),
        (Some(1), 1, None, 3, Duplicate),
        (Some(1), 2, Some(9), 30, Conflict),
        (None, 1, None, 0, Applied),
        (None, 1, Some(2), 3, Applied),
        (None, 1, Some(3), 3, Stale),
        (None, 1, Some(4), 3, Stale),
        (None, 1, Some(u64::MAX - 1), u64::MAX, Applied),
    ];
    for (seen, fp, recorded, seq, want) in table {
        assert_eq!(
            classify(seen, fp, recorded, seq),
            want,
            "{seen:?} {fp} {recorded:?} {seq}"
        );
    }
}

fn ev(id: &str, seq: u64, op: Op, set: &[(&str, &str)], fp: u64) -> Event {
    Event {
        ts: None,
        change: None,
        id: id.into(),
        entity: "e".into(),
        seq,
        op,
        kind: None,
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        unset: vec![],
        fingerprint: fp,
    }
}

#[test]
fn tombstone_keeps_seq_so_late_updates_cannot_resurrect() {
    let mut m = Model::default();
    assert_eq!(
        m.apply(&ev("a", 1, Op::Upsert, &[("x", "1")], 1)),
        Outcome::Applied
    );
    assert_eq!(m.apply(&ev("b", 3, Op::Delete, &[], 2)), Outcome::Applied);
    assert_eq!(
        m.apply(&ev("c", 2, Op::Upsert, &[("x", "2")], 3)),
        Outcome::Stale
    );
    let e = &m.entities["e"];
    assert!(e.deleted && e.state.is_empty());
    assert_eq!(e.seq, Some(3));
    assert_eq!(
        m.apply(&ev("d", 4, Op::Upsert, &[("y", "1")], 4)),
        Outcome::Applied
    );
    let e = &m.entities["e"];
    assert!(!e.deleted);
    assert_eq!(e.state.len(), 1);
    assert_eq!(e.applied, 3);
}

#[test]
fn stale_ids_are_remembered_and_window_expiry_turns_duplicates_stale() {
    let mut m = Model::default();
    m.apply(&ev("a", 5, Op::Upsert, &[], 1));
    assert_eq!(m.apply(&ev("b", 4, Op::Upsert, &[], 2)), Outcome::Stale);
    assert_eq!(m.apply(&ev("b", 4, Op::Upsert, &[], 2)), Outcome::Duplicate);
    m.expire_window();
    assert_eq!(m.apply(&ev("a", 5, Op::Upsert, &[], 1)), Outcome::Stale);
}

/// The table of `apply_at`: an id reused after the window is decided by
/// its seq again; between one and two windows the entity is ambiguous.
#[test]
fn windowed_model_forgets_ids_like_redis() {
    let window = policy(StateOrder::PerEntity);
    for (gap, keep, reused_outcome, ambiguous) in [
        (500, false, Outcome::Duplicate, false),
        (999, false, Outcome::Duplicate, false),
        (1000, false, Outcome::Applied, true),
        (1000, true, Outcome::Duplicate, true),
        (1500, false, Outcome::Applied, true),
        (1500, true, Outcome::Duplicate, true),
        (1999, true, Outcome::Duplicate, true),
        (2000, true, Outcome::Applied, false),
        (2500, true, Outcome::Applied, false),
    ] {
        let mut m = Model::default();
        let first = m.apply_at(
            &ev("a", 1, Op::Upsert, &[], 1),
            &Effects::default(),
            &window,
            0,
            keep,
        );
        assert_eq!(first, Outcome::Applied);
        // The same id reused for a newer intent (same fingerprint: the
        // window cannot tell it from a redelivery).
        let outcome = m.apply_at(
            &ev("a", 2, Op::Upsert, &[], 1),
            &Effects::default(),
            &window,
            gap,
            keep,
        );
        assert_eq!(outcome, reused_outcome, "gap {gap}");
        assert_eq!(m.entities["e"].window_ambiguous, ambiguous, "gap {gap}");
    }
}

/// A random history of one entity: merges (with set and removed
/// fields), replaces, deletes and keeps, seqs from a small range so that
/// some are equal when `distinct` is false.
fn random_history(rng: &mut rand::rngs::StdRng, distinct: bool) -> Vec<(Event, Effects)> {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let n = rng.random_range(1..10);
    let mut seqs: Vec<u64> = if distinct {
        let mut all: Vec<u64> = (1..=12).collect();
        all.shuffle(rng);
        all.truncate(n);
        all
    } else {
        (0..n).map(|_| rng.random_range(1..6)).collect()
    };
    seqs.shuffle(rng);
    seqs.iter()
        .enumerate()
        .map(|(i, &seq)| {
            let roll = rng.random_range(0..10);
            let op = if roll == 0 { Op::Delete } else { Op::Upsert };
            let state = match roll {
                1 | 2 => StateEffect::Replace,
                3 => StateEffect::Keep,
                _ => StateEffect::Merge,
            };
            let mut set = Vec::new();
            let mut unset = Vec::new();
            if op == Op::Upsert {
                for f in 0..4 {
                    match rng.random_range(0..4) {
                        0 => set.push((format!("f{f}"), format!("v{}", rng.random_range(0..3)))),
                        1 => unset.push(format!("f{f}")),
                        _ => {}
                    }
                }
            }
            let event = Event {
                ts: None,
                change: None,
                id: format!("e{i}"),
                entity: "e".into(),
                seq,
                op,
                kind: None,
                set,
                unset,
                fingerprint: i as u64,
            };
            let effects = Effects {
                state,
                ..Effects::default()
            };
            (event, effects)
        })
        .collect()
}

fn run(history: &[(Event, Effects)], order: StateOrder) -> EntityModel {
    let mut m = EntityModel::default();
    for (event, effects) in history {
        m.apply_effects(event, effects, &policy(order));
    }
    m
}

/// Per-field order's promise, on 5,000 random histories: every arrival
/// order ends in the same state and existence; with distinct seqs that
/// is the state of applying the events one by one in seq order under
/// per-entity order (where every event is newer than the last).
#[test]
fn per_field_order_ends_in_the_in_order_state_whatever_the_arrival_order() {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xF1E1D);
    for trial in 0..5_000 {
        let distinct = trial % 2 == 0;
        let history = random_history(&mut rng, distinct);
        let mut shuffled = history.clone();
        shuffled.shuffle(&mut rng);
        let per_field = StateOrder::PerField;
        let (a, b) = (run(&history, per_field), run(&shuffled, per_field));
        assert_eq!(
            (&a.state, a.deleted),
            (&b.state, b.deleted),
            "{history:?}\nagainst\n{shuffled:?}"
        );
        if distinct {
            let mut in_order = history.clone();
            in_order.sort_by_key(|(e, _)| e.seq);
            let want = run(&in_order, StateOrder::PerEntity);
            assert_eq!(
                (&a.state, a.deleted),
                (&want.state, want.deleted),
                "{history:?}"
            );
        }
    }
}

/// An ordered effect (a counter set to a value, as a chained idem's
/// change says) applies with a newer event, and never with a late one.
#[test]
fn an_ordered_effect_applies_only_with_a_newer_event() {
    let set_to = |value: &str| Effects {
        mutations: vec![crate::effects::Mutation::SetCounter {
            field: "abs".into(),
            value: Some(value.into()),
        }],
        ..Effects::default()
    };
    let plain = policy(StateOrder::PerEntity);
    let mut m = EntityModel::default();
    let newer = ev("a", 2, Op::Upsert, &[], 1);
    assert_eq!(
        m.apply_effects(&newer, &set_to("1.50"), &plain),
        Outcome::Applied
    );
    assert_eq!(m.counters["abs"].to_string(), "1.50");
    let older = ev("b", 1, Op::Upsert, &[], 2);
    assert_eq!(
        m.apply_effects(&older, &set_to("9"), &plain),
        Outcome::Stale
    );
    assert_eq!(m.counters["abs"].to_string(), "1.50");
}

/// The lost update the per-entity rule makes: a status at seq 10 after
/// a deposit (state kept) at 11 is stale per entity, and written per field.
#[test]
fn a_late_field_is_written_per_field_and_stale_per_entity() {
    let deposit = ev("d", 11, Op::Upsert, &[], 1);
    let status = ev("s", 10, Op::Upsert, &[("status", "frozen")], 2);
    for (order, want, state) in [
        (StateOrder::PerEntity, Outcome::Stale, None),
        (StateOrder::PerField, Outcome::Applied, Some("frozen")),
    ] {
        let keep = Effects {
            state: StateEffect::Keep,
            ..Effects::default()
        };
        let (merge, policy) = (Effects::default(), policy(order));
        let mut m = EntityModel::default();
        assert_eq!(m.apply_effects(&deposit, &keep, &policy), Outcome::Applied);
        assert_eq!(m.apply_effects(&status, &merge, &policy), want, "{order:?}");
        assert_eq!(m.state.get("status").map(String::as_str), state);
        assert_eq!(m.seq, Some(11));
    }
}

/// Outcomes under per-field order, and the switch from per-entity order.
#[test]
fn per_field_outcomes_by_example() {
    let per_field = policy(StateOrder::PerField);
    let merge = Effects::default();
    let replace = Effects {
        state: StateEffect::Replace,
        ..merge.clone()
    };
    let mut m = EntityModel::default();
    m.apply_effects(
        &ev("a", 5, Op::Upsert, &[("x", "1")], 1),
        &merge,
        &per_field,
    );
    // y is new, x has a newer writer: partial.
    assert_eq!(
        m.apply_effects(
            &ev("b", 3, Op::Upsert, &[("x", "0"), ("y", "0")], 2),
            &merge,
            &per_field
        ),
        Outcome::Partial
    );
    assert_eq!(m.state.get("x").map(String::as_str), Some("1"));
    // A replace at 7 removes both; a write at 6 comes too late.
    assert_eq!(
        m.apply_effects(
            &ev("c", 7, Op::Upsert, &[("z", "1")], 3),
            &replace,
            &per_field
        ),
        Outcome::Applied
    );
    assert_eq!(
        m.apply_effects(
            &ev("d", 6, Op::Upsert, &[("w", "1")], 4),
            &merge,
            &per_field
        ),
        Outcome::Stale
    );
    assert_eq!(m.state.keys().collect::<Vec<_>>(), ["z"]);
    // A delete at 5 is below the floor; one at 9 empties; an upsert
    // without data at 10 brings the entity back.
    assert_eq!(
        m.apply_effects(&ev("e", 5, Op::Delete, &[], 5), &merge, &per_field),
        Outcome::Stale
    );
    assert_eq!(
        m.apply_effects(&ev("f", 9, Op::Delete, &[], 6), &merge, &per_field),
        Outcome::Applied
    );
    assert!(m.deleted && m.state.is_empty());
    assert_eq!(
        m.apply_effects(&ev("g", 10, Op::Upsert, &[], 7), &merge, &per_field),
        Outcome::Applied
    );
    assert!(!m.deleted);
    // An entity decided per entity up to seq 20: older stays stale.
    let mut m = EntityModel::default();
    m.apply(&ev("a", 20, Op::Upsert, &[("x", "1")], 1));
    assert_eq!(
        m.apply_effects(
            &ev("b", 19, Op::Upsert, &[("y", "1")], 2),
            &merge,
            &per_field
        ),
        Outcome::Stale
    );
    assert_eq!(m.floor, Some((20, true)));
    assert_eq!(
        m.apply_effects(
            &ev("c", 21, Op::Upsert, &[("y", "2")], 3),
            &merge,
            &per_field
        ),
        Outcome::Applied
    );
    // Copies after the window change nothing, and say so: a merge, a
    // replace and a delete at the seq they already wrote.
    let del = ev("d", 22, Op::Delete, &[], 4);
    let rep = ev("r", 23, Op::Upsert, &[("y", "3")], 5);
    assert_eq!(m.apply_effects(&del, &merge, &per_field), Outcome::Applied);
    assert_eq!(
        m.apply_effects(&rep, &replace, &per_field),
        Outcome::Applied
    );
    let before = m.clone();
    m.remembered.clear();
    for (event, effects) in [
        (&ev("c", 21, Op::Upsert, &[("y", "2")], 3), &merge),
        (&del, &merge),
        (&rep, &replace),
    ] {
        assert_eq!(
            m.apply_effects(event, effects, &per_field),
            Outcome::Stale,
            "{event:?}"
        );
    }
    assert_eq!(
        (&m.state, m.deleted, m.applied),
        (&before.state, before.deleted, before.applied)
    );
}

/// The dense-seq rule by example: copies at another id, another event
/// at a decided seq, a gap closed at the cap and a late original in it,
/// an entity decided before the rule began.
#[test]
fn dense_seqs_by_example() {
    let dense = TopicPolicy {
        dense_seqs: true,
        ..TopicPolicy::default()
    };
    let mut m = EntityModel::default();
    for seq in 1..=3 {
        assert_eq!(
            m.apply_effects(
                &ev(&format!("a{seq}"), seq, Op::Upsert, &[], seq),
                &MERGE,
                &dense
            ),
            Outcome::Applied
        );
    }
    // The window forgot the ids: a copy is a duplicate by its seq.
    m.remembered.clear();
    assert_eq!(
        m.apply_effects(&ev("a2", 2, Op::Upsert, &[], 2), &MERGE, &dense),
        Outcome::Duplicate
    );
    assert_eq!(
        m.apply_effects(&ev("x", 2, Op::Upsert, &[], 2), &MERGE, &dense),
        Outcome::Duplicate
    );
    // At the newest seq idem knows the fingerprint: another event is a conflict.
    assert_eq!(
        m.apply_effects(&ev("y", 3, Op::Upsert, &[], 99), &MERGE, &dense),
        Outcome::Conflict
    );
    assert_eq!(
        m.dense.as_ref().unwrap().encode(),
        ("1:3".to_string(), None, None)
    );
    // Seq 4 never comes; 5 ..= 37 wait above it, one more than the cap.
    for seq in 5..=37 {
        m.apply_effects(
            &ev(&format!("a{seq}"), seq, Op::Upsert, &[], seq),
            &MERGE,
            &dense,
        );
    }
    let d = m.dense.clone().unwrap();
    assert_eq!(
        (d.mark, d.above.len(), d.closed.clone(), d.seqs_closed),
        (37, 0, vec![(4, 4)], 1)
    );
    // Another event at a waiting seq is a conflict too.
    let mut w = EntityModel::default();
    w.apply_effects(&ev("b1", 1, Op::Upsert, &[], 1), &MERGE, &dense);
    w.apply_effects(&ev("b3", 3, Op::Upsert, &[], 3), &MERGE, &dense);
    assert_eq!(
        w.apply_effects(&ev("z", 3, Op::Upsert, &[], 7), &MERGE, &dense),
        Outcome::Conflict
    );
    assert_eq!(
        w.dense.as_ref().unwrap().encode().1.as_deref(),
        Some("3=0000000000000003")
    );
    // The late original of seq 4: refused (dead-lettered), nothing written.
    let before = m.clone();
    assert_eq!(
        m.apply_effects(&ev("a4", 4, Op::Upsert, &[("v", "4")], 4), &MERGE, &dense),
        Outcome::Invalid
    );
    assert_eq!(m, before);
    // An entity decided before the rule: it begins one past its seq,
    // and what is older is decided as before (stale).
    let mut old = EntityModel::default();
    old.apply(&ev("o10", 10, Op::Upsert, &[], 10));
    assert_eq!(
        old.apply_effects(&ev("o11", 11, Op::Upsert, &[], 11), &MERGE, &dense),
        Outcome::Applied
    );
    assert_eq!(old.dense.as_ref().unwrap().encode().0, "11:11");
    assert_eq!(
        old.apply_effects(&ev("o5", 5, Op::Upsert, &[], 5), &MERGE, &dense),
        Outcome::Stale
    );
}

/// A `partial` event's id is remembered and forgotten with the window,
/// as every decided id is (the windowed model reconcile uses).
#[test]
fn a_partial_events_id_leaves_the_window_like_any_other() {
    let merge = Effects::default();
    let per_field = policy(StateOrder::PerField);
    let mut m = Model::default();
    let newer = ev("b", 3, Op::Upsert, &[("z", "1")], 1);
    let older = ev("a", 2, Op::Upsert, &[("z", "0"), ("y", "0")], 2);
    assert_eq!(
        m.apply_at(&newer, &merge, &per_field, 0, false),
        Outcome::Applied
    );
    assert_eq!(
        m.apply_at(&older, &merge, &per_field, 1, false),
        Outcome::Partial
    );
    assert_eq!(
        m.apply_at(&older, &merge, &per_field, 500, false),
        Outcome::Duplicate
    );
    assert_eq!(
        m.apply_at(&older, &merge, &per_field, 3000, false),
        Outcome::Stale
    );
}
