//! Time for the data path: the capped backoff of every retry, and the wall
//! clock in milliseconds (Kafka's timestamps).

use std::time::Duration;

use crate::config::Config;

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Capped exponential backoff (`pipeline.retry_initial_backoff` doubling up
/// to `pipeline.retry_max_backoff`).
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &Config) -> Self {
        Backoff {
            next: config.pipeline.retry_initial_backoff,
            max: config.pipeline.retry_max_backoff,
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}
