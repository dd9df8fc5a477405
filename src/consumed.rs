//! Which records of a partition idem has already decided, forever: the
//! partition's decided ranges and, per entity, its offset mark. Pure.
//!
//! A record is identified forever by where it sits in the log. But "idem
//! has passed this offset" is not "idem decided this record": a group that
//! starts at `latest`, `idem replay --allow-skip`, or an operator's
//! `--reset-offsets --to-latest` start a partition past records that were
//! never decided, and a later backfill from earliest must apply them.
//!
//! So a claim is only ever made about a **run**: consumption that began at
//! an offset and went on in offset order, every record of it passed to the
//! guard (a partition's batches are decided one at a time, each retried
//! until it is resolved, and an entity's events of a batch go in one call).
//!
//! - A run's decided span `[start, next)` is claimed after each batch and
//!   merged into the partition's [`DecidedRanges`]: a union of true claims
//!   is true, so instances that race (a zombie and its successor) can both
//!   add to it and nothing has to be ordered between them.
//! - Per entity, the guard keeps the entity's [`Mark`] for the partition:
//!   the start of the run that decided its latest record, and that record's
//!   offset, written in the same atomic step as the effects. It covers what
//!   a batch decided before its claim was recorded (a retried batch, a crash
//!   between the effects and the claim).
//!
//! Rule ([`is_reread`]): a record at offset `o` is a re-read iff `o` lies in
//! a decided range, or the entity's mark is `(r, m)` with `r <= o <= m`
//! (the run from `r` decided every record from `r` to `m`, in order).
//!
//! Both can only under-state what was decided (a claim lost with a crash, a
//! range dropped at the cap): a record not recognised is decided by the id
//! window and the seq as before. They never over-state it, which would drop
//! a record's effect.

use std::fmt;

/// A topic incarnation's id, as 32 hex digits; never all zeros (a broker
/// without topic ids gives none).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicId(String);

impl TopicId {
    /// The id of `most` and `least` significant bits; `None` for the zero
    /// id (brokers before Kafka 2.8 have none).
    pub fn from_bits(most: i64, least: i64) -> Option<TopicId> {
        (most != 0 || least != 0).then(|| TopicId(format!("{:016x}{:016x}", most, least)))
    }

    /// The id from its text, as [`TopicId::as_str`] gives it.
    pub fn parse(text: &str) -> Option<TopicId> {
        (text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) && text != "0".repeat(32))
            .then(|| TopicId(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits (48 bits): what keys and fields carry, so
    /// that a mark per entity stays small. Two incarnations of one topic
    /// name collide with a chance of 2^-48.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

/// The most ranges kept per partition; past it the smallest is forgotten
/// (its records fall back to the id window and the seq).
pub const MAX_RANGES: usize = 32;

/// An entity's mark for one partition: the start of the run that decided
/// its latest record there, and that record's offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub run_start: i64,
    pub offset: i64,
}

impl Mark {
    /// `"<run_start>:<offset>"`, as the guard stores it.
    pub fn encode(self) -> String {
        format!("{}:{}", self.run_start, self.offset)
    }

    /// A stored mark; `None` for anything that is not one (read as "no
    /// mark": the record is decided as before).
    pub fn decode(text: &str) -> Option<Mark> {
        let (start, offset) = text.split_once(':')?;
        let mark = Mark {
            run_start: start.parse().ok()?,
            offset: offset.parse().ok()?,
        };
        (0 <= mark.run_start && mark.run_start <= mark.offset).then_some(mark)
    }

    /// Whether this mark proves the record at `offset` decided.
    pub fn covers(self, offset: i64) -> bool {
        self.run_start <= offset && offset <= self.offset
    }
}

/// The decided offsets of one partition: disjoint, sorted, non-adjacent
/// half-open ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecidedRanges {
    ranges: Vec<(i64, i64)>,
}

impl DecidedRanges {
    /// Whether `offset` lies in a decided range.
    pub fn contains(&self, offset: i64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end <= offset);
        self.ranges
            .get(i)
            .is_some_and(|&(start, _)| start <= offset)
    }

    /// Adds the claim that every record in `[start, end)` was decided.
    pub fn claim(&mut self, start: i64, end: i64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Ranges that overlap or touch the claim merge into it.
        self.ranges.retain(|&(s, e)| {
            let apart = e < start || end < s;
            if !apart {
                start = start.min(s);
                end = end.max(e);
            }
            apart
        });
        let at = self.ranges.partition_point(|&(s, _)| s < start);
        self.ranges.insert(at, (start, end));
        while self.ranges.len() > MAX_RANGES {
            let smallest = (0..self.ranges.len())
                .min_by_key(|&i| self.ranges[i].1 - self.ranges[i].0)
                .expect("more than MAX_RANGES ranges");
            self.ranges.remove(smallest);
        }
    }

    /// The offsets both views say were decided (every cluster master must
    /// hold a record's effects for it to count as decided).
    pub fn intersect(&self, other: &DecidedRanges) -> DecidedRanges {
        let mut out = DecidedRanges::default();
        for &(a, b) in &self.ranges {
            for &(c, d) in &other.ranges {
                let (start, end) = (a.max(c), b.min(d));
                if start < end {
                    out.ranges.push((start, end));
                }
            }
        }
        out.ranges.sort_unstable();
        out
    }

    /// Where a run that begins reading at `at` starts: the start of the
    /// decided range `at` lies in or just after (its records before `at`
    /// were decided, so the run extends it), else `at` itself.
    pub fn run_start(&self, at: i64) -> i64 {
        self.ranges
            .iter()
            .find(|&&(start, end)| start <= at && at <= end)
            .map_or(at, |&(start, _)| start)
    }

    /// How many offsets of `[start, end)` no range covers.
    pub fn uncovered(&self, start: i64, end: i64) -> i64 {
        let covered: i64 = self
            .ranges
            .iter()
            .map(|&(a, b)| (b.min(end) - a.max(start)).max(0))
            .sum();
        (end - start).max(0) - covered
    }

    /// The ranges, e.g. `0-2000,5000-6000` (each `start-end`, end exclusive).
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// Stored ranges; `None` when the text is not what [`encode`] writes
    /// (read as no ranges: nothing is recognised from them).
    ///
    /// [`encode`]: DecidedRanges::encode
    pub fn decode(text: &str) -> Option<DecidedRanges> {
        let mut out = DecidedRanges::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (start, end) = part.split_once('-')?;
            let (start, end): (i64, i64) = (start.parse().ok()?, end.parse().ok()?);
            if start < 0 || start >= end {
                return None;
            }
            out.claim(start, end);
        }
        Some(out)
    }

    pub fn ranges(&self) -> &[(i64, i64)] {
        &self.ranges
    }
}

impl fmt::Display for DecidedRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (start, end)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{start}-{end}")?;
        }
        Ok(())
    }
}

/// One run of consumption of a partition: where it starts (see
/// [`DecidedRanges::run_start`]) and the offset after the last record it
/// decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: i64,
    pub next: i64,
}

impl Run {
    /// A run whose first record is at `at`, given what the partition's
    /// records say was decided.
    pub fn begin(decided: &DecidedRanges, at: i64) -> Run {
        Run {
            start: decided.run_start(at),
            next: at,
        }
    }

    /// After a batch that decided every record before `next`: the span to
    /// claim, `[start, next)`.
    pub fn advance(&mut self, next: i64) -> (i64, i64) {
        self.next = self.next.max(next);
        (self.start, self.next)
    }

    /// The mark of an entity whose record at `offset` this run decides.
    pub fn mark(self, offset: i64) -> Mark {
        Mark {
            run_start: self.start,
            offset,
        }
    }
}

/// What idem knows of one partition's log when it takes the partition: the
/// topic incarnation and the ranges every server says were decided in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogView {
    pub topic_id: TopicId,
    pub decided: DecidedRanges,
}

/// Whether the record at `offset` was decided before: it lies in a decided
/// range of its partition, or its entity's mark covers it.
pub fn is_reread(decided: &DecidedRanges, mark: Option<Mark>, offset: i64) -> bool {
    decided.contains(offset) || mark.is_some_and(|m| m.covers(offset))
}

#[cfg(test)]
mod tests;
