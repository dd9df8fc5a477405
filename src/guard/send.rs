//! How a batch's script calls reach a standalone Redis: a few calls per
//! pipeline, each pipeline on its way before the next is built, so Redis
//! runs the first calls while idem builds the rest.
//!
//! Their order does not matter: an entity's events are all in one call
//! (`chunk_by_entity`), and a call's effects depend only on its entity's
//! keys. A durable wait is sent after all of them answered.
//!
//! A cluster keeps one pipeline per master: there the masters' pipelines
//! already overlap, and the smaller pipelines cost more idem CPU than they
//! saved (0.89× the records/s, docs/performance.md).

use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;

use redis::{Pipeline, Value};

use crate::store::{RedisConn, StoreError};

/// Script calls per pipeline.
pub const CALLS_PER_SEND: usize = 4;

/// Sends `calls`, built as they are taken, in pipelines of
/// [`CALLS_PER_SEND`]. The replies in call order, or the first error, a
/// NOSCRIPT one before any other: it is the one a resend of every call mends.
pub async fn send_as_built(
    conn: &RedisConn,
    calls: Box<dyn Iterator<Item = redis::Cmd> + Send + '_>,
) -> Result<Vec<Value>, StoreError> {
    // (Boxed: with a generic iterator of closures over borrowed inputs,
    // rustc cannot prove the guard stage's future `Send`.)
    let mut calls = calls.peekable();
    let mut sent = Vec::new();
    while calls.peek().is_some() {
        let mut pipe = redis::pipe();
        for call in calls.by_ref().take(CALLS_PER_SEND) {
            pipe.add_command(call);
        }
        let mut conn = conn.clone();
        let reply = Box::pin(async move { conn.pipeline_on(&None, &pipe).await });
        let mut reply = futures_util::future::maybe_done(reply);
        // Polled once: the connection has the pipeline before the next is built.
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut reply).poll(cx);
            Poll::Ready(())
        })
        .await;
        sent.push(reply);
        // The connection's writer was woken on this thread, and tokio runs
        // it here only after this task: let it write now.
        tokio::task::yield_now().await;
    }
    let mut replies = Vec::new();
    let mut failed: Option<StoreError> = None;
    for mut reply in sent {
        (&mut reply).await;
        match Pin::new(&mut reply).take_output() {
            Some(Ok(r)) => replies.extend(r),
            Some(Err(e)) if failed.is_none() || is_noscript(&e) => failed = Some(e),
            _ => {}
        }
    }
    failed.map_or(Ok(replies), Err)
}

/// Whether Redis answered that it does not know the script (restarted,
/// flushed, or a cluster node that has not seen it yet).
pub fn is_noscript(e: &StoreError) -> bool {
    matches!(e, StoreError::Redis(e) if e.kind() == redis::ErrorKind::NoScriptError)
}

/// After a batch's calls all answered: a barrier write and the
/// wait. The barrier makes the wait cover every write before it, on any
/// connection (a batch of duplicates writes nothing itself). The wait's reply.
pub async fn durable_wait(
    conn: &mut RedisConn,
    barrier: &str,
    wait: redis::Cmd,
) -> Result<Value, StoreError> {
    let mut pipe: Pipeline = redis::pipe();
    pipe.cmd("INCR").arg(barrier).ignore();
    pipe.add_command(wait);
    let mut replies = conn.pipeline_on(&None, &pipe).await?;
    Ok(replies.pop().unwrap_or(Value::Nil))
}
