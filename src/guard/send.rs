//! How a batch's script calls reach a standalone Redis without a durable
//! wait: a few calls per pipeline, each pipeline handed to the connection
//! before the next is built, so Redis runs the first calls while idem
//! builds the rest.
//!
//! Their order does not matter: an entity's events are all in one call
//! (`chunk_by_entity`), and a call writes only its entities' keys. Every
//! pipeline is answered before the batch is: nothing of the next batch, and
//! no progress record, goes out while one is unresolved.
//!
//! A durable wait keeps the calls and the wait in one pipeline (one pass on
//! one connection), and a cluster one pipeline per master: there the
//! masters' pipelines already overlap, and smaller ones cost idem more than
//! they saved (0.89× the records/s, docs/performance.md).

use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;

use redis::Value;

use crate::store::{RedisConn, StoreError};

/// Script calls per pipeline.
const CALLS_PER_SEND: usize = 4;

/// Sends `calls`, built as they are taken, in pipelines of
/// [`CALLS_PER_SEND`]; the replies as [`merged`] gives them.
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
        // Polled once: normally this puts the pipeline in the connection's
        // queue. If not (a reconnect under way, a full queue), it goes out
        // when awaited below, which is as correct, only later.
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut reply).poll(cx);
            Poll::Ready(())
        })
        .await;
        sent.push(reply);
        if calls.peek().is_some() {
            // The connection's writer was woken on this thread, and tokio
            // runs it only once this task yields: let it write before the
            // next pipeline is built.
            tokio::task::yield_now().await;
        }
    }
    let mut answers = Vec::with_capacity(sent.len());
    for mut reply in sent {
        (&mut reply).await;
        answers.extend(Pin::new(&mut reply).take_output());
    }
    merged(answers)
}

/// The pipelines' answers, in order, as one: every reply in call order, or
/// the first error, a NOSCRIPT one before any other (it is the one error a
/// resend of every call mends).
fn merged(answers: Vec<Result<Vec<Value>, StoreError>>) -> Result<Vec<Value>, StoreError> {
    let mut replies = Vec::new();
    let mut failed: Option<StoreError> = None;
    for answer in answers {
        match answer {
            Ok(r) => replies.extend(r),
            Err(e)
                if failed
                    .as_ref()
                    .is_none_or(|f| !is_noscript(f) && is_noscript(&e)) =>
            {
                failed = Some(e)
            }
            Err(_) => {}
        }
    }
    failed.map_or(Ok(replies), Err)
}

/// Whether Redis answered that it does not know the script (restarted,
/// flushed, or a cluster node that has not seen it yet).
pub fn is_noscript(e: &StoreError) -> bool {
    matches!(e, StoreError::Redis(e) if e.kind() == redis::ErrorKind::NoScriptError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: &'static str) -> StoreError {
        let kind = match code {
            "NOSCRIPT" => redis::ErrorKind::NoScriptError,
            _ => redis::ErrorKind::ResponseError,
        };
        StoreError::Redis(redis::RedisError::from((kind, code)))
    }

    fn outcome(answers: Vec<Result<Vec<Value>, StoreError>>) -> String {
        match merged(answers) {
            Ok(replies) => format!("{replies:?}"),
            Err(e) if is_noscript(&e) => "NOSCRIPT".into(),
            Err(e) => format!("{e}"),
        }
    }

    /// | answers             | merged          |
    /// |---------------------|-----------------|
    /// | [1, 2], [3]         | [1, 2, 3]       |
    /// | ok, NOSCRIPT        | NOSCRIPT        |
    /// | OOM, NOSCRIPT       | NOSCRIPT        |
    /// | NOSCRIPT, OOM       | NOSCRIPT        |
    /// | OOM, BUSY           | OOM (the first) |
    #[test]
    fn the_first_error_wins_unless_a_later_one_is_noscript() {
        let ok = |v: &[i64]| Ok(v.iter().map(|&i| Value::Int(i)).collect());
        assert_eq!(
            outcome(vec![ok(&[1, 2]), ok(&[3])]),
            "[int(1), int(2), int(3)]"
        );
        assert_eq!(
            outcome(vec![ok(&[1]), Err(refusal("NOSCRIPT"))]),
            "NOSCRIPT"
        );
        assert_eq!(
            outcome(vec![Err(refusal("OOM")), Err(refusal("NOSCRIPT"))]),
            "NOSCRIPT"
        );
        assert_eq!(
            outcome(vec![Err(refusal("NOSCRIPT")), Err(refusal("OOM"))]),
            "NOSCRIPT"
        );
        let first = outcome(vec![Err(refusal("OOM")), Err(refusal("BUSY"))]);
        assert!(first.contains("OOM"), "{first}");
    }
}
