//! Start-up against a real Redis behind a proxy that holds the first
//! `INFO` it sees past the client's response timeout, then drops it: a
//! Redis that does not answer for a moment, which a real server does not do
//! on demand. Needs Redis (`make
//! services`); `make test-unit` skips it by the `with_redis` in its name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::pipeline::test_proxy::{proxy, redis_address, sends_command, Act};

/// A proxy to `upstream` that holds the first `INFO` past `hold`, then
/// drops its connection (nothing forwarded); says whether it did.
async fn proxy_holding_the_first_info(upstream: String, hold: Duration) -> (u16, Arc<AtomicBool>) {
    let held = Arc::new(AtomicBool::new(false));
    let seen = held.clone();
    let port = proxy(upstream, move |chunk| {
        if sends_command(chunk, "INFO") && !seen.swap(true, Ordering::SeqCst) {
            Act::HoldThenDrop(hold)
        } else {
            Act::Forward
        }
    })
    .await;
    (port, held)
}

/// Found from outside: a Redis that did not answer one start-up check for
/// a moment (a restart of consumption under load) ended `idem run` with
/// "INFO cluster failed: timed out". A check without an answer is tried
/// again; only an answer that Redis is unfit ends the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_check_without_an_answer_is_tried_again() {
    let mut config = Config::defaults();
    config.redis.response_timeout = Duration::from_millis(300);
    let hold = Duration::from_secs(2);
    let (port, dropped) = proxy_holding_the_first_info(redis_address(), hold).await;
    config.redis.url = format!("redis://127.0.0.1:{port}");
    config.redis.key_prefix = format!("startup-check-{}", crate::pipeline::unix_millis());
    config.pipeline.retry_initial_backoff = Duration::from_millis(20);
    let (_trigger, mut shutdown) = Shutdown::new();
    let health = crate::metrics::Health::default();
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        start_guard(&config, &health, &mut shutdown),
    )
    .await
    .expect("start-up finishes");
    assert!(dropped.load(Ordering::SeqCst), "the proxy dropped no check");
    let started = started.expect("a check without an answer does not end the start");
    assert!(started.is_some(), "no shutdown was asked for");
}
