//! An id not in the window under per-entity order: applied, late, stale
//! or invalid, and the writes of each (`decisions.lua`'s
//! `decide_per_entity`, `writes.lua`'s `write_newer`).

use super::entity::EntityModel;
use super::outcome::{classify, Outcome};
use crate::config::TopicPolicy;
use crate::effects::{Effects, StateEffect};
use crate::event::{id_hash, Event, Op};

impl EntityModel {
    /// Decides `event` by the window and the entity's order mode.
    pub(super) fn decide(
        &mut self,
        event: &Event,
        effects: &Effects,
        policy: &TopicPolicy,
    ) -> Outcome {
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
        if policy.per_field() {
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
}
