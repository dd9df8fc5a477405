//! Offset marks and retried batches in the model (`crate::consumed`,
//! docs/guarantees.md "Replays"): what `decisions.lua`'s `decide_new`,
//! `decide_seen_record`, `mark_decided` and `hold_mark` do with a record's
//! place in its log and the batch's token.

use super::entity::{EntityModel, Model};
use super::outcome::{Outcome, Verdict};
use crate::config::TopicPolicy;
use crate::consumed::Mark;
use crate::effects::Effects;
use crate::event::{id_hash, Event};

/// One record as the guard (and the model) receives it: the event, its
/// topic's policy (its dedupe window: the model has no clock and forgets
/// ids when told; dense seqs, the changelog, the state's order), its
/// planned effects, and its place in its log.
#[derive(Debug, Clone, Copy)]
pub struct GuardInput<'a> {
    pub event: &'a Event,
    pub policy: &'a TopicPolicy,
    /// Its planned effects (`Effects::default()`: merge every field).
    pub effects: &'a Effects,
    /// Where the record sits in its log, for the entity's offset mark
    /// (`None`: its topic has no id, and the record is decided as before).
    pub place: Option<Place<'a>>,
}

/// A record's place in its log, as the guard marks it (`crate::consumed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    /// The mark's field in the entity's meta (`store::mark_field`).
    pub mark_field: &'a str,
    pub offset: i64,
    /// The start of the run of consumption that decides it.
    pub run_start: i64,
}

impl Place<'_> {
    /// The mark this record sets in its entity's meta.
    pub fn mark(&self) -> Mark {
        Mark {
            run_start: self.run_start,
            offset: self.offset,
        }
    }
}

/// What a decision does to the entity's mark for the record's partition.
enum MarkMove {
    /// Moves it to this record (unless a dead letter of this call holds it).
    Set,
    /// Keeps it below this dead-lettered record for the rest of the call.
    Hold,
    /// Leaves it (a re-read, or a topic without an id).
    Leave,
}

impl Model {
    /// Decides one attempt of a batch, as one `Guard::apply` does. `token`
    /// stands for the batch token: the same for every attempt of a batch.
    /// An entity's events of a batch go in one script call, so a mark held
    /// by a dead-lettered record stays held for the rest of the attempt.
    pub fn apply_batch(&mut self, deliveries: &[GuardInput<'_>], token: u32) -> Vec<Verdict> {
        let mut held: std::collections::HashSet<(String, String)> = Default::default();
        let mut decisions = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let entity = self.entities.entry(d.event.entity.clone()).or_default();
            let (decision, movement) = entity.apply_placed(d, token);
            if let Some(place) = d.place {
                let slot = (d.event.entity.clone(), place.mark_field.to_string());
                match movement {
                    MarkMove::Set if !held.contains(&slot) => {
                        entity.marks.insert(slot.1, place.mark());
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
    /// to its entity's mark (`decisions.lua`'s `decide_new`, `decide_seen_record`).
    fn apply_placed(&mut self, d: &GuardInput<'_>, token: u32) -> (Verdict, MarkMove) {
        let key = id_hash(&d.event.id);
        let covered = d.place.is_some_and(|place| {
            self.marks
                .get(place.mark_field)
                .is_some_and(|m| m.covers(place.offset))
        });
        let plain = Verdict::of;
        if self.remembered.contains_key(&key) {
            let outcome = self.apply_effects(d.event, d.effects, d.policy);
            let earlier_attempt = self
                .decided_by
                .get(&key)
                .filter(|(by, _)| *by == token && outcome == Outcome::Duplicate)
                .map(|&(_, decided)| decided);
            let decision = Verdict {
                earlier_attempt,
                ..Verdict::of(outcome)
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
        let outcome = self.apply_effects(d.event, d.effects, d.policy);
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
