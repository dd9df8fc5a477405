//! The decision rules, once, as pure Rust: what the guard script decides for
//! an event given what Redis remembers about its entity.
//!
//! `src/guard/guard.lua` implements the same rules inside Redis; this module
//! is the oracle the tests hold it to, and the model `reconcile` will use.

use std::collections::{BTreeMap, HashMap};

use crate::effects::{Amount, Effects, Mutation, Order, StateEffect};
use crate::event::{id_hash, Event, Op};

/// The outcome of one event. Every record gets exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Applied,
    Duplicate,
    Stale,
    Conflict,
    Invalid,
    /// Seq not newer: the ordered effects were skipped, the commutative ones
    /// (counters, ledger, sets) applied (docs/effects.md).
    Late,
    /// The record itself was decided before (a replay, a rewind, a
    /// redelivery after a crash), whatever the window: nothing written
    /// (`crate::consumed`).
    Replayed,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Applied,
        Outcome::Duplicate,
        Outcome::Stale,
        Outcome::Conflict,
        Outcome::Invalid,
        Outcome::Late,
        Outcome::Replayed,
    ];

    /// The label used in metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Conflict => "conflict",
            Outcome::Invalid => "invalid",
            Outcome::Late => "late",
            Outcome::Replayed => "replayed",
        }
    }
}

/// Classifies a decodable event.
///
/// | id in window?        | seq vs recorded seq   | outcome   |
/// |----------------------|-----------------------|-----------|
/// | yes, same fingerprint| any                   | duplicate |
/// | yes, other fingerprint| any                  | conflict  |
/// | no                   | no recorded seq       | applied   |
/// | no                   | seq > recorded        | applied   |
/// | no                   | seq ≤ recorded        | stale     |
pub fn classify(
    remembered_fingerprint: Option<u64>,
    fingerprint: u64,
    recorded_seq: Option<u64>,
    seq: u64,
) -> Outcome {
    match (remembered_fingerprint, recorded_seq) {
        (Some(seen), _) if seen == fingerprint => Outcome::Duplicate,
        (Some(_), _) => Outcome::Conflict,
        (None, Some(recorded)) if seq <= recorded => Outcome::Stale,
        (None, _) => Outcome::Applied,
    }
}

/// What Redis holds for one entity, as the model sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityModel {
    pub seq: Option<u64>,
    pub state: BTreeMap<String, String>,
    pub deleted: bool,
    pub applied: u64,
    pub last_id: Option<String>,
    /// id hash → fingerprint of the ids in the dedupe window.
    pub remembered: HashMap<u64, u64>,
    /// id hash → when it was first remembered (ms), for [`Model::apply_at`].
    pub remembered_at: HashMap<u64, i64>,
    /// Whether a decision depended on the window's exact edge (see [`Model::apply_at`]).
    pub window_ambiguous: bool,
    /// Counter field → value (`<base>:counters`).
    pub counters: BTreeMap<String, Amount>,
    /// Ledger stream → entries in the order they were appended.
    pub ledgers: BTreeMap<String, Vec<Vec<(String, String)>>>,
    /// Set → members.
    pub sets: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Set → member → seq of the newest add or remove that touched it.
    pub set_seqs: BTreeMap<String, BTreeMap<String, u64>>,
    /// Whether a custom effect ran (the model cannot run Lua: such an
    /// entity's custom fields are not predicted).
    pub ran_custom: bool,
}

impl EntityModel {
    /// Decides `event` and applies its effect (merge), exactly as the guard script does.
    pub fn apply(&mut self, event: &Event) -> Outcome {
        self.apply_effects(event, &Effects::default())
    }

    /// Decides `event` and applies `effects`, exactly as the guard script does.
    ///
    /// | id in window | seq newer | commutative part | outcome   | writes                         |
    /// |--------------|-----------|------------------|-----------|--------------------------------|
    /// | yes          | any       | any              | duplicate/conflict | none                  |
    /// | no           | yes       | any              | applied   | state, seq, every mutation     |
    /// | no           | no        | yes              | late      | the commutative mutations only |
    /// | no           | no        | no               | stale     | none (the id is remembered)    |
    /// | no           | any       | a counter would pass 38 digits | invalid | none, not even the id |
    pub fn apply_effects(&mut self, event: &Event, effects: &Effects) -> Outcome {
        let key = id_hash(&event.id);
        let outcome = classify(
            self.remembered.get(&key).copied(),
            event.fingerprint,
            self.seq,
            event.seq,
        );
        if !matches!(outcome, Outcome::Applied | Outcome::Stale) {
            return outcome;
        }
        let newer = outcome == Outcome::Applied;
        if (newer || effects.commutes()) && !self.apply_mutations(event, effects, newer) {
            return Outcome::Invalid;
        }
        self.remembered.insert(key, event.fingerprint);
        if !newer {
            return if effects.commutes() {
                Outcome::Late
            } else {
                Outcome::Stale
            };
        }
        self.seq = Some(event.seq);
        self.last_id = Some(event.id.clone());
        self.applied += 1;
        match (event.op, &effects.state) {
            (Op::Delete, _) => {
                self.state.clear();
                self.deleted = true;
            }
            (Op::Upsert, StateEffect::Keep) => {}
            (Op::Upsert, state) => {
                self.deleted = false;
                if *state == StateEffect::Replace {
                    self.state.clear();
                }
                for (k, v) in event.set.iter().filter(|(k, _)| effects.writes_field(k)) {
                    self.state.insert(k.clone(), v.clone());
                }
                for k in event.unset.iter().filter(|k| effects.writes_field(k)) {
                    self.state.remove(k);
                }
            }
        }
        Outcome::Applied
    }

    /// The counters, ledgers and sets as Redis stores them.
    pub fn commutative_view(&self) -> crate::effects::CommutativeView {
        crate::effects::CommutativeView {
            counters: self
                .counters
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            ledgers: self
                .ledgers
                .iter()
                .filter(|(_, l)| !l.is_empty())
                .map(|(k, l)| (k.clone(), l.clone()))
                .collect(),
            sets: self
                .sets
                .iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(k, m)| (k.clone(), m.clone()))
                .collect(),
            set_seqs: self.set_seqs.clone(),
        }
    }

    /// Applies the mutations that apply (all when newer, the commutative
    /// ones when late), all or none: false when a counter would overflow.
    fn apply_mutations(&mut self, event: &Event, effects: &Effects, newer: bool) -> bool {
        let mut counters = self.counters.clone();
        for m in &effects.mutations {
            if let Mutation::Count { field, amount } = m {
                let now = counters
                    .get(field)
                    .copied()
                    .unwrap_or(Amount::zero(amount.scale));
                let Some(sum) = now.checked_add(*amount) else {
                    return false;
                };
                counters.insert(field.clone(), sum);
            }
        }
        self.counters = counters;
        let seq = event.seq;
        for m in &effects.mutations {
            match m {
                Mutation::Count { .. } => {}
                Mutation::Append {
                    stream,
                    entry,
                    max_len,
                    ..
                } => {
                    let ledger = self.ledgers.entry(stream.clone()).or_default();
                    ledger.push(entry.clone());
                    if *max_len > 0 && ledger.len() as u64 > *max_len {
                        ledger.drain(..ledger.len() - *max_len as usize);
                    }
                }
                Mutation::SetAdd { set, member } | Mutation::SetRemove { set, member } => {
                    let remove = matches!(m, Mutation::SetRemove { .. });
                    let seqs = self.set_seqs.entry(set.clone()).or_default();
                    let wins = match seqs.get(member) {
                        None => true,
                        Some(&last) => seq > last || (remove && seq == last),
                    };
                    if wins {
                        seqs.insert(member.clone(), seq);
                        let members = self.sets.entry(set.clone()).or_default();
                        if remove {
                            members.remove(member);
                        } else {
                            members.insert(member.clone());
                        }
                    }
                }
                Mutation::Custom { order, .. } => {
                    self.ran_custom |= newer || *order == Order::Commutative;
                }
            }
        }
        true
    }
}

/// The model of a whole keyspace: entity → what Redis holds.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub entities: BTreeMap<String, EntityModel>,
}

impl Model {
    /// Decides and applies one event (merge).
    pub fn apply(&mut self, event: &Event) -> Outcome {
        self.apply_effects(event, &Effects::default())
    }

    /// Decides and applies one event with its planned effects.
    pub fn apply_effects(&mut self, event: &Event, effects: &Effects) -> Outcome {
        self.entities
            .entry(event.entity.clone())
            .or_default()
            .apply_effects(event, effects)
    }

    /// Decides and applies one event seen at `at_ms`, with a dedupe window
    /// of `window_ms`. Redis remembers an id for at least one window and at
    /// most two (generations), so an id seen again after `gap` ms:
    ///
    /// | gap               | remembered by Redis? | model             |
    /// |-------------------|----------------------|-------------------|
    /// | < window          | yes                  | remembered        |
    /// | window … 2×window | it depends           | `keep_ambiguous` decides; the entity is marked `window_ambiguous` |
    /// | ≥ 2×window        | no                   | forgotten         |
    ///
    /// Times are the records' Kafka timestamps, standing in for the moments
    /// idem processed them (reconcile cannot know those).
    pub fn apply_at(
        &mut self,
        event: &Event,
        effects: &Effects,
        at_ms: i64,
        window_ms: i64,
        keep_ambiguous: bool,
    ) -> Outcome {
        let entity = self.entities.entry(event.entity.clone()).or_default();
        let key = id_hash(&event.id);
        if let Some(first) = entity.remembered_at.get(&key).copied() {
            let gap = at_ms.saturating_sub(first);
            let ambiguous = gap >= window_ms && gap < 2 * window_ms;
            entity.window_ambiguous |= ambiguous;
            if gap >= 2 * window_ms || (ambiguous && !keep_ambiguous) {
                entity.remembered.remove(&key);
                entity.remembered_at.remove(&key);
            }
        }
        let outcome = entity.apply_effects(event, effects);
        if matches!(outcome, Outcome::Applied | Outcome::Stale | Outcome::Late) {
            entity.remembered_at.insert(key, at_ms);
        }
        outcome
    }

    /// Forgets every remembered id, as Redis does when the window has passed.
    pub fn expire_window(&mut self) {
        for e in self.entities.values_mut() {
            e.remembered.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                "replayed"
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
        let w = 1000;
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
                0,
                w,
                keep,
            );
            assert_eq!(first, Outcome::Applied);
            // The same id reused for a newer intent (same fingerprint: the
            // window cannot tell it from a redelivery).
            let outcome = m.apply_at(
                &ev("a", 2, Op::Upsert, &[], 1),
                &Effects::default(),
                gap,
                w,
                keep,
            );
            assert_eq!(outcome, reused_outcome, "gap {gap}");
            assert_eq!(m.entities["e"].window_ambiguous, ambiguous, "gap {gap}");
        }
    }
}
