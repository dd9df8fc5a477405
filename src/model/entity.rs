//! What Redis holds for one entity and for a keyspace, and the entry to
//! the rules: an event's decision by dense seqs first (`dense.rs`), then
//! by the window and the order mode (`decisions.rs`, `per_field.rs`), as
//! the script's `main.lua` and `decisions.lua` call them.

use std::collections::{BTreeMap, HashMap};

use super::dense::{DenseMark, Seen};
use super::outcome::Outcome;
use crate::config::TopicPolicy;
use crate::effects::{Amount, Effects, MERGE};
use crate::event::{id_hash, Event};

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
    /// Decides `event` and applies its effect (merge) under a plain policy
    /// (no dense seqs, per-entity order), exactly as the guard script does.
    pub fn apply(&mut self, event: &Event) -> Outcome {
        self.apply_effects(event, &MERGE, &TopicPolicy::default())
    }

    /// Decides `event` and applies `effects` under its topic's `policy`,
    /// exactly as the guard script does.
    ///
    /// | id in window | seq newer | commutative part | outcome   | writes                         |
    /// |--------------|-----------|------------------|-----------|--------------------------------|
    /// | yes          | any       | any              | duplicate/conflict | none                  |
    /// | no           | yes       | any              | applied   | state, seq, every mutation     |
    /// | no           | no        | yes              | late      | the commutative mutations only |
    /// | no           | no        | no               | stale     | none (the id is remembered)    |
    /// | no           | any       | a counter would pass 38 digits | invalid | none, not even the id |
    pub fn apply_effects(
        &mut self,
        event: &Event,
        effects: &Effects,
        policy: &TopicPolicy,
    ) -> Outcome {
        // The rule counts exactly below 10^15: it does not start for an
        // entity whose seq is above that.
        let dense = policy.dense_seqs
            && event.seq <= DenseMark::MAX_SEQ
            && (self.dense.is_some() || self.seq.unwrap_or(0) <= DenseMark::MAX_SEQ)
            && !self.remembered.contains_key(&id_hash(&event.id));
        if !dense {
            return self.decide(event, effects, policy);
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
        let outcome = self.decide(event, effects, policy);
        if outcome.decides() && event.seq >= mark.base {
            mark.decide(event.seq, event.fingerprint);
            self.dense = Some(mark);
        }
        outcome
    }
}

/// The model of a whole keyspace: entity → what Redis holds.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub entities: BTreeMap<String, EntityModel>,
}

impl Model {
    /// Decides and applies one event (merge, a plain policy).
    pub fn apply(&mut self, event: &Event) -> Outcome {
        self.entities
            .entry(event.entity.clone())
            .or_default()
            .apply(event)
    }

    /// Decides and applies one event with its planned effects under its
    /// topic's policy.
    pub fn apply_effects(
        &mut self,
        event: &Event,
        effects: &Effects,
        policy: &TopicPolicy,
    ) -> Outcome {
        self.entities
            .entry(event.entity.clone())
            .or_default()
            .apply_effects(event, effects, policy)
    }

    /// Decides and applies one event seen at `at_ms`, with its topic's
    /// dedupe window (`policy.window`). Redis remembers an id for at least one window and at
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
        policy: &TopicPolicy,
        at_ms: i64,
        keep_ambiguous: bool,
    ) -> Outcome {
        let window_ms = policy.window.as_millis() as i64;
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
        let outcome = entity.apply_effects(event, effects, policy);
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
