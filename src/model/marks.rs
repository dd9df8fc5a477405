//! Offset marks and retried batches in the model (`crate::consumed`,
//! docs/guarantees.md "Replays"): what `guard.lua`'s `decide_new`,
//! `decide_seen_record`, `mark_decided` and `hold_mark` do with a record's
//! place in its log and the batch's token: the types; `Model::apply_batch`
//! applies them.

use super::outcome::Outcome;
use crate::consumed::Mark;
use crate::effects::Effects;
use crate::event::Event;

/// One record as the guard receives it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub event: &'a Event,
    pub effects: &'a Effects,
    /// The entity's mark field for the record's partition and the mark this
    /// record would set (`None`: a topic without an id, decided as before).
    pub place: Option<(&'a str, Mark)>,
}

/// What the script answers for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// A duplicate first decided by an earlier attempt of this batch (same
    /// token): what that attempt decided, which the batch's counts keep.
    pub earlier_attempt: Option<Outcome>,
}

/// What a decision does to the entity's mark for the record's partition.
pub(super) enum MarkMove {
    /// Moves it to this record (unless a dead letter of this call holds it).
    Set,
    /// Keeps it below this dead-lettered record for the rest of the call.
    Hold,
    /// Leaves it (a re-read, or a topic without an id).
    Leave,
}
