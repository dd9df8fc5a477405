//! The runs' rules, fed with batches: a run begins at the first record
//! seen, extends the decided range it begins in, claims from its start,
//! and a batch that starts below its run is reported, never placed.

use super::*;
use crate::consumed::{DecidedRanges, TopicId};
use crate::event::Invalid;
use crate::pipeline::batch::Item;

fn tp(p: i32) -> TopicPartition {
    TopicPartition::new("t", p)
}

fn id() -> TopicId {
    TopicId::from_bits(0x0123_4567_89ab_cdef, 1).unwrap()
}

fn view(decided: &str) -> LogView {
    LogView {
        topic_id: id(),
        decided: DecidedRanges::decode(decided).unwrap(),
    }
}

/// A batch of (partition index, offset) over partitions 0 and 1.
fn batch(records: &[(usize, i64)]) -> Batch {
    Batch {
        partitions: vec![tp(0), tp(1)],
        policies: vec![Default::default(); 2],
        items: records
            .iter()
            .map(|&(partition_index, offset)| Item {
                partition_index,
                offset,
                timestamp_ms: None,
                key: None,
                value: None,
                headers: Vec::new(),
                decoded: Err(Invalid::EmptyValue),
                effects: Default::default(),
                verdict: None,
            })
            .collect(),
    }
}

fn starts(placed: &Placed, b: &Batch) -> Vec<Option<i64>> {
    b.items
        .iter()
        .map(|it| placed.place(it).map(|p| p.run_start))
        .collect()
}

#[test]
fn a_run_begins_at_the_first_record_and_extends_what_was_decided() {
    let mut runs = Runs::default();
    runs.take(vec![(tp(0), view("0-100")), (tp(1), view("0-10"))]);
    // Partition 0 resumes inside its decided range, 1 past a gap.
    let b = batch(&[(0, 98), (1, 20), (0, 99), (0, 100), (1, 21)]);
    assert!(runs.jumped_back(&b).is_empty());
    let placed = runs.place(&b);
    assert_eq!(
        starts(&placed, &b),
        [Some(0), Some(20), Some(0), Some(0), Some(20)]
    );
    assert_eq!(placed.decided, [true, false, true, false, false]);
    let field = mark_field(0, &id());
    assert_eq!(placed.place(&b.items[0]).unwrap().mark_field, field);
    assert_eq!(placed.place(&b.items[3]).unwrap().offset, 100);
    let mut claims = runs.claims(&b);
    claims.sort_by_key(|c| c.tp.partition);
    let spans: Vec<(i32, i64, i64)> = claims
        .iter()
        .map(|c| (c.tp.partition, c.start, c.end))
        .collect();
    assert_eq!(spans, [(0, 0, 101), (1, 20, 22)]);
    runs.claimed(&claims);
    // The next batch goes on from there; what this one claimed counts as decided.
    let next = batch(&[(1, 21), (1, 22)]);
    assert_eq!(runs.jumped_back(&next), [tp(1)], "21 is below the run's 22");
    let later = batch(&[(1, 22), (0, 105)]);
    assert!(runs.jumped_back(&later).is_empty(), "a gap forward goes on");
    let placed = runs.place(&later);
    assert_eq!(starts(&placed, &later), [Some(20), Some(0)]);
}

#[test]
fn a_partition_without_a_topic_id_is_not_placed_and_a_released_one_neither() {
    let mut runs = Runs::default();
    runs.take(vec![(tp(0), view(""))]);
    let b = batch(&[(0, 50), (1, 7)]);
    let placed = runs.place(&b);
    assert_eq!(
        starts(&placed, &b),
        [Some(50), None],
        "partition 1 has no id"
    );
    assert_eq!(placed.decided, [false, false]);
    let claims = runs.claims(&b);
    assert_eq!(claims.len(), 1);
    runs.claimed(&claims);
    runs.release(&[tp(0)]);
    let next = batch(&[(0, 51)]);
    assert_eq!(starts(&runs.place(&next), &next), [None]);
    assert!(runs.claims(&next).is_empty());
}

/// Offsets that go back within one batch are a jump too.
#[test]
fn offsets_going_back_inside_a_batch_are_reported() {
    let mut runs = Runs::default();
    runs.take(vec![(tp(0), view("")), (tp(1), view(""))]);
    let b = batch(&[(0, 10), (1, 5), (0, 11), (0, 3), (1, 6)]);
    assert_eq!(runs.jumped_back(&b), [tp(0)]);
    let fine = batch(&[(0, 10), (1, 5), (0, 11)]);
    assert!(
        runs.jumped_back(&fine).is_empty(),
        "no run yet, offsets go up"
    );
}
