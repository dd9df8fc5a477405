//! Per-field order (per_field.rs) at its edges: a floor won under a newer
//! field, ties at one seq, and existence decided by an event with no data.

use super::{ev, policy};
use crate::effects::{Effects, StateEffect, StateOrder, MERGE};
use crate::event::Op;
use crate::model::{EntityModel, Outcome};

/// A replace of the whole state.
fn replace() -> Effects {
    Effects {
        state: StateEffect::Replace,
        ..Effects::default()
    }
}

/// A replace older than one of its fields' writers still raises the
/// floor: it wins that, loses the field, and is partial.
#[test]
fn a_replace_under_a_newer_field_is_partial() {
    let per_field = policy(StateOrder::PerField);
    let replace = replace();
    let mut m = EntityModel::default();
    let newer = ev("a", 10, Op::Upsert, &[("x", "new")], 1);
    assert_eq!(
        m.apply_effects(&newer, &MERGE, &per_field),
        Outcome::Applied
    );
    let older = ev("b", 7, Op::Upsert, &[("x", "old")], 2);
    assert_eq!(
        m.apply_effects(&older, &replace, &per_field),
        Outcome::Partial
    );
    assert_eq!(m.state.get("x").map(String::as_str), Some("new"));
    assert_eq!(m.floor, Some((7, false)));
}

/// At one seq the greater value wins (the script and the model agree on
/// one order whatever the arrival order).
#[test]
fn at_one_seq_the_greater_value_wins() {
    let per_field = policy(StateOrder::PerField);
    let mut m = EntityModel::default();
    let x = |m: &EntityModel| m.state.get("x").cloned();
    m.apply_effects(
        &ev("a", 5, Op::Upsert, &[("x", "b")], 1),
        &MERGE,
        &per_field,
    );
    m.apply_effects(
        &ev("c", 5, Op::Upsert, &[("x", "a")], 2),
        &MERGE,
        &per_field,
    );
    assert_eq!(x(&m).as_deref(), Some("b"));
    m.apply_effects(
        &ev("d", 5, Op::Upsert, &[("x", "c")], 3),
        &MERGE,
        &per_field,
    );
    assert_eq!(x(&m).as_deref(), Some("c"));
}

/// An older delete raises the floor (a win) without deciding existence,
/// which a newer write holds: applied, and the entity still exists.
#[test]
fn an_older_delete_wins_the_floor_only() {
    let per_field = policy(StateOrder::PerField);
    let mut m = EntityModel::default();
    m.apply_effects(
        &ev("a", 10, Op::Upsert, &[("x", "1")], 1),
        &MERGE,
        &per_field,
    );
    let delete = ev("b", 7, Op::Delete, &[], 2);
    assert_eq!(
        m.apply_effects(&delete, &MERGE, &per_field),
        Outcome::Applied
    );
    assert_eq!((m.floor, m.deleted), (Some((7, true)), false));
}

/// A merge with no data decides that the entity exists: after an event
/// that kept the state (no existence decided), an older one still wins it.
#[test]
fn a_merge_without_data_decides_existence() {
    let per_field = policy(StateOrder::PerField);
    let keep = Effects {
        state: StateEffect::Keep,
        ..Effects::default()
    };
    let mut m = EntityModel::default();
    m.apply_effects(&ev("a", 10, Op::Upsert, &[], 1), &keep, &per_field);
    let empty = ev("b", 7, Op::Upsert, &[], 2);
    assert_eq!(
        m.apply_effects(&empty, &MERGE, &per_field),
        Outcome::Applied
    );
    assert_eq!(m.exists_seq, Some(7));
}

/// A second replace at the floor's own seq does not raise it (a loss) but
/// may win a field by the tie rule: partial.
#[test]
fn a_replace_at_the_floors_seq_loses_the_floor() {
    let per_field = policy(StateOrder::PerField);
    let replace = replace();
    let mut m = EntityModel::default();
    let first = ev("a", 7, Op::Upsert, &[("x", "a")], 1);
    assert_eq!(
        m.apply_effects(&first, &replace, &per_field),
        Outcome::Applied
    );
    let second = ev("b", 7, Op::Upsert, &[("x", "b")], 2);
    assert_eq!(
        m.apply_effects(&second, &replace, &per_field),
        Outcome::Partial
    );
    assert_eq!(m.state.get("x").map(String::as_str), Some("b"));
}
