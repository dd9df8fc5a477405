//! The two baselines of the benchmark.
//!
//! (a) The naive consumer most teams write first: per record a `SET NX PX`
//!     for the id, an `HGET` of the entity's seq, an `HSET` of the state,
//!     each its own round trip, then a synchronous offset commit. (It is also
//!     not atomic: a crash between the SET and the HSET loses the effect.)
//! (b) The per-event script ceiling: idem's own guard script, one script call
//!     per event, pipelined 1,000 calls per round trip, straight into Redis
//!     with no Kafka at all.
//! (c) The guard alone: idem's own `Guard` on batches of the backlog as
//!     idem forms them (batch_max_events records, events_per_script events per call, offset
//!     marks on), no Kafka: Redis's CPU and the script's time per record
//!     without the broker, the producer or idem competing for the cores.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;

use idem::config::TopicPolicy;
use idem::event::{decode, Event, FieldMap};
use idem::guard::{Guard, GuardInput, Place};
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

/// Redis's work per record with the guard alone (baseline (c)).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GuardAlone {
    pub records: usize,
    pub records_per_second: f64,
    /// Redis's CPU, the script's time and its commands', per record.
    pub redis: super::io::RedisPerRecord,
}

/// Runs idem's guard on `values` in batches as idem forms them, each
/// record marked with its place in one of `partitions` partitions.
pub async fn guard_alone(
    redis_url: &str,
    prefix: &str,
    values: &[Vec<u8>],
    partitions: i32,
) -> anyhow::Result<GuardAlone> {
    let events = decode_all(values);
    let topic_id = idem::consumed::TopicId::from_bits(0x1de3, 7).expect("a nonzero id");
    let marks: Vec<String> = (0..partitions.max(1))
        .map(|p| idem::store::mark_field(p, &topic_id))
        .collect();
    let mut next_offset = vec![0i64; marks.len()];
    let places: Vec<(usize, i64)> = events
        .iter()
        .map(|e| {
            let p = (idem::event::id_hash(&e.entity) % marks.len() as u64) as usize;
            next_offset[p] += 1;
            (p, next_offset[p])
        })
        .collect();
    let mut info = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let pipeline = idem::config::Config::defaults().pipeline;
    let per_batch = pipeline.batch_max_events.get();
    let mut guard = loaded_guard(redis_url, prefix, pipeline.events_per_script.get()).await?;
    let policy = TopicPolicy {
        window: Duration::from_secs(86_400),
        ..TopicPolicy::default()
    };
    let before = super::io::redis_time(&mut info).await?;
    let started = Instant::now();
    for (chunk, at) in events.chunks(per_batch).zip(places.chunks(per_batch)) {
        guard.begin_batch();
        let inputs: Vec<GuardInput<'_>> = chunk
            .iter()
            .zip(at)
            .map(|(event, &(p, offset))| GuardInput {
                event,
                policy: &policy,
                effects: &idem::effects::MERGE,
                place: Some(Place {
                    mark_field: &marks[p],
                    offset,
                    run_start: 0,
                }),
            })
            .collect();
        guard.apply(&inputs).await?;
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let spent = super::io::redis_time(&mut info).await? - before;
    Ok(GuardAlone {
        records: events.len(),
        records_per_second: events.len() as f64 / elapsed,
        redis: spent.per_record(events.len() as u64),
    })
}

/// The records that decode, as idem's decoder reads them.
fn decode_all(values: &[Vec<u8>]) -> Vec<Event> {
    let fields = FieldMap::default();
    values
        .iter()
        .filter_map(|v| decode(Some(v), &fields, 1 << 20).ok())
        .collect()
}

/// idem's guard on `redis_url` under `prefix`, its epoch established and
/// its script loaded, calling the script with `events_per_script` events.
async fn loaded_guard(
    redis_url: &str,
    prefix: &str,
    events_per_script: usize,
) -> anyhow::Result<Guard> {
    let mut cfg = idem::config::RedisConfig::for_url(redis_url, Default::default());
    cfg.key_prefix = prefix.to_string();
    cfg.response_timeout = Duration::from_secs(30);
    let conn = idem::store::connect(&cfg).await?;
    let epoch = idem::store::progress::ProgressStore::new(conn.clone(), KeyLayout::new(prefix))
        .establish_epoch()
        .await?;
    let mut guard = Guard::new(conn, KeyLayout::new(prefix), events_per_script, epoch);
    guard.load_script().await?;
    Ok(guard)
}

/// Runs the guard with one event per script call over `values`; returns events/s.
pub async fn per_event_script_ceiling(
    redis_url: &str,
    prefix: &str,
    values: &[Vec<u8>],
) -> anyhow::Result<f64> {
    let events = decode_all(values);
    let mut guard = loaded_guard(redis_url, prefix, 1).await?;
    let policy = TopicPolicy {
        window: Duration::from_secs(86_400),
        ..TopicPolicy::default()
    };
    let started = Instant::now();
    for chunk in events.chunks(1000) {
        let inputs: Vec<GuardInput<'_>> = chunk
            .iter()
            .map(|event| GuardInput {
                event,
                policy: &policy,
                effects: &idem::effects::MERGE,
                place: None,
            })
            .collect();
        guard.apply(&inputs).await?;
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
