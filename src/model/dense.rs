//! The dense-seq rule (`dedupe.dense_seq_topics`, docs/guarantees.md,
//! "Dense seqs"), as pure Rust: `dense.lua`'s `read_dense`,
//! `dense_verdict` and `dense_decided` do the same in Redis.

use std::collections::BTreeMap;

/// What the rule says of a seq it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Decided before, by this event (a copy): `duplicate`.
    Copy,
    /// Decided for another event: `conflict` (`seq_reused`).
    Reused,
    /// In a gap closed at the cap: `invalid` (`seq_gap_closed`).
    InClosedGap,
}

/// The dense-seq rule's record of an entity (`dedupe.dense_seq_topics`,
/// docs/guarantees.md): every seq from `base` to `mark` decided (or
/// closed), the decided seqs above it (with the deciding event's
/// fingerprint), and the gaps closed at the cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenseMark {
    pub base: u64,
    pub mark: u64,
    pub above: BTreeMap<u64, u64>,
    pub closed: Vec<(u64, u64)>,
    /// How many seqs the cap has closed so far (what
    /// `idem_dense_seqs_closed_total` counts; not stored in Redis).
    pub seqs_closed: u64,
}

impl DenseMark {
    /// At most this many decided seqs wait above the mark (`dense.lua`'s
    /// `MAX_DENSE_ABOVE`); beyond, the gap below the lowest is closed.
    pub const MAX_ABOVE: usize = 32;
    /// At most this many closed ranges; beyond, the two oldest merge.
    pub const MAX_CLOSED: usize = 8;
    /// Seqs are counted exactly below 10^15 (Lua numbers); above, the rule
    /// does not apply.
    pub const MAX_SEQ: u64 = 999_999_999_999_999;

    /// The rule begins one past the entity's seq (at 1 for a new entity).
    pub fn starting_after(recorded: Option<u64>) -> DenseMark {
        let mark = recorded.unwrap_or(0);
        DenseMark {
            base: mark + 1,
            mark,
            ..DenseMark::default()
        }
    }

    /// The rule's verdict on a seq it has seen, or None.
    pub(super) fn verdict(
        &self,
        seq: u64,
        fingerprint: u64,
        newest: Option<(u64, u64)>,
    ) -> Option<Seen> {
        if seq < self.base {
            return None;
        }
        if self
            .closed
            .iter()
            .any(|&(from, to)| (from..=to).contains(&seq))
        {
            return Some(Seen::InClosedGap);
        }
        let known = self
            .above
            .get(&seq)
            .copied()
            .or_else(|| newest.filter(|(s, _)| *s == seq).map(|(_, fp)| fp));
        match known {
            Some(fp) if fp != fingerprint => Some(Seen::Reused),
            Some(_) => Some(Seen::Copy),
            None if seq <= self.mark => Some(Seen::Copy),
            None => None,
        }
    }

    /// Records `seq` as decided (what the cap closes adds to `seqs_closed`).
    pub fn decide(&mut self, seq: u64, fingerprint: u64) {
        if seq == self.mark + 1 {
            self.mark = seq;
        } else {
            self.above.insert(seq, fingerprint);
        }
        let mut closed = 0;
        loop {
            while self.above.remove(&(self.mark + 1)).is_some() {
                self.mark += 1;
            }
            if self.above.len() <= Self::MAX_ABOVE {
                break;
            }
            let lowest = *self.above.keys().next().expect("above the cap");
            self.closed.push((self.mark + 1, lowest - 1));
            closed += lowest - 1 - self.mark;
            self.mark = lowest - 1;
        }
        while self.closed.len() > Self::MAX_CLOSED {
            let (_, to) = self.closed.remove(1);
            self.closed[0].1 = to;
        }
        self.seqs_closed += closed;
    }

    /// The meta fields as `dense.lua` writes them: `dense`, `dense_above`
    /// and `dense_closed` (None where the script leaves the field out).
    pub fn encode(&self) -> (String, Option<String>, Option<String>) {
        let above: Vec<String> = self
            .above
            .iter()
            .map(|(s, fp)| format!("{s}={fp:016x}"))
            .collect();
        let closed: Vec<String> = self
            .closed
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect();
        (
            format!("{}:{}", self.base, self.mark),
            (!above.is_empty()).then(|| above.join(",")),
            (!closed.is_empty()).then(|| closed.join(",")),
        )
    }
}
