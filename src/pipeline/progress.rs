//! Progress shared by the fetch loop, the guard stage and the rebalance
//! callbacks: which partitions this instance owns and which fetched offsets
//! are done.
//!
//! Guarantee: a revoked partition's offsets are committed only after every
//! batch holding its records has its outcome in Redis (or the revoke
//! deadline passed, in which case only what is done is committed); a lost
//! partition's offsets are never committed.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::offsets::{Offsets, TopicPartition};

#[derive(Default)]
struct Inner {
    offsets: Offsets,
    assigned: HashSet<TopicPartition>,
    /// Set after the shutdown drain: nothing in flight will finish any more.
    closed: bool,
    /// Per partition, the first offset stored since the last commit and when.
    stored_since: HashMap<TopicPartition, (i64, Instant)>,
    /// Per partition, when it last made progress (a record done, or work
    /// taken while it had none in flight).
    last_progress: HashMap<TopicPartition, Instant>,
}

/// See the module doc.
#[derive(Default)]
pub struct Progress {
    inner: Mutex<Inner>,
    /// Signalled when offsets are marked done (for the blocking revoke wait).
    done: Condvar,
    /// Signalled when offsets are marked done (for the async fetch loop).
    committable: Notify,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn assign(&self, tps: &[TopicPartition]) {
        self.lock().assigned.extend(tps.iter().cloned());
    }

    /// Stops accepting new records of `tps`; their in-flight work goes on.
    pub fn unassign(&self, tps: &[TopicPartition]) {
        let mut inner = self.lock();
        for tp in tps {
            inner.assigned.remove(tp);
        }
    }

    /// Forgets `tps` entirely: nothing of them is committed afterwards.
    pub fn forget(&self, tps: &[TopicPartition]) {
        let mut inner = self.lock();
        for tp in tps {
            inner.assigned.remove(tp);
            inner.offsets.forget(tp);
            inner.last_progress.remove(tp);
        }
    }

    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.lock().assigned.contains(tp)
    }

    pub fn begin(&self, records: impl Iterator<Item = (TopicPartition, i64)>) {
        let mut inner = self.lock();
        let now = Instant::now();
        for (tp, offset) in records {
            if inner.offsets.partition_in_flight(&tp) == 0 {
                inner.last_progress.insert(tp.clone(), now);
            }
            inner.offsets.begin(&tp, offset);
        }
    }

    pub fn mark_done<'a>(&self, records: impl Iterator<Item = (&'a TopicPartition, i64)>) {
        {
            let mut inner = self.lock();
            let now = Instant::now();
            for (tp, offset) in records {
                inner.offsets.mark_done(tp, offset);
                if let Some(at) = inner.last_progress.get_mut(tp) {
                    *at = now;
                }
            }
        }
        self.done.notify_all();
        self.committable.notify_one();
    }

    /// Commit points that moved, for the partitions selected by `filter`
    /// (called with the lock held: it must not call back into `Progress`).
    pub fn take_commits(
        &self,
        filter: impl Fn(&TopicPartition) -> bool,
    ) -> Vec<(TopicPartition, i64)> {
        self.lock().offsets.take_commits_where(filter)
    }

    /// Commit points that moved, for the partitions this instance owns.
    pub fn take_owned_commits(&self) -> Vec<(TopicPartition, i64)> {
        let mut inner = self.lock();
        let Inner {
            offsets, assigned, ..
        } = &mut *inner;
        offsets.take_commits_where(|tp| assigned.contains(tp))
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
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .last_progress
            .iter()
            .filter(|(tp, _)| inner.offsets.partition_in_flight(tp) > 0)
            .map(|(tp, at)| (tp.clone(), at.elapsed()))
            .filter(|(_, idle)| *idle > stall)
            .collect();
        out.sort();
        out
    }

    /// Events fetched and not yet done.
    pub fn in_flight(&self) -> usize {
        self.lock().offsets.in_flight()
    }

    /// Notes that `next` was stored for commit (for the commit-lag metric).
    pub fn note_stored(&self, tp: &TopicPartition, next: i64) {
        self.lock()
            .stored_since
            .entry(tp.clone())
            .or_insert((next, Instant::now()));
    }

    /// How long ago the oldest offset now covered by `committed` was stored.
    pub fn note_committed(&self, tp: &TopicPartition, committed: i64) -> Option<Duration> {
        let mut inner = self.lock();
        match inner.stored_since.get(tp) {
            Some((stored, at)) if *stored <= committed => {
                let lag = at.elapsed();
                inner.stored_since.remove(tp);
                Some(lag)
            }
            _ => None,
        }
    }

    /// After the shutdown drain: waits for in-flight work return at once.
    pub fn close(&self) {
        self.lock().closed = true;
        self.done.notify_all();
    }

    /// Blocks until no record of `tps` is in flight, or `timeout` passes.
    /// Returns whether they went idle.
    pub fn wait_idle(&self, tps: &[TopicPartition], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if tps
                .iter()
                .all(|tp| inner.offsets.partition_in_flight(tp) == 0)
            {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = self
                .done
                .wait_timeout(inner, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Resolves when some offsets were marked done since the last call.
    pub async fn committable(&self) {
        self.committable.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn revoke_waits_for_in_flight_records() {
        let p = Arc::new(Progress::default());
        let tp = TopicPartition::new("t", 0);
        p.assign(std::slice::from_ref(&tp));
        p.begin([(tp.clone(), 10), (tp.clone(), 11)].into_iter());
        assert!(!p.wait_idle(std::slice::from_ref(&tp), Duration::from_millis(20)));
        let worker = {
            let (p, tp) = (p.clone(), tp.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                p.mark_done([(&tp, 10), (&tp, 11)].into_iter());
            })
        };
        assert!(p.wait_idle(std::slice::from_ref(&tp), Duration::from_secs(5)));
        worker.join().unwrap();
        assert_eq!(p.take_commits(|_| true), vec![(tp.clone(), 12)]);
        p.forget(std::slice::from_ref(&tp));
        assert!(!p.is_assigned(&tp));
    }

    /// The truth table of `blocked`.
    #[test]
    fn blocked_means_in_flight_without_progress() {
        let p = Progress::default();
        let (a, b) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        let stall = Duration::from_millis(30);
        p.begin([(a.clone(), 0), (b.clone(), 0)].into_iter());
        assert!(p.blocked(stall).is_empty(), "fresh work is not blocked");
        std::thread::sleep(Duration::from_millis(40));
        p.mark_done([(&b, 0)].into_iter());
        let blocked = p.blocked(stall);
        assert_eq!(blocked.len(), 1, "{blocked:?}");
        assert_eq!(
            blocked[0].0, a,
            "a has work and no progress; b has none in flight"
        );
        p.begin([(b.clone(), 1)].into_iter());
        assert_eq!(p.blocked(stall).len(), 1, "b's new work starts its clock");
        p.mark_done([(&a, 0)].into_iter());
        assert!(p.blocked(stall).is_empty());
    }
}
