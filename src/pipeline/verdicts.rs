//! What a batch's verdicts become: a retried batch's events counted as
//! what its lost attempt decided, `replayed` for the records in a decided
//! range, each verdict carried by its record, and the dead letters
//! (invalid records, conflicts, rejections). Pure: no I/O.

use super::batch::{Batch, Item};
use crate::dlq::DeadLetter;
use crate::event::Reason;
use crate::guard::{GuardInput, Verdict};
use crate::model::Outcome;

/// After a retried batch: an event that an earlier, failed attempt decided
/// (Redis ran the script, the reply was lost) comes back `duplicate`. The
/// guard says so (the id mark carries the batch's token and its decision),
/// and it is counted as what that attempt decided, applied or stale, for the
/// first occurrence of its id in the batch only (a second occurrence is a
/// real redelivery).
///
/// | verdict                         | first in batch | counted as          |
/// |---------------------------------|----------------|---------------------|
/// | duplicate, no earlier attempt   | any            | duplicate           |
/// | duplicate, earlier attempt: X   | yes            | X (applied, stale)  |
/// | duplicate, earlier attempt: X   | no             | duplicate           |
/// | anything else                   | any            | itself              |
pub fn recount_retried(inputs: &[GuardInput<'_>], verdicts: &mut [Verdict]) {
    // Most batches are first attempts: nothing to recount, no set to build.
    let retried = |v: &Verdict| v.outcome == Outcome::Duplicate && v.earlier_attempt.is_some();
    if !verdicts.iter().any(retried) {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for (input, v) in inputs.iter().zip(verdicts.iter_mut()) {
        let first_in_batch = seen.insert((input.event.entity.as_str(), input.event.id.as_str()));
        if let (Outcome::Duplicate, Some(decided), true) =
            (v.outcome, v.earlier_attempt, first_in_batch)
        {
            *v = Verdict::of(decided);
        }
    }
}

/// Records in a decided range are re-reads: `replayed`, without asking
/// Redis (an invalid one too: it was dead-lettered when first decided).
pub fn mark_replayed(batch: &mut Batch, decided: &[bool]) {
    for (it, decided) in batch.items.iter_mut().zip(decided) {
        if *decided {
            it.verdict = Some(Verdict::of(Outcome::Replayed));
        }
    }
}

/// Whether the guard judges `it`: decoded, and not judged yet.
pub fn awaits_guard(it: &Item) -> bool {
    it.verdict.is_none() && it.decoded.is_ok()
}

/// Gives each record the guard judged its verdict: `guarded` holds one
/// per record [`awaits_guard`] picked, in batch order (the guard's contract).
pub fn give_verdicts(batch: &mut Batch, guarded: Vec<Verdict>) {
    debug_assert_eq!(
        batch.items.iter().filter(|it| awaits_guard(it)).count(),
        guarded.len()
    );
    let awaiting = batch.items.iter_mut().filter(|it| awaits_guard(it));
    for (it, v) in awaiting.zip(guarded) {
        it.verdict = Some(v);
    }
}

/// The batch's invalid records and conflicts, in batch order. A record
/// `replayed` was dead-lettered (if at all) when it was first decided.
pub fn dead_letters(batch: &Batch) -> Vec<DeadLetter<'_>> {
    let mut letters = Vec::new();
    for it in &batch.items {
        let (reason, message, fingerprints) = match (&it.decoded, &it.verdict) {
            (_, Some(v)) if v.outcome == Outcome::Replayed => continue,
            (Err(invalid), _) => (invalid.code(), invalid.to_string(), None),
            (Ok(_), None) => continue,
            (
                Ok(_),
                Some(Verdict {
                    rejection: Some(r), ..
                }),
            ) => (r.reason, r.message.clone(), None),
            (Ok(event), Some(v)) if v.outcome == Outcome::Conflict => {
                let remembered = v.remembered_fingerprint.unwrap_or(0);
                (
                    Reason::Conflict,
                    format!(
                        "id {:?} was seen with another payload (fingerprint {remembered:016x}, this one {:016x})",
                        event.id, event.fingerprint
                    ),
                    Some((event.fingerprint, remembered)),
                )
            }
            (Ok(_), Some(_)) => continue,
        };
        letters.push(letter(batch, it, reason, message, fingerprints));
    }
    letters
}

fn letter<'a>(
    batch: &'a Batch,
    it: &'a Item,
    reason: Reason,
    message: String,
    fingerprints: Option<(u64, u64)>,
) -> DeadLetter<'a> {
    DeadLetter {
        source: &batch.partitions[it.partition_index],
        topic: &batch.policies[it.partition_index].dead_letter_topic,
        offset: it.offset,
        timestamp_ms: it.timestamp_ms,
        key: it.key.as_deref(),
        value: it.value.as_deref(),
        headers: &it.headers,
        reason,
        message,
        fingerprints,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::event::{Event, Op};

    fn event(id: &str) -> Event {
        Event {
            ts: None,
            change: None,
            id: id.into(),
            entity: "e".into(),
            seq: 1,
            op: Op::Upsert,
            kind: None,
            set: Vec::new(),
            unset: Vec::new(),
            fingerprint: 0,
        }
    }

    fn verdict(outcome: Outcome, earlier_attempt: Option<Outcome>) -> Verdict {
        Verdict {
            duplicate_age: (outcome == Outcome::Duplicate).then(|| Duration::from_millis(3)),
            earlier_attempt,
            ..Verdict::of(outcome)
        }
    }

    /// The truth table of `recount_retried`, row by row.
    #[test]
    fn retried_batches_count_what_their_lost_attempt_decided() {
        let events = [event("a"), event("b"), event("a"), event("c"), event("d")];
        let policy = crate::config::TopicPolicy::default();
        let inputs: Vec<GuardInput<'_>> = events
            .iter()
            .map(|event| GuardInput {
                event,
                policy: &policy,
                effects: &crate::effects::MERGE,
                place: None,
            })
            .collect();
        use Outcome::*;
        // a: applied by the lost attempt; b: a real duplicate (an earlier
        // batch); a again: a redelivery inside the batch; c: applied now;
        // d: found stale by the lost attempt.
        let mut verdicts = vec![
            verdict(Duplicate, Some(Applied)),
            verdict(Duplicate, None),
            verdict(Duplicate, Some(Applied)),
            verdict(Applied, None),
            verdict(Duplicate, Some(Stale)),
        ];
        recount_retried(&inputs, &mut verdicts);
        let outcomes: Vec<Outcome> = verdicts.iter().map(|v| v.outcome).collect();
        assert_eq!(outcomes, [Applied, Duplicate, Duplicate, Applied, Stale]);
    }

    /// Invalid records and conflicts become letters, in batch order, each
    /// with its partition, offset, original bytes and reason; everything
    /// else does not.
    #[test]
    fn dead_letters_are_the_invalid_records_and_the_conflicts() {
        use crate::event::Invalid;
        use crate::offsets::TopicPartition;
        use crate::pipeline::batch::Item;
        let item = |partition_index, offset: i64, decoded| Item {
            partition_index,
            offset,
            timestamp_ms: Some(1000 + offset),
            key: Some(format!("k{offset}").into_bytes()),
            value: Some(format!("v{offset}").into_bytes()),
            headers: vec![("h".into(), b"x".to_vec())],
            decoded,
            effects: Default::default(),
            verdict: None,
        };
        let mut conflicting = event("c");
        conflicting.fingerprint = 0xab;
        let mut batch = Batch {
            partitions: vec![TopicPartition::new("t", 0), TopicPartition::new("t", 3)],
            policies: vec![Default::default(); 2],
            items: vec![
                item(0, 10, Err(Invalid::NotJson("eof".into()))),
                item(1, 11, Ok(event("a"))),
                item(1, 12, Ok(conflicting)),
                item(0, 13, Ok(event("d"))),
                item(1, 14, Err(Invalid::EmptyValue)),
                item(0, 15, Ok(event("s"))),
                item(1, 16, Ok(event("r"))),
                // Re-reads in a decided range: dead-lettered (if at all) before.
                item(0, 17, Err(Invalid::EmptyValue)),
                item(0, 18, Ok(event("c"))),
            ],
        };
        let mut decided = [false; 9];
        decided[7] = true;
        decided[8] = true;
        mark_replayed(&mut batch, &decided);
        use Outcome::*;
        let mut conflict = verdict(Conflict, None);
        conflict.remembered_fingerprint = Some(0xcd);
        let verdicts = vec![
            verdict(Applied, None),
            conflict,
            verdict(Duplicate, None),
            verdict(Stale, None),
            Verdict {
                rejection: Some(crate::model::Rejection {
                    reason: Reason::CounterOverflow,
                    message: "counter b would pass 38 digits".into(),
                }),
                ..verdict(Invalid, None)
            },
        ];
        give_verdicts(&mut batch, verdicts);
        assert_eq!(
            batch.items[8].verdict.as_ref().map(|v| v.outcome),
            Some(Replayed)
        );
        let letters = dead_letters(&batch);
        let summary: Vec<(i32, i64, &str)> = letters
            .iter()
            .map(|l| (l.source.partition, l.offset, l.reason.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (0, 10, "not_json"),
                (3, 12, "conflict"),
                (3, 14, "empty_value"),
                (3, 16, "counter_overflow")
            ]
        );
        let c = &letters[1];
        assert_eq!(c.fingerprints, Some((0xab, 0xcd)));
        assert!(
            c.message.contains("00000000000000cd") && c.message.contains("00000000000000ab"),
            "{}",
            c.message
        );
        assert_eq!(
            (c.key, c.value, c.timestamp_ms),
            (Some(&b"k12"[..]), Some(&b"v12"[..]), Some(1012))
        );
        assert_eq!(c.headers, &[("h".to_string(), b"x".to_vec())][..]);
        assert_eq!(letters[0].message, "record value is not JSON: eof");
        assert_eq!(letters[0].fingerprints, None);
    }
}
