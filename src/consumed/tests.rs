//! The decided ranges' tables, and the rule's soundness against a model of
//! consumption histories: runs that start anywhere (a reset to latest, a
//! skip, a rewind, a backfill), batches retried after a lost reply, claims
//! lost with a crash.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn ranges(text: &str) -> DecidedRanges {
    DecidedRanges::decode(text).expect("valid ranges")
}

/// | stored           | claim    | after                  |
/// |------------------|----------|------------------------|
/// | –                | 0-10     | 0-10                   |
/// | 0-10             | 10-20    | 0-20 (touching merges) |
/// | 0-10             | 12-20    | 0-10,12-20             |
/// | 0-10,12-20       | 5-15     | 0-20                   |
/// | 5-10             | 0-3      | 0-3,5-10 (kept sorted) |
/// | 5-10             | 0-5      | 0-10 (touching merges) |
/// | 0-10             | 7-7      | 0-10 (empty claim)     |
/// | 0-10             | 3-5      | 0-10 (inside)          |
#[test]
fn claims_merge_into_sorted_disjoint_ranges() {
    for (stored, (start, end), after) in [
        ("", (0, 10), "0-10"),
        ("0-10", (10, 20), "0-20"),
        ("0-10", (12, 20), "0-10,12-20"),
        ("0-10,12-20", (5, 15), "0-20"),
        ("5-10", (0, 3), "0-3,5-10"),
        ("5-10", (0, 5), "0-10"),
        ("0-10", (7, 7), "0-10"),
        ("0-10", (3, 5), "0-10"),
    ] {
        let mut r = ranges(stored);
        r.claim(start, end);
        assert_eq!(r.encode(), after, "{stored} + {start}-{end}");
    }
}

#[test]
fn contains_reads_half_open_ranges() {
    let r = ranges("0-10,20-30");
    let inside: Vec<i64> = (-1..32).filter(|&o| r.contains(o)).collect();
    let want: Vec<i64> = (0..10).chain(20..30).collect();
    assert_eq!(inside, want);
    assert!(!DecidedRanges::default().contains(0));
}

/// | stored     | first record at | run starts at |
/// |------------|-----------------|---------------|
/// | –          | 7               | 7             |
/// | 0-10       | 10              | 0 (touching)  |
/// | 0-10       | 4               | 0 (inside)    |
/// | 0-10       | 11              | 11 (a gap)    |
/// | 0-10,20-30 | 25              | 20            |
#[test]
fn a_run_extends_the_range_it_begins_in_or_after() {
    for (stored, at, start) in [
        ("", 7, 7),
        ("0-10", 10, 0),
        ("0-10", 4, 0),
        ("0-10", 11, 11),
        ("0-10,20-30", 25, 20),
    ] {
        let run = Run::begin(&ranges(stored), at);
        assert_eq!(run, Run { start, next: at }, "{stored} at {at}");
    }
}

#[test]
fn a_run_claims_from_its_start_and_never_moves_back() {
    let mut run = Run::begin(&ranges("0-10"), 10);
    assert_eq!(run.advance(15), (0, 15));
    assert_eq!(run.advance(12), (0, 15));
    assert_eq!(
        run.mark(14),
        Mark {
            run_start: 0,
            offset: 14
        }
    );
}

#[test]
fn past_the_cap_the_smallest_range_is_forgotten() {
    let mut r = DecidedRanges::default();
    for i in 0..MAX_RANGES as i64 {
        r.claim(i * 100, i * 100 + 50);
    }
    r.claim(10_000, 10_001);
    assert_eq!(r.ranges().len(), MAX_RANGES);
    assert!(!r.contains(10_000), "the one-offset range went first");
    r.claim(20_000, 20_090);
    assert_eq!(r.ranges().len(), MAX_RANGES);
    assert!(r.contains(20_000), "a larger range stays");
}

#[test]
fn stored_forms_round_trip_and_junk_reads_as_nothing() {
    for text in ["", "0-1", "0-10,12-20", "5-9223372036854775807"] {
        assert_eq!(ranges(text).encode(), text);
    }
    for junk in ["x", "5", "5-", "-5", "10-5", "3-3", "0-10,a-b", "-1-4"] {
        assert_eq!(DecidedRanges::decode(junk), None, "{junk:?}");
    }
    assert_eq!(
        Mark::decode("0:14"),
        Some(Mark {
            run_start: 0,
            offset: 14
        })
    );
    assert_eq!(
        Mark {
            run_start: 3,
            offset: 9
        }
        .encode(),
        "3:9"
    );
    for junk in ["", "14", "a:1", "1:a", "5:4", "-1:4", "1:2:3"] {
        assert_eq!(Mark::decode(junk), None, "{junk:?}");
    }
}

/// | mark  | offset | covered |
/// |-------|--------|---------|
/// | 5:9   | 4      | no      |
/// | 5:9   | 5      | yes     |
/// | 5:9   | 9      | yes     |
/// | 5:9   | 10     | no      |
#[test]
fn a_mark_covers_its_run_up_to_its_offset() {
    let mark = Mark {
        run_start: 5,
        offset: 9,
    };
    let covered: Vec<i64> = (0..12).filter(|&o| mark.covers(o)).collect();
    assert_eq!(covered, vec![5, 6, 7, 8, 9]);
    let none = DecidedRanges::default();
    assert!(is_reread(&none, Some(mark), 7));
    assert!(!is_reread(&none, Some(mark), 10));
    assert!(!is_reread(&none, None, 7));
    assert!(is_reread(&ranges("0-8"), None, 7));
}

/// One partition's log: the entity of each offset (a few entities).
fn log(rng: &mut StdRng, len: i64) -> Vec<u8> {
    (0..len).map(|_| rng.random_range(0..4)).collect()
}

/// A history of runs over one partition, with what each step decided, and
/// the rule asked before every decision. Returns (records the rule called
/// re-reads, records it let through although decided) for the caller's
/// asserts; panics if it ever calls an undecided record a re-read.
fn replay_history(seed: u64) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let len = 200;
    let entities = log(&mut rng, len);
    let mut stored = DecidedRanges::default();
    let mut marks: BTreeMap<u8, Mark> = BTreeMap::new();
    // The model: the offsets whose record was decided.
    let mut truth: BTreeSet<i64> = BTreeSet::new();
    let (mut rereads, mut missed) = (0, 0);
    for _ in 0..rng.random_range(1..8) {
        // A run begins anywhere: the committed offset, a rewind, a skip.
        let at = rng.random_range(0..len);
        let mut run = Run::begin(&stored, at);
        let mut next = at;
        while next < len && rng.random_bool(0.9) {
            let end = (next + rng.random_range(1..20)).min(len);
            // A lost reply: the batch is retried, part of it already decided.
            let attempts = if rng.random_bool(0.2) { 2 } else { 1 };
            for attempt in 0..attempts {
                let cut = if attempt + 1 < attempts {
                    rng.random_range(next..=end)
                } else {
                    end
                };
                for offset in next..cut {
                    let entity = entities[offset as usize];
                    let reread = is_reread(&stored, marks.get(&entity).copied(), offset);
                    assert!(
                        !reread || truth.contains(&offset),
                        "seed {seed}: offset {offset} called a re-read but never decided"
                    );
                    if reread {
                        rereads += 1;
                        continue;
                    }
                    if truth.contains(&offset) {
                        missed += 1;
                    }
                    truth.insert(offset);
                    marks.insert(entity, run.mark(offset));
                }
            }
            // A crash between the effects and the claim loses the claim.
            if rng.random_bool(0.9) {
                let (start, end) = run.advance(end);
                stored.claim(start, end);
            } else {
                run.advance(end);
            }
            next = end;
        }
    }
    (rereads, missed)
}

#[test]
fn the_rule_never_calls_an_undecided_record_a_reread() {
    let (mut rereads, mut missed) = (0, 0);
    for seed in 0..2_000 {
        let (r, m) = replay_history(seed);
        rereads += r;
        missed += m;
    }
    // The rule recognises most re-reads (only lost claims and forgotten
    // ranges fall back to the window and the seq).
    assert!(rereads > 10 * missed, "re-reads {rereads}, missed {missed}");
}

#[test]
fn topic_ids_are_hex_and_never_zero() {
    assert_eq!(TopicId::from_bits(0, 0), None);
    assert!(TopicId::from_bits(0, 5).is_some(), "one half zero is an id");
    assert!(TopicId::from_bits(5, 0).is_some(), "one half zero is an id");
    let id = TopicId::from_bits(1, -1).unwrap();
    assert_eq!(id.as_str(), "0000000000000001ffffffffffffffff");
    assert_eq!(id.short(), "000000000000");
    assert_eq!(TopicId::parse(id.as_str()), Some(id));
    for junk in ["", "xyz", &"0".repeat(32), &"g".repeat(32), &"a".repeat(31)] {
        assert_eq!(TopicId::parse(junk), None, "{junk:?}");
    }
}

/// | one        | other      | both        |
/// |------------|------------|-------------|
/// | 0-10       | 0-10       | 0-10        |
/// | 0-10       | –          | –           |
/// | 0-10       | 10-20      | – (touching)|
/// | 0-10,20-30 | 5-25       | 5-10,20-25  |
/// | 0-100      | 10-20,30-40| 10-20,30-40 |
#[test]
fn the_intersection_is_what_every_server_says() {
    for (one, other, both) in [
        ("0-10", "0-10", "0-10"),
        ("0-10", "", ""),
        ("0-10", "10-20", ""),
        ("0-10,20-30", "5-25", "5-10,20-25"),
        ("0-100", "10-20,30-40", "10-20,30-40"),
    ] {
        assert_eq!(ranges(one).intersect(&ranges(other)).encode(), both);
        assert_eq!(ranges(other).intersect(&ranges(one)).encode(), both);
    }
}

/// | ranges     | span   | uncovered |
/// |------------|--------|-----------|
/// | –          | 0-10   | 10        |
/// | 0-10       | 0-10   | 0         |
/// | 2-4,6-8    | 0-10   | 6         |
/// | 0-100      | 50-20  | 0 (empty) |
#[test]
fn uncovered_counts_what_no_range_holds() {
    assert_eq!(DecidedRanges::default().uncovered(0, 10), 10);
    assert_eq!(ranges("0-10").uncovered(0, 10), 0);
    assert_eq!(ranges("2-4,6-8").uncovered(0, 10), 6);
    assert_eq!(ranges("0-100").uncovered(50, 20), 0);
}
