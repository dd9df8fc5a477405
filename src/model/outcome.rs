//! The outcome of one event, how the window and the seq classify it, and
//! the verdict that carries it.

use std::time::Duration;

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
    /// Per-field order: some of its fields were written, others had
    /// newer writers (docs/effects.md, "Order per field").
    Partial,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Applied,
        Outcome::Duplicate,
        Outcome::Stale,
        Outcome::Conflict,
        Outcome::Invalid,
        Outcome::Late,
        Outcome::Replayed,
        Outcome::Partial,
    ];

    /// Whether the event was decided by this sighting (its id is then
    /// remembered, and on a dense topic its seq): applied, stale, late or
    /// partial.
    pub fn decides(self) -> bool {
        matches!(
            self,
            Outcome::Applied | Outcome::Stale | Outcome::Late | Outcome::Partial
        )
    }

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
            Outcome::Partial => "partial",
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

/// Why Redis refused to apply an event, for its dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: crate::event::Reason,
    pub message: String,
}

/// The answer for one event: the guard's, or the model's (which knows
/// the outcome and the earlier attempt's; the rest is the guard's detail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// For a duplicate: how long after its first sighting it arrived.
    pub duplicate_age: Option<Duration>,
    /// For a conflict: the fingerprint remembered for the id.
    pub remembered_fingerprint: Option<u64>,
    /// For a duplicate first seen by an earlier attempt of the same batch
    /// (whose reply was lost): what that attempt decided, applied or stale.
    pub earlier_attempt: Option<Outcome>,
    /// For an event Redis refused to apply (outcome `Invalid`): the
    /// dead-letter reason and message (a counter would overflow, a custom
    /// effect failed). Nothing of it was written.
    pub rejection: Option<Rejection>,
    /// Dense seqs: how many never-decided seqs this event's decision closed
    /// (the set above the entity's mark was at its cap).
    pub dense_seqs_closed: u64,
}

impl Verdict {
    /// A verdict that says nothing beyond its outcome.
    pub fn of(outcome: Outcome) -> Verdict {
        Verdict {
            outcome,
            duplicate_age: None,
            remembered_fingerprint: None,
            earlier_attempt: None,
            rejection: None,
            dense_seqs_closed: 0,
        }
    }
}
