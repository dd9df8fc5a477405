//! A periodic one-line summary of outcomes for the log.

use std::time::{Duration, Instant};

use crate::model::Outcome;

/// Outcome counts since start, logged by the guard stage every
/// [`Summary::EVERY`] while anything happened: the first batch's outcomes
/// are logged at most that long after it, even if no batch follows; an idle
/// instance logs nothing more.
pub(crate) struct Summary {
    counts: [u64; Outcome::ALL.len()],
    /// The counts last logged.
    logged: [u64; Outcome::ALL.len()],
    last_log: Instant,
}

impl Summary {
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Summary {
            counts: [0; Outcome::ALL.len()],
            logged: [0; Outcome::ALL.len()],
            last_log: Instant::now(),
        }
    }

    pub(crate) fn add(&mut self, outcome: Outcome, n: u64) {
        self.counts[outcome as usize] += n;
    }

    /// Whether a line is due at `now`: the interval passed and something
    /// happened since the last line.
    fn due(&self, now: Instant) -> bool {
        now.duration_since(self.last_log) >= Self::EVERY && self.counts != self.logged
    }

    /// Logs if a line is due; called after each batch and while idle.
    pub(crate) fn maybe_log(&mut self) {
        if self.due(Instant::now()) {
            self.log();
        }
    }

    /// Logs the counts now (at a stop, whatever happened).
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
        self.logged = self.counts;
        self.last_log = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line is due once the interval passed with something new, and not
    /// again while nothing happens.
    #[test]
    fn a_line_is_due_at_the_interval_while_anything_happened() {
        let mut s = Summary::new();
        let start = s.last_log;
        assert!(!s.due(start + Summary::EVERY), "nothing happened yet");
        s.add(Outcome::Applied, 3);
        assert!(!s.due(start + Duration::from_secs(1)));
        assert!(s.due(start + Summary::EVERY));
        s.log();
        let after = s.last_log;
        assert!(!s.due(after + Summary::EVERY * 3), "idle: no new line");
        s.add(Outcome::Duplicate, 1);
        assert!(s.due(after + Summary::EVERY));
    }
}
