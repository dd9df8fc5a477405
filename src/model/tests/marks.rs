//! `Model::apply_batch` (marks.rs): offset marks, re-reads and retried
//! batches, record by record, as `decisions.lua` moves an entity's mark.

use super::{ev, policy};
use crate::consumed::Mark;
use crate::effects::{StateOrder, MERGE};
use crate::event::{Event, Op};
use crate::model::{GuardInput, Model, Outcome, Place};

const FIELD: &str = "o:0123456789ab:0";

/// `events` at `offsets` of one partition whose run starts at 0.
fn batch<'a>(
    events: &'a [Event],
    offsets: &[i64],
    policy: &'a crate::config::TopicPolicy,
) -> Vec<GuardInput<'a>> {
    events
        .iter()
        .zip(offsets)
        .map(|(event, &offset)| GuardInput {
            event,
            policy,
            effects: &MERGE,
            place: Some(Place {
                mark_field: FIELD,
                offset,
                run_start: 0,
            }),
        })
        .collect()
}

fn outcomes(verdicts: &[crate::model::Verdict]) -> Vec<(Outcome, Option<Outcome>)> {
    verdicts
        .iter()
        .map(|v| (v.outcome, v.earlier_attempt))
        .collect()
}

fn mark(m: &Model) -> Option<Mark> {
    m.entities["e"].marks.get(FIELD).copied()
}

/// A batch marks its entity at the last record it decided; a re-read of
/// those records is replayed and leaves the mark; a copy at a new offset is
/// a duplicate, with what an earlier attempt decided only when that
/// attempt was of the same batch (its token).
#[test]
fn a_batch_marks_its_entity_and_a_re_read_is_replayed() {
    let plain = policy(StateOrder::PerEntity);
    let events = [
        ev("a", 1, Op::Upsert, &[("x", "1")], 1),
        ev("b", 2, Op::Upsert, &[("x", "2")], 2),
    ];
    let mut m = Model::default();
    let first = m.apply_batch(&batch(&events, &[0, 1], &plain), 7);
    use Outcome::*;
    assert_eq!(outcomes(&first), [(Applied, None), (Applied, None)]);
    let at_1 = Some(Mark {
        run_start: 0,
        offset: 1,
    });
    assert_eq!(mark(&m), at_1);

    // The same batch again (its reply was lost): each record is covered,
    // and keeps what its earlier attempt decided; the mark stays.
    let retried = m.apply_batch(&batch(&events[..1], &[0], &plain), 7);
    assert_eq!(outcomes(&retried), [(Duplicate, Some(Applied))]);
    assert_eq!(mark(&m), at_1);

    // A later batch re-reads them: replayed, nothing moves.
    let reread = m.apply_batch(&batch(&events, &[0, 1], &plain), 8);
    assert_eq!(outcomes(&reread), [(Replayed, None), (Replayed, None)]);
    assert_eq!(mark(&m), at_1);

    // A copy at a new offset: a duplicate, and a new batch's own (no
    // earlier attempt); the mark moves past it.
    let copy = m.apply_batch(&batch(&events[1..], &[5], &plain), 9);
    assert_eq!(outcomes(&copy), [(Duplicate, None)]);
    assert_eq!(mark(&m).map(|k| k.offset), Some(5));
}

/// A conflict (a known id with another payload) holds its entity's mark
/// for the rest of the batch: a record after it is decided but not marked,
/// so a rewind reads the conflict again.
#[test]
fn a_conflict_holds_the_mark_for_the_rest_of_the_batch() {
    let plain = policy(StateOrder::PerEntity);
    let mut m = Model::default();
    let first = [ev("a", 1, Op::Upsert, &[], 1)];
    m.apply_batch(&batch(&first, &[0], &plain), 1);
    let next = [
        ev("a", 2, Op::Upsert, &[], 99),
        ev("c", 3, Op::Upsert, &[], 3),
    ];
    let verdicts = m.apply_batch(&batch(&next, &[1, 2], &plain), 2);
    use Outcome::*;
    assert_eq!(outcomes(&verdicts), [(Conflict, None), (Applied, None)]);
    assert_eq!(mark(&m).map(|k| k.offset), Some(0));
    assert_eq!(m.entities["e"].seq, Some(3));
}
