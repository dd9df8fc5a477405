//! Tying bootstrapped commits to Redis: a commit idem did not write (an
//! older version, a plain Kafka client) is committed again with idem's
//! metadata right after the assignment, so that it names Redis's epoch:
//! until then a loss of Redis would be taken for an operator's decision
//! (`resume::decide`). librdkafka's auto commit skips a stored offset equal
//! to the committed one, so the tie is an explicit commit, sent again
//! every few seconds until Kafka acknowledges it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::kafka;
use crate::offsets::TopicPartition;
use crate::pipeline::consumer::Consumer;

/// How long a tie waits for its commit to be acknowledged before it is sent again.
const TIE_RETRY: Duration = Duration::from_secs(5);

/// Bootstrapped partitions whose commit is not yet written again with the
/// metadata, and when that was last tried.
#[derive(Default)]
pub(super) struct Untied {
    offsets: HashMap<TopicPartition, i64>,
    tried: Option<Instant>,
}

impl Untied {
    /// Partitions just bootstrapped, each with its commit.
    pub(super) fn add(&mut self, bootstraps: Vec<(TopicPartition, i64)>) {
        self.offsets.extend(bootstraps);
        self.tried = None;
    }

    /// A commit of this run (it carries the metadata) acknowledged.
    pub(super) fn acknowledged(&mut self, tp: &TopicPartition, offset: i64) {
        if self.offsets.get(tp).is_some_and(|o| offset >= *o) {
            self.offsets.remove(tp);
        }
    }

    /// Partitions revoked or lost: their new owner ties them.
    pub(super) fn release(&mut self, tps: &[TopicPartition]) {
        self.offsets.retain(|tp, _| !tps.contains(tp));
    }

    /// Whether a sent tie went unacknowledged long enough to send it again.
    pub(super) fn due(&self) -> bool {
        self.tried.is_some_and(|t| t.elapsed() >= TIE_RETRY)
    }

    /// Commits each bootstrapped partition's commit again, with `metadata`
    /// (its records were raised to it first); acknowledged later through
    /// [`Untied::acknowledged`].
    pub(super) fn tie(&mut self, consumer: &Consumer, metadata: &str) {
        if self.offsets.is_empty() {
            self.tried = None;
            return;
        }
        let offsets: Vec<(TopicPartition, i64)> = self
            .offsets
            .iter()
            .map(|(tp, o)| (tp.clone(), *o))
            .collect();
        kafka::commit_async(consumer, &offsets, metadata);
        self.tried = Some(Instant::now());
    }
}
