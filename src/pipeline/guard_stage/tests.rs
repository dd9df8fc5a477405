//! The stage driven by hand against a real Redis, reached through a proxy
//! that cuts the connection under the first guard call: the fault of a
//! Redis that drops a client mid-call, which a real server does not produce
//! on demand. These tests need Redis (`make services`); `make test-unit`
//! skips them by the `with_redis` in their names.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::consumed::{DecidedRanges, LogView, TopicId};
use crate::kafka::TopicRecord;
use crate::pipeline::consumer::Fetched;
use crate::pipeline::startup::start_guard;
use crate::pipeline::test_proxy::{proxy, redis_address, sends_command, Act};
use crate::store::KeyLayout;

const WAIT: Duration = Duration::from_secs(20);

/// Which batch each guard call carried, and whether the proxy let it through.
type CallLog = Arc<Mutex<Vec<(&'static str, bool)>>>;

/// What the proxy does to the first guard call of the first batch.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Cuts the connection without forwarding it: Redis never sees it.
    Cut,
    /// Answers it with Redis's out-of-memory refusal, as a Redis at its
    /// `maxmemory` does, without forwarding it; the connection stays.
    OutOfMemory,
}

/// A proxy to `upstream` that notes each guard call (EVALSHA) by the batch
/// its ids belong to (`first-…` or `second-…`) and does `fault` to the
/// first call of the first batch (whose pipeline is that one call).
async fn faulty_proxy(upstream: String, fault: Fault) -> (u16, CallLog) {
    let calls: CallLog = Arc::default();
    let log = calls.clone();
    let port = proxy(upstream, move |chunk| {
        let has = |needle: &[u8]| chunk.windows(needle.len()).any(|w| w == needle);
        if !sends_command(chunk, "EVALSHA") {
            return Act::Forward;
        }
        let batch = if has(b"first-") {
            "first"
        } else if has(b"second-") {
            "second"
        } else {
            return Act::Forward;
        };
        let mut calls = log.lock().unwrap();
        let fail = batch == "first" && calls.is_empty();
        calls.push((batch, !fail));
        match fault {
            Fault::Cut if fail => Act::Drop,
            Fault::OutOfMemory if fail => {
                Act::Answer(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n")
            }
            _ => Act::Forward,
        }
    })
    .await;
    (port, calls)
}

fn batch(config: &Config, records: &[(i64, &str, &str, u64, &str)]) -> Batch {
    let fetched = records
        .iter()
        .map(|(offset, id, entity, event_seq, data)| Fetched {
            tp: TopicPartition::new("stage-order", 0),
            record: TopicRecord {
                partition: 0,
                offset: *offset,
                timestamp_ms: None,
                key: Some(entity.as_bytes().to_vec()),
                value: Some(
                    format!(
                        r#"{{"id":"{id}","entity":"{entity}","seq":{event_seq},"data":{data}}}"#
                    )
                    .into_bytes(),
                ),
                headers: Vec::new(),
            },
        })
        .collect();
    let policies = crate::config::Policies::of(std::sync::Arc::new(config.clone()));
    Batch::decode(fetched, &policies, &config.event)
}

/// Ordering is load-bearing: a batch whose first guard call fails holds
/// back the next batch of its partition until its retry has landed, and
/// then both are in Redis, every effect of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_failed_batch_holds_back_the_next_until_its_retry_lands() {
    a_failed_batch_holds_back_the_next(Fault::Cut).await;
}

/// The binding rule of the offset marks (at most one unresolved Redis call
/// per partition): Redis refuses batch N out of memory while batch N+1
/// could succeed. N+1 is not sent before N's retry landed; had it been, N's
/// retry would find its records below N+1's mark and call them replayed,
/// and N's effects would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_batch_refused_out_of_memory_holds_back_the_next_until_its_retry_lands() {
    a_failed_batch_holds_back_the_next(Fault::OutOfMemory).await;
}

async fn a_failed_batch_holds_back_the_next(fault: Fault) {
    let (port, calls) = faulty_proxy(redis_address(), fault).await;
    let prefix = format!("stage-{fault:?}-{}", unix_millis());
    let mut config = Config::defaults();
    config.redis.url = format!("redis://127.0.0.1:{port}");
    config.redis.key_prefix = prefix.clone();
    config.pipeline.retry_initial_backoff = Duration::from_millis(20);
    let config = Arc::new(config);
    let (_trigger, mut shutdown) = crate::pipeline::shutdown::Shutdown::new();
    let health = Health::default();
    let (guard, redis) = start_guard(&config, &health, &mut shutdown)
        .await
        .expect("Redis answers through the proxy")
        .expect("no shutdown");
    let tp = TopicPartition::new("stage-order", 0);
    // As the assignment does: the partition's progress record starts at 0.
    let mut store = redis.store;
    store
        .record(&redis.epoch, &[(tp.clone(), 0, None)], &[])
        .await
        .unwrap();
    let progress = ProgressRecords::new(store, redis.epoch);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stage = GuardStage::new(&config, guard, progress, &health, &shutdown, events_tx)
        .expect("a dead-letter producer (it never sends here)");

    let view = LogView {
        topic_id: TopicId::from_bits(0x5747, 0x0e).unwrap(),
        decided: DecidedRanges::default(),
    };
    let (queue, queued) = crate::pipeline::link::stage_queue(2);
    queue
        .ownership(Ownership::Taken {
            floors: vec![(tp.clone(), 0)],
            logs: vec![(tp.clone(), view)],
        })
        .unwrap();
    let first = batch(
        &config,
        &[
            (0, "first-1", "acct", 1, r#"{"a":"1"}"#),
            (1, "first-2", "acct", 2, r#"{"b":"2"}"#),
        ],
    );
    // The later batch advances the same entity: were it applied before the
    // first batch's retry, the retry's events would be stale and lost.
    let second = batch(
        &config,
        &[
            (2, "second-3", "acct", 3, r#"{"c":"3"}"#),
            (3, "second-1", "other", 1, r#"{"d":"4"}"#),
        ],
    );
    queue.batch(queue.room().await, first).unwrap();
    queue.batch(queue.room().await, second).unwrap();
    let stage = tokio::spawn(stage.run(queued));

    let mut reports = Vec::new();
    while reports
        .iter()
        .filter(|r: &&String| r.starts_with('['))
        .count()
        < 2
    {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some(StageEvent::Finished(f))) => reports.push(format!(
                "{:?}",
                f.positions().map(|(_, o)| o).collect::<Vec<_>>()
            )),
            Ok(Some(StageEvent::Retrying(what))) => reports.push(format!("retrying {what:?}")),
            other => panic!("expected two finished batches, got {other:?}"),
        }
    }
    assert_eq!(
        reports,
        [
            "retrying Some(\"redis\")",
            "retrying None",
            "[0, 1]",
            "[2, 3]"
        ],
        "in order, each whole, the retry said to the loop (the cause of a blocked partition)"
    );
    assert_eq!(
        *calls.lock().unwrap(),
        vec![("first", false), ("first", true), ("second", true)],
        "the later batch's call went out only after the retry of the earlier one"
    );
    drop(queue);
    tokio::time::timeout(WAIT, stage).await.unwrap().unwrap();

    let mut direct = config.redis.clone();
    direct.url = format!("redis://{}", redis_address());
    let mut conn = crate::store::connect(&direct).await.unwrap();
    let layout = KeyLayout::new(&prefix);
    let acct = crate::store::read_entity(&mut conn, &layout, "acct")
        .await
        .unwrap();
    let field = |k: &str| acct.state.get(k).map(String::as_str);
    assert_eq!((acct.seq, acct.applied), (Some(3), 3), "{acct:?}");
    assert_eq!(
        (field("a"), field("b"), field("c")),
        (Some("1"), Some("2"), Some("3"))
    );
    assert_eq!(
        acct.offset_marks.values().collect::<Vec<_>>().len(),
        1,
        "one mark, for the one partition: {acct:?}"
    );
    assert!(
        acct.offset_marks.values().all(|m| m.ends_with(":2")),
        "{acct:?}"
    );
    let other = crate::store::read_entity(&mut conn, &layout, "other")
        .await
        .unwrap();
    assert_eq!(other.state.get("d").map(String::as_str), Some("4"));
}
