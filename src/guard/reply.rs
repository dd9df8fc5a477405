//! Reading the guard's replies: verdict codes, the per-call arrays back in
//! batch order, and the durable wait's answer. Pure: values in, verdicts out.

use std::time::Duration;

use redis::Value;

use super::Verdict;
use crate::event::Reason;
use crate::model::{Outcome, Rejection};
use crate::store::{DurableWait, StoreError};

/// Declares the verdict codes once: as Rust constants (`code::APPLIED`)
/// and as the table the script's prelude is generated from.
macro_rules! verdict_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        /// The verdict codes the guard script returns.
        pub mod code {
            $($(#[$doc])* pub const $name: i64 = $value;)*
        }
        /// Each verdict code by its name, for the script's prelude.
        pub const VERDICT_CODES: &[(&str, i64)] = &[$((stringify!($name), $value)),*];
    };
}

verdict_codes! {
    APPLIED = 0;
    /// Detail: ms since the id was first seen.
    DUPLICATE = 1;
    /// Detail: the entity's recorded seq.
    STALE = 2;
    /// Detail: the remembered fingerprint (8 bytes).
    CONFLICT = 3;
    /// A duplicate first seen by an earlier attempt of this batch, which applied it.
    DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT = 4;
    /// Likewise, but that attempt found it stale.
    DUPLICATE_STALE_BY_EARLIER_ATTEMPT = 5;
    /// Ordered part stale, commutative part applied. Detail: the recorded seq.
    LATE = 6;
    /// Nothing written. Detail: "<reason> <message>".
    REJECTED = 7;
    /// Like 4, but that attempt found it late.
    DUPLICATE_LATE_BY_EARLIER_ATTEMPT = 8;
    /// The record was decided before (its entity's offset mark covers it).
    REPLAYED = 9;
    /// Per-field order: some fields written, others had newer writers.
    PARTIAL = 10;
    /// Like 4, but that attempt found it partial.
    DUPLICATE_PARTIAL_BY_EARLIER_ATTEMPT = 11;
    /// Dense seqs: the seq was decided before (a copy at a new offset).
    DUPLICATE_BY_SEQ = 12;
    /// Dense seqs: another event was decided at the seq. Detail: its
    /// fingerprint in hex.
    SEQ_REUSED = 13;
}

/// A rejection's detail, `<reason> <message>`: one of
/// [`Reason::REJECTIONS`], or `effect_rejected` with the whole detail as
/// the message.
fn rejection(detail: &[u8]) -> Rejection {
    let text = String::from_utf8_lossy(detail);
    let (reason, message) = text.split_once(' ').unwrap_or((&text, ""));
    match Reason::REJECTIONS
        .into_iter()
        .find(|r| r.as_str() == reason)
    {
        Some(reason) => Rejection {
            reason,
            message: message.to_string(),
        },
        None => Rejection {
            reason: Reason::EffectRejected,
            message: text.to_string(),
        },
    }
}

/// The items of each script call's reply (one array per call).
pub fn script_items(replies: Vec<Value>) -> Result<Vec<Vec<Value>>, StoreError> {
    replies
        .into_iter()
        .map(|v| match v {
            Value::Array(items) => Ok(items),
            other => Err(StoreError::Protocol(format!("guard reply {other:?}"))),
        })
        .collect()
}

/// Verdicts in input order from each chunk's script reply items
/// (`replies[c]` answers `chunks[c]`), and per chunk the length of the
/// outbox its call wrote changes to (`None`: it wrote none).
pub fn verdicts_by_chunk(
    chunks: &[Vec<usize>],
    replies: &[Vec<Value>],
    inputs: usize,
) -> Result<(Vec<Verdict>, Vec<Option<u64>>), StoreError> {
    if replies.len() != chunks.len() {
        return Err(StoreError::Protocol(format!(
            "{} guard replies for {} calls",
            replies.len(),
            chunks.len()
        )));
    }
    let mut verdicts = vec![None; inputs];
    let mut depths = Vec::with_capacity(chunks.len());
    for (chunk, reply) in chunks.iter().zip(replies) {
        let (parsed, depth) = parse_reply(reply, chunk.len())?;
        for (&i, v) in chunk.iter().zip(parsed) {
            verdicts[i] = Some(v);
        }
        depths.push(depth);
    }
    let verdicts = verdicts
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.ok_or_else(|| StoreError::Protocol(format!("no guard verdict for event {i}")))
        })
        .collect::<Result<_, _>>()?;
    Ok((verdicts, depths))
}

/// One call's verdicts: `expected` pairs of (code, detail), then, when the
/// call wrote changes, the length of its outbox after them.
fn parse_reply(
    reply: &[Value],
    expected: usize,
) -> Result<(Vec<Verdict>, Option<u64>), StoreError> {
    let depth = match reply.get(2 * expected..) {
        Some([]) => None,
        Some([Value::Int(n)]) => Some((*n).max(0) as u64),
        _ => {
            return Err(StoreError::Protocol(format!(
                "guard returned {} values for {expected} events",
                reply.len()
            )))
        }
    };
    let verdicts = reply[..2 * expected]
        .chunks(2)
        .map(|pair| parse_verdict(&pair[0], &pair[1]))
        .collect::<Result<_, _>>()?;
    Ok((verdicts, depth))
}

fn parse_verdict(code: &Value, detail: &Value) -> Result<Verdict, StoreError> {
    use code::*;
    let plain = Verdict::of;
    // A decided seq's detail: the dense seqs its decision closed.
    let decided = |outcome| {
        let closed = match detail {
            Value::Int(n) => (*n).max(0) as u64,
            _ => 0,
        };
        Ok(Verdict {
            dense_seqs_closed: closed,
            ..plain(outcome)
        })
    };
    match (code, detail) {
        (Value::Int(APPLIED), _) => decided(Outcome::Applied),
        (
            Value::Int(
                code @ (DUPLICATE
                | DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT
                | DUPLICATE_STALE_BY_EARLIER_ATTEMPT
                | DUPLICATE_LATE_BY_EARLIER_ATTEMPT
                | DUPLICATE_PARTIAL_BY_EARLIER_ATTEMPT),
            ),
            Value::Int(age_ms),
        ) => Ok(Verdict {
            duplicate_age: Some(Duration::from_millis((*age_ms).max(0) as u64)),
            earlier_attempt: match *code {
                DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT => Some(Outcome::Applied),
                DUPLICATE_STALE_BY_EARLIER_ATTEMPT => Some(Outcome::Stale),
                DUPLICATE_LATE_BY_EARLIER_ATTEMPT => Some(Outcome::Late),
                DUPLICATE_PARTIAL_BY_EARLIER_ATTEMPT => Some(Outcome::Partial),
                _ => None,
            },
            ..plain(Outcome::Duplicate)
        }),
        (Value::Int(STALE), _) => decided(Outcome::Stale),
        (Value::Int(REPLAYED), _) => Ok(plain(Outcome::Replayed)),
        (Value::Int(LATE), _) => decided(Outcome::Late),
        (Value::Int(PARTIAL), _) => decided(Outcome::Partial),
        (Value::Int(DUPLICATE_BY_SEQ), _) => Ok(plain(Outcome::Duplicate)),
        (Value::Int(SEQ_REUSED), Value::BulkString(fp)) => Ok(Verdict {
            rejection: Some(Rejection {
                reason: Reason::SeqReused,
                message: format!(
                    "its seq was decided for another event (fingerprint {}): a dense seq names one event",
                    String::from_utf8_lossy(fp)
                ),
            }),
            ..plain(Outcome::Conflict)
        }),
        (Value::Int(REJECTED), Value::BulkString(detail)) => Ok(Verdict {
            rejection: Some(rejection(detail)),
            ..plain(Outcome::Invalid)
        }),
        (Value::Int(CONFLICT), Value::BulkString(fp)) if fp.len() == 8 => Ok(Verdict {
            remembered_fingerprint: Some(u64::from_be_bytes(fp[..8].try_into().expect("8 bytes"))),
            ..plain(Outcome::Conflict)
        }),
        other => Err(StoreError::Protocol(format!(
            "unexpected guard verdict {other:?}"
        ))),
    }
}

/// Whether the WAIT / WAITAOF reply confirms durability.
pub fn check_durable(wait: DurableWait, reply: &Value) -> Result<(), StoreError> {
    let ok = match (wait, reply) {
        (DurableWait::Replicas(n), Value::Int(acked)) => *acked >= i64::from(n),
        (DurableWait::LocalAof, Value::Array(counts)) => {
            matches!(counts.first(), Some(Value::Int(local)) if *local >= 1)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        // The effects are in Redis but not durable yet: the batch is retried
        // (coming back as duplicates) and its offsets wait.
        Err(StoreError::NotDurable(format!(
            "{wait:?} answered {reply:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(v: &[Verdict]) -> Vec<Outcome> {
        v.iter().map(|v| v.outcome).collect()
    }

    #[test]
    fn verdicts_parse_by_table() {
        let fp = 0x0102030405060708u64.to_be_bytes().to_vec();
        let replies = vec![
            vec![
                Value::Int(code::APPLIED),
                Value::Int(0),
                Value::Int(code::DUPLICATE),
                Value::Int(1500),
            ],
            vec![
                Value::Int(code::STALE),
                Value::BulkString(b"7".to_vec()),
                Value::Int(code::CONFLICT),
                Value::BulkString(fp),
                Value::Int(code::DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT),
                Value::Int(-3),
                Value::Int(code::DUPLICATE_STALE_BY_EARLIER_ATTEMPT),
                Value::Int(20),
            ],
        ];
        // Chunks in another order than the inputs: verdicts come back in input order.
        let chunks = vec![vec![4, 0], vec![1, 5, 2, 3]];
        let (v, depths) = verdicts_by_chunk(&chunks, &replies, 6).unwrap();
        assert_eq!(depths, vec![None, None]);
        use Outcome::*;
        assert_eq!(
            outcomes(&v),
            vec![Duplicate, Stale, Duplicate, Duplicate, Applied, Conflict]
        );
        assert_eq!(v[0].duplicate_age, Some(Duration::from_millis(1500)));
        assert_eq!(v[0].earlier_attempt, None);
        assert_eq!(v[5].remembered_fingerprint, Some(0x0102030405060708));
        assert_eq!(v[2].earlier_attempt, Some(Applied));
        assert_eq!(
            v[2].duplicate_age,
            Some(Duration::ZERO),
            "a clock step back is age 0"
        );
        assert_eq!(v[3].earlier_attempt, Some(Stale));
        assert_eq!(v[4], Verdict::of(Applied));
    }

    #[test]
    fn late_and_rejected_verdicts_parse() {
        let replies = vec![vec![
            Value::Int(code::LATE),
            Value::BulkString(b"9".to_vec()),
            Value::Int(code::REJECTED),
            Value::BulkString(b"effect_failed loyalty.lua:3: boom".to_vec()),
            Value::Int(code::REJECTED),
            Value::BulkString(b"something new".to_vec()),
            Value::Int(code::DUPLICATE_LATE_BY_EARLIER_ATTEMPT),
            Value::Int(5),
            Value::Int(code::REPLAYED),
            Value::Int(0),
            Value::Int(code::PARTIAL),
            Value::BulkString(b"12".to_vec()),
            Value::Int(code::DUPLICATE_PARTIAL_BY_EARLIER_ATTEMPT),
            Value::Int(5),
            Value::Int(code::DUPLICATE_BY_SEQ),
            Value::Int(0),
            Value::Int(code::SEQ_REUSED),
            Value::BulkString(b"00000000000000ab".to_vec()),
            Value::Int(code::APPLIED),
            Value::Int(3),
        ]];
        let (v, _) = verdicts_by_chunk(&[(0..10).collect()], &replies, 10).unwrap();
        assert_eq!(
            outcomes(&v),
            vec![
                Outcome::Late,
                Outcome::Invalid,
                Outcome::Invalid,
                Outcome::Duplicate,
                Outcome::Replayed,
                Outcome::Partial,
                Outcome::Duplicate,
                Outcome::Duplicate,
                Outcome::Conflict,
                Outcome::Applied,
            ]
        );
        assert_eq!(v[7].duplicate_age, None, "a copy by its seq has no age");
        let Rejection { reason, message } = v[8].rejection.clone().expect("dead-lettered");
        assert_eq!(reason, Reason::SeqReused);
        assert!(message.contains("00000000000000ab"), "{message}");
        assert_eq!(v[9].dense_seqs_closed, 3);
        assert_eq!(v[4].earlier_attempt, None);
        assert_eq!(v[6].earlier_attempt, Some(Outcome::Partial));
        let reason_and_message = |v: &Verdict| {
            let r = v.rejection.clone().expect("rejected");
            (r.reason, r.message)
        };
        assert_eq!(
            reason_and_message(&v[1]),
            (Reason::EffectFailed, "loyalty.lua:3: boom".to_string())
        );
        assert_eq!(
            reason_and_message(&v[2]),
            (Reason::EffectRejected, "something new".to_string())
        );
        assert_eq!(v[3].earlier_attempt, Some(Outcome::Late));
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        let ok = || vec![Value::Int(code::APPLIED), Value::Int(0)];
        type Case = (Vec<Vec<usize>>, Vec<Vec<Value>>, usize);
        let bad: &[Case] = &[
            // a verdict missing for an event
            (vec![vec![0, 1]], vec![ok()], 2),
            // a verdict too many
            (vec![vec![0]], vec![[ok(), ok()].concat()], 1),
            // a trailer that is not the outbox's length
            (vec![vec![0]], vec![[ok(), vec![Value::Nil]].concat()], 1),
            // a reply missing for a call
            (vec![vec![0], vec![1]], vec![ok()], 2),
            // an unknown code
            (vec![vec![0]], vec![vec![Value::Int(99), Value::Int(0)]], 1),
            // a conflict whose fingerprint is not 8 bytes
            (
                vec![vec![0]],
                vec![vec![
                    Value::Int(code::CONFLICT),
                    Value::BulkString(vec![1; 7]),
                ]],
                1,
            ),
            // a duplicate without its age
            (
                vec![vec![0]],
                vec![vec![Value::Int(code::DUPLICATE), Value::Nil]],
                1,
            ),
        ];
        for (chunks, replies, inputs) in bad {
            let got = verdicts_by_chunk(chunks, replies, *inputs);
            assert!(
                matches!(got, Err(StoreError::Protocol(_))),
                "{replies:?} gave {got:?}"
            );
        }
        // A call that wrote changes ends with its outbox's length.
        let with_depth = vec![[ok(), vec![Value::Int(42)]].concat(), ok()];
        let (_, depths) = verdicts_by_chunk(&[vec![0], vec![1]], &with_depth, 2).unwrap();
        assert_eq!(depths, vec![Some(42), None]);
        assert!(script_items(vec![Value::Int(1)]).is_err());
        assert_eq!(script_items(vec![Value::Array(ok())]).unwrap(), vec![ok()]);
    }

    #[test]
    fn durable_wait_replies_by_table() {
        let table: &[(DurableWait, Value, bool)] = &[
            (DurableWait::Replicas(2), Value::Int(2), true),
            (DurableWait::Replicas(2), Value::Int(3), true),
            (DurableWait::Replicas(2), Value::Int(1), false),
            (
                DurableWait::LocalAof,
                Value::Array(vec![Value::Int(1), Value::Int(0)]),
                true,
            ),
            (
                DurableWait::LocalAof,
                Value::Array(vec![Value::Int(0), Value::Int(0)]),
                false,
            ),
            (DurableWait::LocalAof, Value::Array(vec![]), false),
            (DurableWait::Replicas(1), Value::Nil, false),
            (DurableWait::None, Value::Int(5), false),
        ];
        for (wait, reply, ok) in table {
            let got = check_durable(*wait, reply);
            assert_eq!(got.is_ok(), *ok, "{wait:?} {reply:?}");
            if !ok {
                assert!(matches!(got, Err(StoreError::NotDurable(_))));
            }
        }
    }
}
