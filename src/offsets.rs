//! Per-partition progress: which fetched offsets are done, and the offset
//! that is safe to commit.
//!
//! Guarantee: the commit point of a partition is the offset *after* the
//! highest offset below which every fetched record is done. A record that is
//! not done (its effect not yet in Redis) holds the commit point back, however
//! many records after it are done.

use std::collections::{BTreeMap, VecDeque};

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

/// Which partitions, for a log line: `orders[0,2] payments[1]` (topics in
/// order, each topic's partitions sorted), `none` for an empty list.
pub fn describe_partitions<'a>(tps: impl IntoIterator<Item = &'a TopicPartition>) -> String {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for tp in tps {
        by_topic.entry(&tp.topic).or_default().push(tp.partition);
    }
    if by_topic.is_empty() {
        return "none".to_string();
    }
    let topics: Vec<String> = by_topic
        .into_iter()
        .map(|(topic, mut partitions)| {
            partitions.sort_unstable();
            let list: Vec<String> = partitions.iter().map(i32::to_string).collect();
            format!("{topic}[{}]", list.join(","))
        })
        .collect();
    topics.join(" ")
}

/// Progress of one partition. Offsets are begun in fetch order; they may have
/// gaps (compaction, transaction markers), which is why the tracker keeps the
/// fetched offsets rather than assuming `offset + 1`.
///
/// | fetched (done?)         | `commit_point()` |
/// |-------------------------|------------------|
/// | –                       | None             |
/// | 5 (no)                  | None             |
/// | 5 (yes)                 | Some(6)          |
/// | 5 (yes), 6 (no), 7 (yes)| Some(6)          |
/// | 5 (yes), 6 (yes), 9 (yes)| Some(10)        |
/// | 5 (no), 6 (yes)         | None             |
#[derive(Debug, Default, Clone)]
pub struct PartitionOffsets {
    /// Fetched offsets not yet released, in fetch order, with their done flag.
    in_flight: VecDeque<(i64, bool)>,
    /// The highest released offset + 1: what may be committed.
    commit_point: Option<i64>,
    /// The commit point last handed out by `take_commit`.
    last_taken: Option<i64>,
}

impl PartitionOffsets {
    /// Records that `offset` was fetched and its work has begun.
    /// An offset at or below one already begun (a partition rewound by a
    /// rebalance) is not tracked again: the record is processed, but only the
    /// first sighting moves the commit point.
    pub fn begin(&mut self, offset: i64) {
        if self.in_flight.back().is_some_and(|(o, _)| *o >= offset)
            || self.commit_point.is_some_and(|c| offset < c)
        {
            return;
        }
        self.in_flight.push_back((offset, false));
    }

    /// Marks `offset` done (its outcome is durable) and releases every done
    /// offset at the front.
    pub fn mark_done(&mut self, offset: i64) {
        if let Some(entry) = self.in_flight.iter_mut().find(|(o, _)| *o == offset) {
            entry.1 = true;
        }
        while let Some(&(o, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
            self.commit_point = Some(o + 1);
        }
    }

    /// The next offset to read once everything before it is done.
    pub fn commit_point(&self) -> Option<i64> {
        self.commit_point
    }

    /// The commit point if it moved since the last call.
    pub fn take_commit(&mut self) -> Option<i64> {
        if self.commit_point != self.last_taken {
            self.last_taken = self.commit_point;
            self.commit_point
        } else {
            None
        }
    }

    /// Offsets fetched but not done yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Progress of every partition this instance works on.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: BTreeMap<TopicPartition, PartitionOffsets>,
}

impl Offsets {
    pub fn begin(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.begin(offset);
        } else {
            let mut p = PartitionOffsets::default();
            p.begin(offset);
            self.partitions.insert(tp.clone(), p);
        }
    }

    pub fn mark_done(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.mark_done(offset);
        }
    }

    /// Commit points that moved since the last call, per partition.
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        self.take_commits_where(|_| true)
    }

    /// Like `take_commits`, for the partitions `filter` selects.
    pub fn take_commits_where(
        &mut self,
        filter: impl Fn(&TopicPartition) -> bool,
    ) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter_mut()
            .filter(|(tp, _)| filter(tp))
            .filter_map(|(tp, p)| p.take_commit().map(|o| (tp.clone(), o)))
            .collect()
    }

    /// Events of one partition fetched and not yet done.
    pub fn partition_in_flight(&self, tp: &TopicPartition) -> usize {
        self.partitions
            .get(tp)
            .map_or(0, PartitionOffsets::in_flight)
    }

    /// Forgets a partition (revoked or lost): nothing of it is committed later.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// Events fetched and not yet done, all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(PartitionOffsets::in_flight)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assignment's log line names the partitions, not only their count.
    #[test]
    fn partitions_are_named_by_topic() {
        let tps = [
            TopicPartition::new("payments", 1),
            TopicPartition::new("orders", 2),
            TopicPartition::new("orders", 0),
        ];
        assert_eq!(describe_partitions(&tps), "orders[0,2] payments[1]");
        assert_eq!(describe_partitions(&[]), "none");
    }

    /// A rewound partition (a rebalance hands back offsets already begun):
    /// the repeated offsets are not tracked again, and the commit point
    /// never moves back.
    #[test]
    fn rewound_offsets_are_not_tracked_again() {
        let mut p = PartitionOffsets::default();
        for o in 10..13 {
            p.begin(o);
        }
        p.begin(11); // rewound while still in flight
        assert_eq!(p.in_flight(), 3);
        p.mark_done(10);
        p.mark_done(11);
        assert_eq!(p.commit_point(), Some(12));
        p.begin(10); // rewound below the commit point
        assert_eq!(p.in_flight(), 1, "only 12 is in flight");
        p.mark_done(10);
        assert_eq!(p.commit_point(), Some(12), "never backwards");
        p.mark_done(12);
        assert_eq!(p.commit_point(), Some(13));
    }

    /// With nothing in flight, only the commit point tells a rewound offset
    /// (below it: not tracked) from a new one (at or above it: tracked).
    #[test]
    fn with_nothing_in_flight_the_commit_point_decides() {
        let mut p = PartitionOffsets::default();
        p.begin(20);
        p.mark_done(20);
        assert_eq!((p.commit_point(), p.in_flight()), (Some(21), 0));
        p.begin(19);
        assert_eq!(p.in_flight(), 0, "19 is below the commit point");
        p.begin(21);
        assert_eq!(p.in_flight(), 1, "21 is the commit point itself");
        p.mark_done(21);
        p.begin(30);
        assert_eq!(p.in_flight(), 1, "a gap (compacted offsets) is tracked");
        p.mark_done(30);
        assert_eq!(p.commit_point(), Some(31));
    }

    /// The truth table from the type's doc, as data.
    #[test]
    fn commit_point_by_table() {
        type Row = (&'static [(i64, bool)], Option<i64>);
        let table: &[Row] = &[
            (&[], None),
            (&[(5, false)], None),
            (&[(5, true)], Some(6)),
            (&[(5, true), (6, false), (7, true)], Some(6)),
            (&[(5, true), (6, true), (9, true)], Some(10)),
            (&[(5, false), (6, true)], None),
        ];
        for (fetched, want) in table {
            let mut p = PartitionOffsets::default();
            for (o, _) in fetched.iter() {
                p.begin(*o);
            }
            for (o, done) in fetched.iter() {
                if *done {
                    p.mark_done(*o);
                }
            }
            assert_eq!(p.commit_point(), *want, "{fetched:?}");
        }
    }

    #[test]
    fn commit_is_last_done_plus_one_and_taken_once() {
        let mut offsets = Offsets::default();
        let tp = TopicPartition::new("t", 0);
        for o in 0..10 {
            offsets.begin(&tp, o);
        }
        for o in [0, 1, 2, 4, 5] {
            offsets.mark_done(&tp, o);
        }
        assert_eq!(offsets.take_commits(), vec![(tp.clone(), 3)]);
        assert_eq!(offsets.take_commits(), vec![]);
        offsets.mark_done(&tp, 3);
        assert_eq!(offsets.take_commits(), vec![(tp.clone(), 6)]);
        assert_eq!(offsets.in_flight(), 4);
        offsets.forget(&tp);
        offsets.mark_done(&tp, 6);
        assert_eq!(offsets.take_commits(), vec![]);
    }

    #[test]
    fn out_of_order_completion_releases_in_order() {
        let mut p = PartitionOffsets::default();
        for o in 100..200 {
            p.begin(o);
        }
        for o in (100..200).rev() {
            p.mark_done(o);
            let expected = if o == 100 { Some(200) } else { None };
            assert_eq!(p.commit_point(), expected);
        }
    }
}
