//! Where a partition resumes when it is assigned: at the offset committed in
//! Kafka, or further back where Redis's own progress records say its state
//! does not reach that far (Redis restarted empty, was restored from an older
//! snapshot, or a replica without the last writes took over). Pure: facts in,
//! a decision out; `pipeline` reads the facts and acts.
//!
//! Kafka's commit is a hint; Redis's records are the truth about Redis. They
//! are tied together by the commit metadata: idem commits `idem.v1
//! epoch=<E>`, meaning "when this was committed, Redis with epoch E held
//! progress records at least this far". A commit without it (written by an
//! earlier idem or by a plain Kafka client such as `kafka-consumer-groups`)
//! is a bootstrap: taken as it is where Redis holds idem's data (the upgrade
//! from a version without records), tied to Redis at once (records raised,
//! the offset committed again with the metadata), and refused where Redis
//! holds nothing of idem's, since then the commit cannot tell a new Redis
//! from a lost one ([`Start::judged`]).

use crate::store::progress::MasterRecord;

/// The prefix of the commit metadata idem writes.
const METADATA_PREFIX: &str = "idem.v1 epoch=";

/// The commit metadata for offsets committed while Redis had `epoch`.
pub fn commit_metadata(epoch: &str) -> String {
    format!("{METADATA_PREFIX}{epoch}")
}

/// The epoch a commit's metadata names, if idem wrote it.
pub fn metadata_epoch(metadata: &str) -> Option<&str> {
    metadata
        .strip_prefix(METADATA_PREFIX)
        .filter(|e| !e.is_empty())
}

/// Where a partition starts, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Where Kafka says (the committed offset, or `auto_offset_reset`).
    Committed,
    /// The commit was not written by this idem (an earlier version, or an
    /// operator's tool): taken as it is, and Redis's records raised to it.
    Bootstrap,
    /// Redis's state stops before the committed offset: read again from `to`.
    Rewind {
        to: i64,
        committed: i64,
        cause: Cause,
    },
    /// Redis needs records from `needed` but the log starts at `log_start`:
    /// their effects are lost and cannot be re-applied from Kafka.
    Refuse {
        needed: i64,
        log_start: i64,
        committed: i64,
        cause: Cause,
    },
    /// A commit idem did not write, and a Redis that holds nothing of
    /// idem's: a new Redis meant to start at the commit, or one that lost
    /// its state while idem was down. Only the operator can tell.
    Ambiguous { committed: i64 },
}

/// What Redis holds beyond the partition's own records, for [`Start::judged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisHolds {
    /// Some server holds progress records (of any partition).
    pub records: bool,
    /// Some entity has state under the key prefix.
    pub entities: bool,
}

/// Why Redis is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A server holds no marker, or a renewed one and no record: it lost
    /// everything (restarted empty, flushed).
    Lost,
    /// A server's record is behind the commit: its state went back in time
    /// (an older snapshot restored, a replica without the last writes promoted).
    RolledBack,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Lost => "lost",
            Cause::RolledBack => "rolled_back",
        }
    }

    /// What Redis did, for a sentence: "Redis … ".
    pub fn describe(self) -> &'static str {
        match self {
            Cause::Lost => "lost its state",
            Cause::RolledBack => "went back to an older state",
        }
    }
}

/// Decides where a partition starts; a rewind is then held to where the
/// log starts now ([`Start::within_log`]: a rewind before it is refused).
///
/// `committed`: Kafka's committed offset and its metadata; `records`: what
/// each Redis server says.
///
/// | committed | metadata epoch | a server says                    | start        |
/// |-----------|----------------|----------------------------------|--------------|
/// | none      | any            | any                              | Committed    |
/// | C         | none           | any                              | Bootstrap (judged by [`Start::judged`]) |
/// | C         | E              | every record ≥ C                 | Committed    |
/// | C         | E              | record P < C                     | Rewind to P  |
/// | C         | E              | no record, marker E, no records at all there | (no opinion) |
/// | C         | E              | no record, marker E, others there | Rewind to 0 (rolled back) |
/// | C         | E              | no record, marker absent or ≠ E  | Rewind to 0 (lost) |
/// | C         | E              | rewind target < log start (`within_log`) | Refuse |
pub fn decide(committed: Option<(i64, &str)>, records: &[MasterRecord]) -> Start {
    let Some((committed, metadata)) = committed else {
        return Start::Committed;
    };
    let Some(epoch) = metadata_epoch(metadata) else {
        return Start::Bootstrap;
    };
    let mut target: Option<(i64, Cause)> = None;
    for r in records {
        let says = match r.next {
            Some(next) => (next, Cause::RolledBack),
            // No record where the marker is intact: a resharding moved the
            // master's lowest slot (no records there at all: no opinion),
            // or the record came after the state Redis went back to.
            None if r.marker.as_deref() == Some(epoch) && !r.has_records => continue,
            None if r.marker.as_deref() == Some(epoch) => (0, Cause::RolledBack),
            None => (0, Cause::Lost),
        };
        if target.is_none_or(|(t, _)| says.0 < t) {
            target = Some(says);
        }
    }
    match target {
        Some((to, cause)) if to < committed => Start::Rewind {
            to,
            committed,
            cause,
        },
        _ => Start::Committed,
    }
}

impl Start {
    /// A bootstrap judged by what Redis holds (`holds`; asked only for a
    /// bootstrap, as it costs a SCAN): where Redis holds idem's records or
    /// entities the commit is taken as it is (the upgrade from a version
    /// without records); where it holds neither, the start is ambiguous
    /// unless the operator accepted the commits (`accept`). Every other
    /// start stays as it is. Every instance reads the same facts, and
    /// nothing is written before a refusal, so instances starting at once
    /// decide the same.
    ///
    /// | start     | records | entities | accept | judged    |
    /// |-----------|---------|----------|--------|-----------|
    /// | Bootstrap | yes     | any      | any    | Bootstrap |
    /// | Bootstrap | no      | yes      | any    | Bootstrap |
    /// | Bootstrap | no      | no       | no     | Ambiguous |
    /// | Bootstrap | no      | no       | yes    | Bootstrap |
    /// | Bootstrap at offset 0 | no | no   | no     | Bootstrap |
    /// | other     | any     | any      | any    | unchanged |
    pub fn judged(self, committed: Option<i64>, holds: RedisHolds, accept: bool) -> Start {
        match (self, committed) {
            // A commit at 0 has nothing before it to disagree about.
            (Start::Bootstrap, Some(committed))
                if committed > 0 && !holds.records && !holds.entities && !accept =>
            {
                Start::Ambiguous { committed }
            }
            (start, _) => start,
        }
    }

    /// A rewind held to the partition's first offset now (`log_start`): a
    /// rewind before it needs records retention deleted, and is refused.
    /// Every other start stays as it is.
    pub fn within_log(self, log_start: i64) -> Start {
        match self {
            Start::Rewind {
                to,
                committed,
                cause,
            } if to < log_start => Start::Refuse {
                needed: to,
                log_start,
                committed,
                cause,
            },
            start => start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(marker: Option<&str>, next: Option<i64>) -> MasterRecord {
        MasterRecord {
            node: None,
            marker: marker.map(str::to_string),
            next,
            has_records: next.is_some(),
            of_incarnation: true,
        }
    }

    /// The table of `Start::judged`.
    #[test]
    fn bootstraps_are_judged_by_what_redis_holds() {
        let holds = |records, entities| RedisHolds { records, entities };
        let judged = |h, accept| Start::Bootstrap.judged(Some(500), h, accept);
        assert_eq!(judged(holds(true, false), false), Start::Bootstrap);
        assert_eq!(judged(holds(false, true), false), Start::Bootstrap);
        assert_eq!(
            judged(holds(false, false), false),
            Start::Ambiguous { committed: 500 }
        );
        assert_eq!(judged(holds(false, false), true), Start::Bootstrap);
        assert_eq!(
            Start::Bootstrap.judged(Some(0), holds(false, false), false),
            Start::Bootstrap,
            "nothing before offset 0"
        );
        assert_eq!(
            Start::Committed.judged(None, holds(false, false), false),
            Start::Committed
        );
        let rewind = Start::Rewind {
            to: 0,
            committed: 500,
            cause: Cause::Lost,
        };
        assert_eq!(
            rewind.clone().judged(Some(500), holds(false, false), false),
            rewind
        );
    }

    #[test]
    fn metadata_round_trips_and_foreign_metadata_is_no_epoch() {
        assert_eq!(metadata_epoch(&commit_metadata("ab12")), Some("ab12"));
        assert_eq!(metadata_epoch(""), None);
        assert_eq!(metadata_epoch("idem.v1 epoch="), None);
        assert_eq!(metadata_epoch("something else"), None);
    }

    /// The table of `decide`, row by row.
    #[test]
    fn starts_by_table() {
        let e = commit_metadata("E");
        let at = |c: i64| Some((c, e.as_str()));
        let ok = rec(Some("E"), Some(500));
        assert_eq!(decide(None, &[rec(None, None)]), Start::Committed);
        assert_eq!(
            decide(Some((500, "")), &[rec(None, None)]),
            Start::Bootstrap
        );
        assert_eq!(decide(at(500), std::slice::from_ref(&ok)), Start::Committed);
        assert_eq!(
            decide(at(400), &[rec(Some("E"), Some(900))]),
            Start::Committed,
            "Redis ahead of the commit: the commit is where to go on"
        );
        assert_eq!(
            decide(at(500), &[ok.clone(), rec(Some("E"), Some(300))]),
            Start::Rewind {
                to: 300,
                committed: 500,
                cause: Cause::RolledBack
            },
            "one master behind rewinds the partition to it"
        );
        assert_eq!(
            decide(at(500), &[ok.clone(), rec(Some("E"), None)]),
            Start::Committed,
            "no records at all where the marker is intact: no opinion (a moved anchor)"
        );
        let mut others = rec(Some("E"), None);
        others.has_records = true;
        assert_eq!(
            decide(at(500), &[ok.clone(), others]),
            Start::Rewind {
                to: 0,
                committed: 500,
                cause: Cause::RolledBack
            },
            "no record among others: written after the state Redis went back to"
        );
        for marker in [None, Some("F")] {
            assert_eq!(
                decide(at(500), &[ok.clone(), rec(marker, None)]),
                Start::Rewind {
                    to: 0,
                    committed: 500,
                    cause: Cause::Lost
                },
                "marker {marker:?}: that server lost everything"
            );
        }
        assert_eq!(
            decide(at(500), &[rec(None, None)]).within_log(200),
            Start::Refuse {
                needed: 0,
                log_start: 200,
                committed: 500,
                cause: Cause::Lost
            }
        );
        assert_eq!(
            decide(at(500), &[rec(Some("E"), Some(300))]).within_log(200),
            Start::Rewind {
                to: 300,
                committed: 500,
                cause: Cause::RolledBack
            },
            "the log still holds what is needed"
        );
    }
}
