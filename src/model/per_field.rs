//! Order per field (`state.order = "per_field"`, docs/effects.md), as
//! `per_field.lua` decides it: each field takes the greater writer, and a
//! replace or delete raises the entity's floor.

use super::entity::EntityModel;
use super::outcome::Outcome;
use crate::effects::{Effects, StateEffect};
use crate::event::{id_hash, Event, Op};

impl EntityModel {
    /// An id not in the window under per-field order (docs/effects.md):
    /// each field takes the greater writer (seq, then a removal, then the
    /// greater value in byte order); a replace or delete raises the floor
    /// (a delete's covers its own seq), removing the fields below it and
    /// refusing writes below it; existence is its own register, where at an
    /// equal seq the delete wins. `applied` when every field it writes won,
    /// `partial` when some did, `late`/`stale` when none did; a write that
    /// changes nothing (the same value, removal or floor at the same seq: a
    /// copy after the window) does not win.
    pub(super) fn apply_per_field(&mut self, event: &Event, effects: &Effects) -> Outcome {
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
}

/// Whether a write at `at` falls under `floor` (seq, covering its own seq).
fn below_floor(floor: Option<(u64, bool)>, at: u64) -> bool {
    floor.is_some_and(|(f, strict)| at < f || (at == f && strict))
}

/// Whether floor `a` is above `b` (a delete's beats a replace's at one seq).
fn floor_above(a: (u64, bool), b: Option<(u64, bool)>) -> bool {
    b.is_none_or(|b| a > b)
}
