//! A periodic one-line summary of outcomes for the log.

use std::time::{Duration, Instant};

use crate::model::Outcome;

/// Outcome counts since start, logged every ten seconds by the guard stage.
pub(crate) struct Summary {
    counts: [u64; Outcome::ALL.len()],
    last_log: Instant,
}

impl Summary {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Summary {
            counts: [0; Outcome::ALL.len()],
            last_log: Instant::now(),
        }
    }

    pub(crate) fn add(&mut self, outcome: Outcome, n: u64) {
        self.counts[outcome as usize] += n;
    }

    pub(crate) fn maybe_log(&mut self) {
        if self.last_log.elapsed() >= Self::EVERY {
            self.log();
        }
    }

    pub(crate) fn log(&mut self) {
        let [applied, duplicate, stale, conflict, invalid, late, replayed, partial] = self.counts;
        tracing::info!(
            applied,
            duplicate,
            stale,
            conflict,
            invalid,
            late,
            replayed,
            partial,
            "outcomes since start"
        );
        self.last_log = Instant::now();
    }
}
