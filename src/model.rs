//! The decision rules, once, as pure Rust: what the guard script decides for
//! an event given what Redis remembers about its entity.
//!
//! `src/guard/guard.lua` implements the same rules inside Redis; this module
//! is the oracle the tests hold it to, and the model `reconcile` will use.

use std::collections::{BTreeMap, HashMap};

use crate::effects::{Amount, Effects, Mutation, Order, StateEffect, StateOrder};

mod dense;
mod marks;
mod outcome;
use crate::event::{id_hash, Event, Op};
pub use dense::{DenseMark, Seen};
use marks::MarkMove;
pub use marks::{Decision, Delivery};
pub use outcome::{classify, Outcome};

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
    /// Per-field order: data field → seq that wrote or removed it.
    pub field_seqs: BTreeMap<String, u64>,
    /// Per-field order: the floor (seq, whether it covers its own seq).
    pub floor: Option<(u64, bool)>,
    /// Per-field order: the seq that last decided existence (`deleted`).
    pub exists_seq: Option<u64>,
    /// Per-field order: the `seq` the per-field fields were last written at.
    pub field_seqs_at: Option<u64>,
    /// The fingerprint of the event that set `seq` (meta `fingerprint`).
    pub fingerprint: Option<u64>,
    /// Dense seqs: what the rule has decided (absent until it first applies).
    pub dense: Option<DenseMark>,
    /// Offset marks: mark field (one per partition) → mark ([`Model::apply_batch`]).
    pub marks: BTreeMap<String, crate::consumed::Mark>,
    /// id hash → (batch token, outcome) of the attempt that decided it.
    pub decided_by: HashMap<u64, (u32, Outcome)>,
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
        // The rule counts exactly below 10^15: it does not start for an
        // entity whose seq is above that.
        let dense = effects.dense_seqs
            && event.seq <= DenseMark::MAX_SEQ
            && (self.dense.is_some() || self.seq.unwrap_or(0) <= DenseMark::MAX_SEQ)
            && !self.remembered.contains_key(&id_hash(&event.id));
        if !dense {
            return self.decide(event, effects);
        }
        let mut mark = self
            .dense
            .clone()
            .unwrap_or_else(|| DenseMark::starting_after(self.seq));
        let newest = self.seq.zip(self.fingerprint);
        if let Some(seen) = mark.verdict(event.seq, event.fingerprint, newest) {
            return match seen {
                Seen::Copy => Outcome::Duplicate,
                Seen::Reused => Outcome::Conflict,
                Seen::InClosedGap => Outcome::Invalid,
            };
        }
        let outcome = self.decide(event, effects);
        if outcome.decides() && event.seq >= mark.base {
            mark.decide(event.seq, event.fingerprint);
            self.dense = Some(mark);
        }
        outcome
    }

    /// Decides `event` by the window and the entity's order mode.
    fn decide(&mut self, event: &Event, effects: &Effects) -> Outcome {
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
        if effects.state_order == StateOrder::PerField {
            return self.apply_per_field(event, effects);
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
        self.fingerprint = Some(event.fingerprint);
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

    /// An id not in the window under per-field order (docs/effects.md):
    /// each field takes the greater writer (seq, then a removal, then the
    /// greater value in byte order); a replace or delete raises the floor
    /// (a delete's covers its own seq), removing the fields below it and
    /// refusing writes below it; existence is its own register, where at an
    /// equal seq the delete wins. `applied` when every field it writes won,
    /// `partial` when some did, `late`/`stale` when none did; a write that
    /// changes nothing (the same value, removal or floor at the same seq: a
    /// copy after the window) does not win.
    fn apply_per_field(&mut self, event: &Event, effects: &Effects) -> Outcome {
        let seq = event.seq;
        if !self.apply_mutations(event, effects, false) {
            return Outcome::Invalid;
        }
        self.remembered
            .insert(id_hash(&event.id), event.fingerprint);
        if let Some(recorded) = self.seq.filter(|r| self.field_seqs_at != Some(*r)) {
            // Decided under per-entity order since: older stays stale.
            if floor_above((recorded, true), self.floor) {
                self.floor = Some((recorded, true));
            }
            if self.exists_seq.is_none_or(|e| recorded > e) {
                self.exists_seq = Some(recorded);
            }
        }
        let deletes = event.op == Op::Delete;
        let writes_state = effects.state != StateEffect::Keep || deletes;
        let (mut won, mut lost) = (0u32, 0u32);
        if deletes || effects.state == StateEffect::Replace {
            if self.raise_floor((seq, deletes)) {
                won += 1;
            } else {
                lost += 1;
            }
        }
        let exists = writes_state
            && self
                .exists_seq
                .is_none_or(|e| seq > e || (seq == e && deletes));
        if exists {
            self.exists_seq = Some(seq);
            self.deleted = deletes;
        }
        if !deletes && writes_state {
            let (w, l) = self.write_fields(event, effects);
            (won, lost) = (won + w, lost + l);
            if w + l == 0 && effects.state == StateEffect::Merge {
                // No data: what it decides is that the entity exists.
                (won, lost) = if exists {
                    (won + 1, lost)
                } else {
                    (won, lost + 1)
                };
            }
        }
        let newer = self.seq.is_none_or(|r| seq > r);
        let outcome = if (won + lost == 0 && !newer) || (won == 0 && lost > 0) {
            if effects.commutes() {
                Outcome::Late
            } else {
                Outcome::Stale
            }
        } else if lost > 0 {
            Outcome::Partial
        } else {
            Outcome::Applied
        };
        if newer {
            self.seq = Some(seq);
            self.last_id = Some(event.id.clone());
            self.fingerprint = Some(event.fingerprint);
        }
        self.field_seqs_at = self.seq;
        if matches!(outcome, Outcome::Applied | Outcome::Partial) {
            self.applied += 1;
        }
        outcome
    }

    /// Raises the floor to `own` if that is above it, removing the fields
    /// (and field seqs) below; whether it rose.
    fn raise_floor(&mut self, own: (u64, bool)) -> bool {
        if !floor_above(own, self.floor) {
            return false;
        }
        self.floor = Some(own);
        let floor = self.floor;
        let seqs = &self.field_seqs;
        self.state
            .retain(|k, _| seqs.get(k).is_some_and(|at| !below_floor(floor, *at)));
        self.field_seqs.retain(|_, at| !below_floor(floor, *at));
        true
    }

    /// Writes the event's fields that win; how many won and lost.
    fn write_fields(&mut self, event: &Event, effects: &Effects) -> (u32, u32) {
        let fields: Vec<(&String, Option<&String>)> = event
            .set
            .iter()
            .filter(|(k, _)| effects.writes_field(k))
            .map(|(k, v)| (k, Some(v)))
            .chain(
                event
                    .unset
                    .iter()
                    .filter(|k| effects.writes_field(k))
                    .map(|k| (k, None)),
            )
            .collect();
        if below_floor(self.floor, event.seq) {
            return (0, fields.len() as u32);
        }
        let mut won = 0;
        for (name, value) in &fields {
            if self.field_wins(event.seq, name, *value) {
                won += 1;
                match value {
                    Some(v) => self.state.insert((*name).clone(), (*v).clone()),
                    None => self.state.remove(*name),
                };
                self.field_seqs.insert((*name).clone(), event.seq);
            }
        }
        (won, fields.len() as u32 - won)
    }

    /// Whether writing `value` (None: removing) at `seq` wins over the
    /// field's writer. A tie: the removal wins, then the greater value; the
    /// same value again is already written.
    fn field_wins(&self, seq: u64, name: &str, value: Option<&String>) -> bool {
        match self.field_seqs.get(name).copied() {
            None => true,
            Some(at) if seq != at => seq > at,
            Some(_) => match (value, self.state.get(name)) {
                (None, current) => current.is_some(),
                (Some(v), Some(current)) => v > current,
                (Some(_), None) => false,
            },
        }
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
                Mutation::SetCounter { field, value } => {
                    if !newer {
                        continue;
                    }
                    match value.as_deref().map(stored_counter) {
                        None => {
                            self.counters.remove(field);
                        }
                        Some(Some(amount)) => {
                            self.counters.insert(field.clone(), amount);
                        }
                        // Not a decimal (a custom effect's value): the model
                        // cannot hold it, as for custom effects.
                        Some(None) => self.ran_custom = true,
                    }
                }
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

/// A counter's stored text (`12.50`, `-3`) as an amount at the scale it is
/// written with.
fn stored_counter(text: &str) -> Option<Amount> {
    let scale = text.split_once('.').map_or(0, |(_, d)| d.len());
    Amount::parse(text, u8::try_from(scale).ok()?).ok()
}

/// Whether a write at `at` falls under `floor` (seq, covering its own seq).
fn below_floor(floor: Option<(u64, bool)>, at: u64) -> bool {
    floor.is_some_and(|(f, strict)| at < f || (at == f && strict))
}

/// Whether floor `a` is above `b` (a delete's beats a replace's at one seq).
fn floor_above(a: (u64, bool), b: Option<(u64, bool)>) -> bool {
    b.is_none_or(|b| a > b)
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
        if outcome.decides() {
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

impl Model {
    /// Decides one attempt of a batch, as one `Guard::apply` does. `token`
    /// stands for the batch token: the same for every attempt of a batch.
    /// An entity's events of a batch go in one script call, so a mark held
    /// by a dead-lettered record stays held for the rest of the attempt.
    pub fn apply_batch(&mut self, deliveries: &[Delivery<'_>], token: u32) -> Vec<Decision> {
        let mut held: std::collections::HashSet<(String, String)> = Default::default();
        let mut decisions = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let entity = self.entities.entry(d.event.entity.clone()).or_default();
            let (decision, movement) = entity.apply_placed(d, token);
            if let Some((field, mark)) = d.place {
                let slot = (d.event.entity.clone(), field.to_string());
                match movement {
                    MarkMove::Set if !held.contains(&slot) => {
                        entity.marks.insert(slot.1, mark);
                    }
                    MarkMove::Hold => {
                        held.insert(slot);
                    }
                    _ => {}
                }
            }
            decisions.push(decision);
        }
        decisions
    }
}

impl EntityModel {
    /// One record of [`Model::apply_batch`]: its decision, and what it does
    /// to its entity's mark (`guard.lua`'s `decide_new`, `decide_seen_record`).
    fn apply_placed(&mut self, d: &Delivery<'_>, token: u32) -> (Decision, MarkMove) {
        let key = id_hash(&d.event.id);
        let covered = d.place.is_some_and(|(field, mark)| {
            self.marks.get(field).is_some_and(|m| m.covers(mark.offset))
        });
        let plain = |outcome| Decision {
            outcome,
            earlier_attempt: None,
        };
        if self.remembered.contains_key(&key) {
            let outcome = self.apply_effects(d.event, d.effects);
            let earlier_attempt = self
                .decided_by
                .get(&key)
                .filter(|(by, _)| *by == token && outcome == Outcome::Duplicate)
                .map(|&(_, decided)| decided);
            let decision = Decision {
                outcome,
                earlier_attempt,
            };
            return match (outcome, covered) {
                (Outcome::Conflict, _) => (decision, MarkMove::Hold),
                // A re-read of this very record: nothing moves, and a
                // retried batch keeps what its earlier attempt decided.
                (_, true) if earlier_attempt.is_none() => {
                    (plain(Outcome::Replayed), MarkMove::Leave)
                }
                (_, true) => (decision, MarkMove::Leave),
                _ => (decision, MarkMove::Set),
            };
        }
        if covered {
            return (plain(Outcome::Replayed), MarkMove::Leave);
        }
        let outcome = self.apply_effects(d.event, d.effects);
        if outcome.decides() {
            self.decided_by.insert(key, (token, outcome));
        }
        let mark = match outcome {
            Outcome::Conflict | Outcome::Invalid => MarkMove::Hold,
            _ => MarkMove::Set,
        };
        (plain(outcome), mark)
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
                            0 => {
                                set.push((format!("f{f}"), format!("v{}", rng.random_range(0..3))))
                            }
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
                    state_order: StateOrder::PerField,
                    ..Effects::default()
                };
                (event, effects)
            })
            .collect()
    }

    fn run(history: &[(Event, Effects)]) -> EntityModel {
        let mut m = EntityModel::default();
        for (event, effects) in history {
            m.apply_effects(event, effects);
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
            let (a, b) = (run(&history), run(&shuffled));
            assert_eq!(
                (&a.state, a.deleted),
                (&b.state, b.deleted),
                "{history:?}\nagainst\n{shuffled:?}"
            );
            if distinct {
                let mut in_order = history.clone();
                in_order.sort_by_key(|(e, _)| e.seq);
                for (_, effects) in &mut in_order {
                    effects.state_order = StateOrder::PerEntity;
                }
                let want = run(&in_order);
                assert_eq!(
                    (&a.state, a.deleted),
                    (&want.state, want.deleted),
                    "{history:?}"
                );
            }
        }
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
                state_order: order,
                ..Effects::default()
            };
            let merge = Effects {
                state_order: order,
                ..Effects::default()
            };
            let mut m = EntityModel::default();
            assert_eq!(m.apply_effects(&deposit, &keep), Outcome::Applied);
            assert_eq!(m.apply_effects(&status, &merge), want, "{order:?}");
            assert_eq!(m.state.get("status").map(String::as_str), state);
            assert_eq!(m.seq, Some(11));
        }
    }

    /// Outcomes under per-field order, and the switch from per-entity order.
    #[test]
    fn per_field_outcomes_by_example() {
        let merge = Effects {
            state_order: StateOrder::PerField,
            ..Effects::default()
        };
        let replace = Effects {
            state: StateEffect::Replace,
            ..merge.clone()
        };
        let mut m = EntityModel::default();
        m.apply_effects(&ev("a", 5, Op::Upsert, &[("x", "1")], 1), &merge);
        // y is new, x has a newer writer: partial.
        assert_eq!(
            m.apply_effects(
                &ev("b", 3, Op::Upsert, &[("x", "0"), ("y", "0")], 2),
                &merge
            ),
            Outcome::Partial
        );
        assert_eq!(m.state.get("x").map(String::as_str), Some("1"));
        // A replace at 7 removes both; a write at 6 comes too late.
        assert_eq!(
            m.apply_effects(&ev("c", 7, Op::Upsert, &[("z", "1")], 3), &replace),
            Outcome::Applied
        );
        assert_eq!(
            m.apply_effects(&ev("d", 6, Op::Upsert, &[("w", "1")], 4), &merge),
            Outcome::Stale
        );
        assert_eq!(m.state.keys().collect::<Vec<_>>(), ["z"]);
        // A delete at 5 is below the floor; one at 9 empties; an upsert
        // without data at 10 brings the entity back.
        assert_eq!(
            m.apply_effects(&ev("e", 5, Op::Delete, &[], 5), &merge),
            Outcome::Stale
        );
        assert_eq!(
            m.apply_effects(&ev("f", 9, Op::Delete, &[], 6), &merge),
            Outcome::Applied
        );
        assert!(m.deleted && m.state.is_empty());
        assert_eq!(
            m.apply_effects(&ev("g", 10, Op::Upsert, &[], 7), &merge),
            Outcome::Applied
        );
        assert!(!m.deleted);
        // An entity decided per entity up to seq 20: older stays stale.
        let mut m = EntityModel::default();
        m.apply(&ev("a", 20, Op::Upsert, &[("x", "1")], 1));
        assert_eq!(
            m.apply_effects(&ev("b", 19, Op::Upsert, &[("y", "1")], 2), &merge),
            Outcome::Stale
        );
        assert_eq!(m.floor, Some((20, true)));
        assert_eq!(
            m.apply_effects(&ev("c", 21, Op::Upsert, &[("y", "2")], 3), &merge),
            Outcome::Applied
        );
        // Copies after the window change nothing, and say so: a merge, a
        // replace and a delete at the seq they already wrote.
        let del = ev("d", 22, Op::Delete, &[], 4);
        let rep = ev("r", 23, Op::Upsert, &[("y", "3")], 5);
        assert_eq!(m.apply_effects(&del, &merge), Outcome::Applied);
        assert_eq!(m.apply_effects(&rep, &replace), Outcome::Applied);
        let before = m.clone();
        m.remembered.clear();
        for (event, effects) in [
            (&ev("c", 21, Op::Upsert, &[("y", "2")], 3), &merge),
            (&del, &merge),
            (&rep, &replace),
        ] {
            assert_eq!(m.apply_effects(event, effects), Outcome::Stale, "{event:?}");
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
        let dense = Effects {
            dense_seqs: true,
            ..Effects::default()
        };
        let mut m = EntityModel::default();
        for seq in 1..=3 {
            assert_eq!(
                m.apply_effects(&ev(&format!("a{seq}"), seq, Op::Upsert, &[], seq), &dense),
                Outcome::Applied
            );
        }
        // The window forgot the ids: a copy is a duplicate by its seq.
        m.remembered.clear();
        assert_eq!(
            m.apply_effects(&ev("a2", 2, Op::Upsert, &[], 2), &dense),
            Outcome::Duplicate
        );
        assert_eq!(
            m.apply_effects(&ev("x", 2, Op::Upsert, &[], 2), &dense),
            Outcome::Duplicate
        );
        // At the newest seq idem knows the fingerprint: another event is a conflict.
        assert_eq!(
            m.apply_effects(&ev("y", 3, Op::Upsert, &[], 99), &dense),
            Outcome::Conflict
        );
        assert_eq!(
            m.dense.as_ref().unwrap().encode(),
            ("1:3".to_string(), None, None)
        );
        // Seq 4 never comes; 5 ..= 37 wait above it, one more than the cap.
        for seq in 5..=37 {
            m.apply_effects(&ev(&format!("a{seq}"), seq, Op::Upsert, &[], seq), &dense);
        }
        let d = m.dense.clone().unwrap();
        assert_eq!(
            (d.mark, d.above.len(), d.closed.clone()),
            (37, 0, vec![(4, 4)])
        );
        // Another event at a waiting seq is a conflict too.
        let mut w = EntityModel::default();
        w.apply_effects(&ev("b1", 1, Op::Upsert, &[], 1), &dense);
        w.apply_effects(&ev("b3", 3, Op::Upsert, &[], 3), &dense);
        assert_eq!(
            w.apply_effects(&ev("z", 3, Op::Upsert, &[], 7), &dense),
            Outcome::Conflict
        );
        assert_eq!(
            w.dense.as_ref().unwrap().encode().1.as_deref(),
            Some("3=0000000000000003")
        );
        // The late original of seq 4: refused (dead-lettered), nothing written.
        let before = m.clone();
        assert_eq!(
            m.apply_effects(&ev("a4", 4, Op::Upsert, &[("v", "4")], 4), &dense),
            Outcome::Invalid
        );
        assert_eq!(m, before);
        // An entity decided before the rule: it begins one past its seq,
        // and what is older is decided as before (stale).
        let mut old = EntityModel::default();
        old.apply(&ev("o10", 10, Op::Upsert, &[], 10));
        assert_eq!(
            old.apply_effects(&ev("o11", 11, Op::Upsert, &[], 11), &dense),
            Outcome::Applied
        );
        assert_eq!(old.dense.as_ref().unwrap().encode().0, "11:11");
        assert_eq!(
            old.apply_effects(&ev("o5", 5, Op::Upsert, &[], 5), &dense),
            Outcome::Stale
        );
    }

    /// A `partial` event's id is remembered and forgotten with the window,
    /// as every decided id is (the windowed model reconcile uses).
    #[test]
    fn a_partial_events_id_leaves_the_window_like_any_other() {
        let merge = Effects {
            state_order: StateOrder::PerField,
            ..Effects::default()
        };
        let mut m = Model::default();
        let newer = ev("b", 3, Op::Upsert, &[("z", "1")], 1);
        let older = ev("a", 2, Op::Upsert, &[("z", "0"), ("y", "0")], 2);
        assert_eq!(m.apply_at(&newer, &merge, 0, 1000, false), Outcome::Applied);
        assert_eq!(m.apply_at(&older, &merge, 1, 1000, false), Outcome::Partial);
        assert_eq!(
            m.apply_at(&older, &merge, 500, 1000, false),
            Outcome::Duplicate
        );
        assert_eq!(
            m.apply_at(&older, &merge, 3000, 1000, false),
            Outcome::Stale
        );
    }
}
