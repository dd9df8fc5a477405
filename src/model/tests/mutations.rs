//! The mutations (mutations.rs): ledgers trimmed to their length, set
//! members by their newest seq, counters as Redis stores them, and the
//! view reconcile compares.

use super::{ev, policy};
use crate::effects::{Amount, Effects, Mutation, StateOrder};
use crate::event::Op;
use crate::model::{EntityModel, Outcome};

fn with(mutations: Vec<Mutation>) -> Effects {
    Effects {
        mutations,
        ..Effects::default()
    }
}

/// A ledger keeps its newest `max_len` entries, in the order appended.
#[test]
fn a_ledger_keeps_its_newest_entries() {
    let plain = policy(StateOrder::PerEntity);
    let mut m = EntityModel::default();
    for seq in 1..=3 {
        let append = with(vec![Mutation::Append {
            stream: "l".into(),
            entry: vec![("n".into(), seq.to_string())],
            max_len: 2,
            max_age_ms: 0,
        }]);
        let e = ev(&format!("i{seq}"), seq, Op::Upsert, &[], seq);
        assert_eq!(m.apply_effects(&e, &append, &plain), Outcome::Applied);
    }
    let kept: Vec<&str> = m.ledgers["l"].iter().map(|e| e[0].1.as_str()).collect();
    assert_eq!(kept, ["2", "3"]);
}

/// A set member follows its newest add or remove; at one seq the remove
/// wins; an older one changes nothing, late or not.
#[test]
fn a_set_member_follows_its_newest_seq() {
    let plain = policy(StateOrder::PerEntity);
    let add = with(vec![Mutation::SetAdd {
        set: "s".into(),
        member: "m".into(),
    }]);
    let remove = with(vec![Mutation::SetRemove {
        set: "s".into(),
        member: "m".into(),
    }]);
    let mut m = EntityModel::default();
    let has = |m: &EntityModel| m.sets.get("s").is_some_and(|s| s.contains("m"));
    m.apply_effects(&ev("a", 5, Op::Upsert, &[], 1), &add, &plain);
    assert!(has(&m));
    // Late (seq 3 < 5): applied as a commutative change, but older.
    assert_eq!(
        m.apply_effects(&ev("b", 3, Op::Upsert, &[], 2), &remove, &plain),
        Outcome::Late
    );
    assert!(has(&m));
    m.apply_effects(&ev("c", 5, Op::Upsert, &[], 3), &remove, &plain);
    assert!(!has(&m), "a remove at the add's seq wins");
    m.apply_effects(&ev("d", 7, Op::Upsert, &[], 4), &add, &plain);
    assert!(has(&m));
    assert_eq!(m.set_seqs["s"]["m"], 7);
}

/// The view holds what the model stores: counters as Redis writes them,
/// ledgers and sets that are not empty, and the members' seqs.
#[test]
fn the_commutative_view_is_what_redis_holds() {
    let plain = policy(StateOrder::PerEntity);
    let effects = with(vec![
        Mutation::Count {
            field: "bal".into(),
            amount: Amount::parse("12.50", 2).unwrap(),
        },
        Mutation::Append {
            stream: "l".into(),
            entry: vec![("k".into(), "v".into())],
            max_len: 0,
            max_age_ms: 0,
        },
        Mutation::SetAdd {
            set: "s".into(),
            member: "m".into(),
        },
        Mutation::SetCounter {
            field: "abs".into(),
            value: Some("-3".into()),
        },
    ]);
    let mut m = EntityModel::default();
    m.apply_effects(&ev("a", 1, Op::Upsert, &[], 1), &effects, &plain);
    let view = m.commutative_view();
    let counters: Vec<(&str, &str)> = view
        .counters
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(counters, [("abs", "-3"), ("bal", "12.50")]);
    assert_eq!(view.ledgers["l"], vec![vec![("k".into(), "v".into())]]);
    assert!(view.sets["s"].contains("m"));
    assert_eq!(view.set_seqs["s"]["m"], 1);
}
