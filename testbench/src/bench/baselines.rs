//! The two baselines of the benchmark.
//!
//! (a) The naive consumer most teams write first: per record a `SET NX PX`
//!     for the id, an `HGET` of the entity's seq, an `HSET` of the state,
//!     each its own round trip, then a synchronous offset commit. (It is also
//!     not atomic: a crash between the SET and the HSET loses the effect.)
//! (b) The per-event script ceiling: idem's own guard script, one script call
//!     per event, pipelined 1,000 calls per round trip, straight into Redis
//!     with no Kafka at all.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;

use idem::event::{decode, Event, FieldMap};
use idem::guard::{Guard, GuardInput};
use idem::store::KeyLayout;

/// Runs the naive consumer over the first `records` records of `topic`; returns records/s.
pub async fn naive_consumer(
    brokers: &str,
    redis_url: &str,
    topic: &str,
    records: usize,
) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-naive"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let prefix = format!("{topic}-naive");
    let fields = FieldMap::default();
    let mut started = None;
    for _ in 0..records {
        let m = consumer.recv().await?;
        // The clock starts at the first record: the group join is not the consumer's speed.
        started.get_or_insert_with(Instant::now);
        if let Ok(e) = decode(m.payload(), &fields, 1 << 20) {
            let id_key = format!("{prefix}:{{{}}}:id:{}", e.entity, e.id);
            let state_key = format!("{prefix}:{{{}}}:state", e.entity);
            let fresh: bool = redis::cmd("SET")
                .arg(&id_key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(86_400_000)
                .query_async::<Option<String>>(&mut conn)
                .await?
                .is_some();
            if fresh {
                let seq: Option<u64> = redis::cmd("HGET")
                    .arg(&state_key)
                    .arg("_seq")
                    .query_async(&mut conn)
                    .await?;
                if seq.is_none_or(|s| e.seq > s) {
                    let mut cmd = redis::cmd("HSET");
                    cmd.arg(&state_key).arg("_seq").arg(e.seq);
                    for (k, v) in &e.set {
                        cmd.arg(k).arg(v);
                    }
                    let _: i64 = cmd.query_async(&mut conn).await?;
                }
            }
        }
        consumer.commit_message(&m, CommitMode::Sync)?;
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    Ok(records as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Runs the guard with one event per script call over `values`; returns events/s.
pub async fn per_event_script_ceiling(
    redis_url: &str,
    prefix: &str,
    values: &[Vec<u8>],
) -> anyhow::Result<f64> {
    let fields = FieldMap::default();
    let events: Vec<Event> = values
        .iter()
        .filter_map(|v| decode(Some(v), &fields, 1 << 20).ok())
        .collect();
    let mut cfg = idem::config::RedisConfig::for_url(redis_url, Default::default());
    cfg.key_prefix = prefix.to_string();
    cfg.response_timeout = Duration::from_secs(30);
    let conn = idem::store::connect(&cfg).await?;
    let epoch = idem::store::progress::ProgressStore::new(conn.clone(), KeyLayout::new(prefix))
        .establish_epoch()
        .await?;
    let mut guard = Guard::new(conn, KeyLayout::new(prefix), 1, epoch);
    guard.load_script().await?;
    let window = Duration::from_secs(86_400);
    let started = Instant::now();
    for chunk in events.chunks(1000) {
        let inputs: Vec<GuardInput<'_>> = chunk
            .iter()
            .map(|event| GuardInput {
                event,
                window,
                effects: &idem::effects::MERGE,
                place: None,
            })
            .collect();
        guard.apply(&inputs).await?;
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
