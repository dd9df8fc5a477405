//! The relay's lease: one publisher at a time for a key prefix's outboxes
//! (docs/change-stream.md, "The relay"). A holder renews it well before
//! it expires and stops publishing `MARGIN` before its own reckoning of
//! the expiry, on its monotonic clock, so a paused holder that wakes up
//! late publishes nothing new. Nothing is lost when a lease moves: entries
//! leave the outbox only once the broker acknowledged them.

use std::time::{Duration, Instant};

use crate::store::{RedisConn, StoreError};

/// Takes the lease if it is free or already ours, and (re)sets its expiry.
const TAKE: &str = include_str!("lease_take.lua");

/// Gives the lease up if it is ours (a clean stop hands over at once).
const RELEASE: &str = include_str!("lease_release.lua");

/// How long before the lease's expiry its holder stops publishing: covers
/// the clock rates of two machines and one round's sends.
pub const MARGIN: Duration = Duration::from_secs(2);

/// One relay's view of the lease.
pub struct Lease {
    key: String,
    holder: String,
    ttl: Duration,
    /// Until when this relay may publish (`None`: it does not hold it).
    valid_until: Option<Instant>,
    renewed_at: Option<Instant>,
    take: redis::Script,
}

impl Lease {
    pub fn new(key: String, holder: String, ttl: Duration) -> Lease {
        Lease {
            key,
            holder,
            ttl,
            valid_until: None,
            renewed_at: None,
            take: redis::Script::new(TAKE),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether this relay may publish now.
    pub fn held(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    /// Whether it is time to renew (a third of the TTL after the last
    /// renewal) or to try to take it.
    pub fn due(&self, now: Instant) -> bool {
        self.renewed_at
            .is_none_or(|at| now.duration_since(at) >= self.ttl / 3)
    }

    /// Renews the lease or tries to take it; returns whether it is held.
    /// A failure to ask counts as not held.
    pub async fn renew(&mut self, conn: &mut RedisConn) -> Result<bool, StoreError> {
        let asked = Instant::now();
        let reply: Result<i64, _> = self
            .take
            .key(&self.key)
            .arg(&self.holder)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(conn)
            .await;
        self.renewed_at = Some(asked);
        match reply {
            Ok(1) => {
                self.valid_until = Some(asked + self.ttl.saturating_sub(MARGIN));
                Ok(true)
            }
            Ok(_) => {
                self.valid_until = None;
                Ok(false)
            }
            Err(e) => {
                // Keep publishing until the reckoned expiry only.
                Err(e.into())
            }
        }
    }

    /// Gives the lease up, if held.
    pub async fn release(&mut self, conn: &mut RedisConn) {
        if self.valid_until.take().is_some() {
            let _: Result<i64, _> = redis::Script::new(RELEASE)
                .key(&self.key)
                .arg(&self.holder)
                .invoke_async(conn)
                .await;
        }
    }
}

/// A name for this relay unique among the processes that share a Redis:
/// host, process and a random part (a restarted process never resumes
/// another's lease).
pub fn holder_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "idem".to_string());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{host}/{}/{:08x}", std::process::id(), h.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_due_a_third_of_its_ttl_after_a_renewal_and_held_until_the_margin() {
        let mut lease = Lease::new("k".into(), "me".into(), Duration::from_secs(9));
        let now = Instant::now();
        assert!(lease.due(now) && !lease.held(now));
        lease.renewed_at = Some(now);
        lease.valid_until = Some(now + Duration::from_secs(9) - MARGIN);
        assert!(!lease.due(now + Duration::from_secs(2)));
        assert!(lease.due(now + Duration::from_secs(3)));
        assert!(lease.held(now + Duration::from_secs(6)));
        assert!(!lease.held(now + Duration::from_secs(7)));
        assert_ne!(holder_name(), holder_name());
    }
}
