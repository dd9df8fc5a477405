//! librdkafka's own logging, made quiet: with a broker down it reports the
//! same failure dozens of times a second (every connection attempt, every
//! client). The consumer of `idem run` logs the first of a kind and then at
//! most one per [`REPEAT_EVERY`], saying how many it held back; the other
//! clients log at DEBUG only; statistics never reach INFO.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// How often one kind of repeated client message is logged.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// Decides which repeated messages are logged. Keys are the kind of
/// message (librdkafka's facility, or the error code), not its text, whose
/// details (a port, a counter) change from one repeat to the next.
#[derive(Debug, Default)]
pub struct LogLimiter {
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    logged_at: Instant,
    held_back: u64,
}

impl LogLimiter {
    /// `Some(n)` when a message of kind `key` seen at `now` is to be
    /// logged, `n` being how many of its kind were held back since the last
    /// one logged; `None` to hold it back.
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(key) {
            None => {
                seen.insert(
                    key.to_string(),
                    Seen {
                        logged_at: now,
                        held_back: 0,
                    },
                );
                Some(0)
            }
            Some(s) if now.duration_since(s.logged_at) >= REPEAT_EVERY => {
                let held_back = std::mem::take(&mut s.held_back);
                s.logged_at = now;
                Some(held_back)
            }
            Some(s) => {
                s.held_back += 1;
                None
            }
        }
    }

    /// librdkafka's log line, limited by facility.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let severity = level as u8;
        if severity > RDKafkaLogLevel::Warning as u8 {
            // Notice, info and debug: debug here, never INFO.
            return tracing::debug!(target: "librdkafka", facility = fac, "{message}");
        }
        let Some(held_back) = self.admit(fac, Instant::now()) else {
            return;
        };
        if severity > RDKafkaLogLevel::Error as u8 {
            tracing::warn!(target: "librdkafka", facility = fac, held_back, "{message}");
        } else {
            tracing::error!(target: "librdkafka", facility = fac, held_back, "{message}");
        }
    }

    /// A client error, limited by its code; logged at WARN, since
    /// librdkafka retries (refusals are reported by the callers).
    pub fn error(&self, error: &KafkaError, reason: &str) {
        if let Some(held_back) = self.admit(&error_kind("client", error), Instant::now()) {
            tracing::warn!(error = %error, reason, held_back, "kafka client error; librdkafka retries");
        }
    }

    /// An error `poll` returned instead of a record (with the brokers down,
    /// one every poll), limited by its code.
    pub fn consumer_error(&self, error: &KafkaError) {
        if let Some(held_back) = self.admit(&error_kind("consumer", error), Instant::now()) {
            tracing::warn!(error = %error, held_back, "kafka consumer error; continuing");
        }
    }
}

/// The kind of an error for the limiter: where it came from and its code.
fn error_kind(source: &str, error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{source}:{code:?}"),
        None => format!("{source}:{error}"),
    }
}

/// The context of idem's auxiliary clients (the dead-letter producer, the
/// tools' admin clients and readers): librdkafka's own lines and client
/// errors at DEBUG, no statistics. A tool reports a failed request itself,
/// naming the brokers and the wait; in `idem run` the consumer's context
/// already reports the same brokers' state.
#[derive(Debug, Default)]
pub struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, _: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", facility = fac, "{message}");
    }

    fn stats(&self, _: rdkafka::Statistics) {}

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for QuietContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_and_counted_by_kind() {
        let limiter = LogLimiter::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let table = [
            ("FAIL", 0, Some(0)),
            ("FAIL", 1, None),
            ("FAIL", 29, None),
            ("REQTMOUT", 29, Some(0)),
            ("FAIL", 30, Some(2)),
            ("FAIL", 31, None),
            ("FAIL", 59, None),
            ("FAIL", 60, Some(2)),
            ("FAIL", 200, Some(0)),
        ];
        for (key, second, expected) in table {
            assert_eq!(
                limiter.admit(key, at(second)),
                expected,
                "{key} at {second}s"
            );
        }
    }
}
