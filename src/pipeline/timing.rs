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
    initial: Duration,
    next: Duration,
    max: Duration,
}

/// How long a run of consumption lasts before a restart after it counts as
/// a new failure, not one more of a series: it waits the initial backoff
/// again (as Kafka's clients reset their reconnect backoff once connected).
pub(crate) const HEALTHY_RUN: Duration = Duration::from_secs(60);

impl Backoff {
    pub(crate) fn new(config: &Config) -> Self {
        Backoff {
            initial: config.pipeline.retry_initial_backoff,
            next: config.pipeline.retry_initial_backoff,
            max: config.pipeline.retry_max_backoff,
        }
    }

    /// After a run that lasted `lasted`: one of [`HEALTHY_RUN`] or more
    /// starts the backoff over.
    pub(crate) fn after_run(&mut self, lasted: Duration) {
        if lasted >= HEALTHY_RUN {
            self.next = self.initial;
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Restarts in quick succession back off (100 ms, 200 ms, 400 ms, …);
    /// a restart after a healthy run waits 100 ms again, where it waited
    /// the capped backoff forever before.
    #[test]
    fn restarts_back_off_while_quick_and_start_over_after_a_healthy_run() {
        let config = Config::defaults();
        let initial = config.pipeline.retry_initial_backoff;
        let mut backoff = Backoff::new(&config);
        let mut restart_after = |lasted: Duration| {
            backoff.after_run(lasted);
            backoff.next()
        };
        let quick: Vec<Duration> = (0..3)
            .map(|_| restart_after(Duration::from_secs(1)))
            .collect();
        assert_eq!(quick, [initial, initial * 2, initial * 4]);
        assert_eq!(restart_after(HEALTHY_RUN), initial);
        assert_eq!(restart_after(Duration::from_secs(1)), initial * 2);
    }
}
