//! OwnedPartitions of the processing loop, owned by it alone: which partitions
//! this instance owns, which fetched offsets are done, and since when each
//! partition has made no progress.
//!
//! Guarantee: a revoked partition's offsets are committed only after every
//! batch holding its records has its outcome in Redis (or the revoke
//! deadline passed, in which case only what is done is committed); a lost
//! partition's offsets are never committed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::offsets::{Offsets, TopicPartition};

/// See the module doc.
#[derive(Default)]
pub struct OwnedPartitions {
    offsets: Offsets,
    assigned: HashSet<TopicPartition>,
    /// Per partition, the first offset stored since the last commit and when.
    stored_since: HashMap<TopicPartition, (i64, Instant)>,
    /// Per partition, when it last made progress (a record done, or work
    /// taken while it had none in flight).
    last_progress: HashMap<TopicPartition, Instant>,
}

impl OwnedPartitions {
    pub fn assign(&mut self, tps: &[TopicPartition]) {
        self.assigned.extend(tps.iter().cloned());
    }

    /// Stops accepting new records of `tps`; their in-flight work goes on.
    pub fn unassign(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.assigned.remove(tp);
        }
    }

    /// Forgets `tps` entirely: nothing of them is committed afterwards.
    pub fn forget(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.assigned.remove(tp);
            self.offsets.forget(tp);
            self.last_progress.remove(tp);
            self.stored_since.remove(tp);
        }
    }

    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.assigned.contains(tp)
    }

    pub fn assigned_count(&self) -> usize {
        self.assigned.len()
    }

    pub fn assigned(&self) -> impl Iterator<Item = &TopicPartition> {
        self.assigned.iter()
    }

    pub fn begin<'a>(&mut self, records: impl Iterator<Item = (&'a TopicPartition, i64)>) {
        let now = Instant::now();
        for (tp, offset) in records {
            if self.offsets.partition_in_flight(tp) == 0 {
                self.last_progress.insert(tp.clone(), now);
            }
            self.offsets.begin(tp, offset);
        }
    }

    pub fn mark_done<'a>(&mut self, records: impl Iterator<Item = (&'a TopicPartition, i64)>) {
        let now = Instant::now();
        for (tp, offset) in records {
            self.offsets.mark_done(tp, offset);
            if let Some(at) = self.last_progress.get_mut(tp) {
                *at = now;
            }
        }
    }

    /// Whether no record of `tps` is in flight.
    pub fn is_idle(&self, tps: &[TopicPartition]) -> bool {
        tps.iter()
            .all(|tp| self.offsets.partition_in_flight(tp) == 0)
    }

    /// Commit points that moved, for the partitions selected by `filter`.
    pub fn take_commits(
        &mut self,
        filter: impl Fn(&TopicPartition) -> bool,
    ) -> Vec<(TopicPartition, i64)> {
        self.offsets.take_commits_where(filter)
    }

    /// Commit points that moved, for the partitions this instance owns.
    pub fn take_owned_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        let assigned = &self.assigned;
        self.offsets.take_commits_where(|tp| assigned.contains(tp))
    }

    /// Partitions with records in flight and no progress for longer than
    /// `stall`, with how long they have been without progress: "blocked".
    ///
    /// | in flight | last progress  | blocked |
    /// |-----------|----------------|---------|
    /// | 0         | any            | no      |
    /// | > 0       | within `stall` | no      |
    /// | > 0       | before `stall` | yes     |
    pub fn blocked(&self, stall: Duration) -> Vec<(TopicPartition, Duration)> {
        let mut out: Vec<_> = self
            .last_progress
            .iter()
            .filter(|(tp, _)| self.offsets.partition_in_flight(tp) > 0)
            .map(|(tp, at)| (tp.clone(), at.elapsed()))
            .filter(|(_, idle)| *idle > stall)
            .collect();
        out.sort();
        out
    }

    /// Events fetched and not yet done.
    pub fn in_flight(&self) -> usize {
        self.offsets.in_flight()
    }

    /// Notes that `next` was stored for commit (for the commit-lag metric).
    pub fn note_stored(&mut self, tp: &TopicPartition, next: i64) {
        self.stored_since
            .entry(tp.clone())
            .or_insert((next, Instant::now()));
    }

    /// How long ago the oldest offset now covered by `committed` was stored.
    pub fn note_committed(&mut self, tp: &TopicPartition, committed: i64) -> Option<Duration> {
        match self.stored_since.get(tp) {
            Some((stored, at)) if *stored <= committed => {
                let lag = at.elapsed();
                self.stored_since.remove(tp);
                Some(lag)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_partition_commits_what_is_done_and_then_nothing() {
        let mut p = OwnedPartitions::default();
        let tp = TopicPartition::new("t", 0);
        p.assign(std::slice::from_ref(&tp));
        p.begin([(&tp, 10), (&tp, 11)].into_iter());
        p.unassign(std::slice::from_ref(&tp));
        assert!(!p.is_idle(std::slice::from_ref(&tp)));
        assert!(p.take_owned_commits().is_empty(), "no longer owned");
        p.mark_done([(&tp, 10), (&tp, 11)].into_iter());
        assert!(p.is_idle(std::slice::from_ref(&tp)));
        assert_eq!(p.take_commits(|t| *t == tp), vec![(tp.clone(), 12)]);
        p.forget(std::slice::from_ref(&tp));
        assert!(!p.is_assigned(&tp));
        p.mark_done([(&tp, 12)].into_iter());
        assert!(p.take_commits(|_| true).is_empty(), "forgotten");
    }

    #[test]
    fn commit_lag_runs_from_the_first_store_to_the_covering_commit() {
        let mut p = OwnedPartitions::default();
        let tp = TopicPartition::new("t", 0);
        p.note_stored(&tp, 5);
        p.note_stored(&tp, 9);
        assert_eq!(p.note_committed(&tp, 4), None, "does not cover 5");
        assert!(p.note_committed(&tp, 9).is_some());
        assert_eq!(p.note_committed(&tp, 9), None, "reported once");
    }

    /// The truth table of `blocked`.
    #[test]
    fn blocked_means_in_flight_without_progress() {
        let mut p = OwnedPartitions::default();
        let (a, b) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        let stall = Duration::from_millis(30);
        p.begin([(&a, 0), (&b, 0)].into_iter());
        assert!(p.blocked(stall).is_empty(), "fresh work is not blocked");
        std::thread::sleep(Duration::from_millis(40));
        p.mark_done([(&b, 0)].into_iter());
        let blocked = p.blocked(stall);
        assert_eq!(blocked.len(), 1, "{blocked:?}");
        assert_eq!(
            blocked[0].0, a,
            "a has work and no progress; b has none in flight"
        );
        p.begin([(&b, 1)].into_iter());
        assert_eq!(p.blocked(stall).len(), 1, "b's new work starts its clock");
        p.mark_done([(&a, 0)].into_iter());
        assert!(p.blocked(stall).is_empty());
    }
}
