//! Reads that see your own writes, pure: whether idem has decided an
//! entity's seq N, and with what outcome, from what one READ returned; and
//! the entity's representation with its `ETag`.
//!
//! The gateway's topics are dense (every seq of an entity is produced), so
//! "seq N decided" is the dense rule's own record: N at or below the mark,
//! or among the decided seqs waiting above it. A read waits for N alone,
//! not for the mark: a hole below N does not hold a reader (docs/gateway.md).

use serde::Serialize;
use serde_json::{Map, Value};

use super::binding::Snapshot;

/// What idem decided of one seq, as a read reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeqOutcome {
    Applied,
    Stale,
    /// Its commutative effects counted, its state write was older (docs/guarantees.md).
    Late,
    /// Some fields written, others had newer writers (per-field order).
    Partial,
    /// In a gap the dense rule closed: dead-lettered `seq_gap_closed`, never applied.
    DeadLettered,
    /// Decided, longer ago than the dedupe window remembers how.
    Decided,
}

/// The dense mark of `dense` (`<base>:<mark>`).
fn mark(dense: &str) -> Option<u64> {
    dense.rsplit_once(':')?.1.parse().ok()
}

/// Whether `seq` is in one of `closed`'s ranges (`<from>-<to>,…`).
fn in_closed(closed: &str, seq: u64) -> bool {
    closed.split(',').any(|range| {
        range
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .is_some_and(|(from, to)| from <= seq && seq <= to)
    })
}

/// Whether `seq` waits above the mark, decided (`<seq>=<fingerprint>,…`).
fn waits_above(above: &str, seq: u64) -> bool {
    above
        .split(',')
        .filter_map(|e| e.split_once('=')?.0.parse::<u64>().ok())
        .any(|s| s == seq)
}

/// What idem decided of `seq`, or `None` while it has not.
pub fn decided(snapshot: &Snapshot, seq: u64) -> Option<SeqOutcome> {
    if snapshot
        .dense_closed
        .as_deref()
        .is_some_and(|c| in_closed(c, seq))
    {
        return Some(SeqOutcome::DeadLettered);
    }
    let at_or_below = snapshot
        .dense
        .as_deref()
        .and_then(mark)
        .is_some_and(|m| seq <= m);
    let above = snapshot
        .dense_above
        .as_deref()
        .is_some_and(|a| waits_above(a, seq));
    if !at_or_below && !above {
        return None;
    }
    // An id mark is fingerprint (8) + first seen (6) + batch token (4) + outcome.
    let outcome = match snapshot.id_mark.as_deref().and_then(|m| m.get(18)) {
        Some(b'a') => SeqOutcome::Applied,
        Some(b's') => SeqOutcome::Stale,
        Some(b'l') => SeqOutcome::Late,
        Some(b'p') => SeqOutcome::Partial,
        _ => SeqOutcome::Decided,
    };
    Some(outcome)
}

/// The entity as a `GET` answers it: its body and its `ETag`, a hash of
/// the body (the seq does not grow monotonically under late effects, so a
/// version made of it could repeat; equal bodies are equal representations).
pub fn representation(
    entity: &str,
    snapshot: &Snapshot,
    asked: Option<(u64, SeqOutcome)>,
) -> (String, String) {
    let pairs = |p: &[(String, String)]| -> Map<String, Value> {
        p.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect()
    };
    let mut body = serde_json::json!({
        "entity": entity,
        "exists": snapshot.seq.is_some(),
        "deleted": snapshot.deleted,
        "seq": snapshot.seq,
        "state": pairs(&snapshot.state),
        "counters": pairs(&snapshot.counters),
    });
    let tag = {
        let mut h = crate::event::Fnv64::default();
        h.update(body.to_string().as_bytes());
        format!("\"{:016x}\"", h.finish())
    };
    if let Some((seq, outcome)) = asked {
        body["decided"] = serde_json::json!({ "seq": seq, "outcome": outcome });
    }
    (body.to_string(), tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(dense: &str, above: &str, closed: &str, mark: Option<u8>) -> Snapshot {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Snapshot {
            seq: Some(9),
            dense: some(dense),
            dense_above: some(above),
            dense_closed: some(closed),
            id_mark: mark.map(|m| {
                let mut bytes = vec![0u8; 18];
                bytes.push(m);
                bytes
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_seq_is_decided_at_the_mark_or_waiting_above_it_and_closed_is_dead_lettered() {
        let s = snapshot("1:5", "7=ab,9=cd", "", Some(b'a'));
        assert_eq!(decided(&s, 5), Some(SeqOutcome::Applied));
        assert_eq!(decided(&s, 6), None, "a hole is not decided");
        assert_eq!(decided(&s, 7), Some(SeqOutcome::Applied));
        assert_eq!(decided(&s, 8), None);
        assert_eq!(decided(&s, 10), None);
        let closed = snapshot("1:12", "", "3-4,8-8", None);
        assert_eq!(decided(&closed, 8), Some(SeqOutcome::DeadLettered));
        assert_eq!(decided(&closed, 4), Some(SeqOutcome::DeadLettered));
        assert_eq!(decided(&closed, 5), Some(SeqOutcome::Decided));
        assert_eq!(decided(&snapshot("", "", "", None), 1), None);
        for (byte, outcome) in [
            (b's', SeqOutcome::Stale),
            (b'l', SeqOutcome::Late),
            (b'p', SeqOutcome::Partial),
        ] {
            assert_eq!(
                decided(&snapshot("1:5", "", "", Some(byte)), 2),
                Some(outcome)
            );
        }
    }

    #[test]
    fn the_etag_follows_the_state_not_the_question() {
        let s = snapshot("1:5", "", "", None);
        let (body, tag) = representation("e", &s, None);
        let (asked, same) = representation("e", &s, Some((5, SeqOutcome::Applied)));
        assert_eq!(tag, same);
        assert_ne!(body, asked);
        let v: Value = serde_json::from_str(&asked).unwrap();
        assert_eq!(v["decided"]["outcome"], "applied");
        let mut changed = s.clone();
        changed.state.push(("a".into(), "1".into()));
        assert_ne!(representation("e", &changed, None).1, tag);
    }
}
