//! Reading the logs a reconcile compares with: every topic that writes the
//! key prefix, each event under its own topic's window and effects.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::config::Config;
use crate::event::decode_keyed;
use crate::model::Model;
use crate::tools::topic_reader::read_topic;

/// What the logs say: the model under both readings of an ambiguous window
/// decision, the entities whose events span partitions (or topics), records
/// read and invalid ones.
pub(super) struct LogModels {
    /// An id reused between one and two windows taken as forgotten.
    pub model: Model,
    /// The same id taken as still remembered (see `Model::apply_at`).
    pub kept: Model,
    /// Entities whose events are in several partitions or topics: no single
    /// order (idem may interleave them any way).
    pub spanning: BTreeSet<String>,
    /// Entity → the topics whose records name it, the first one first (its
    /// home: the one its offsets and bookkeeping are judged by).
    pub topics_of: HashMap<String, Vec<String>>,
    /// Entity → partition → offset of its last record there, in its home topic.
    pub last_offsets: HashMap<String, BTreeMap<i32, i64>>,
    /// Topic → partition → offsets of the first and the last record read.
    pub spans: HashMap<String, HashMap<i32, (i64, i64)>>,
    pub read: u64,
    pub invalid: u64,
}

impl LogModels {
    /// The topic `entity` is judged by: the first that names it.
    pub fn home(&self, entity: &str) -> Option<&str> {
        self.topics_of
            .get(entity)
            .and_then(|ts| ts.first())
            .map(String::as_str)
    }
}

/// Reads every topic of `topics` once, in turn, and builds both models.
pub(super) async fn read_logs(
    config: &Config,
    topics: &[String],
    progress: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<LogModels> {
    let (config, topics) = (config.clone(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut log = LogModels {
            model: Model::default(),
            kept: Model::default(),
            spanning: BTreeSet::new(),
            topics_of: HashMap::new(),
            last_offsets: HashMap::new(),
            spans: HashMap::new(),
            read: 0,
            invalid: 0,
        };
        let mut first_partition: HashMap<String, (String, i32)> = HashMap::new();
        for topic in &topics {
            let policy = config.policy(topic);
            let mut spans_here: HashMap<i32, (i64, i64)> = HashMap::new();
            let before = log.read;
            let read = read_topic(
                &config.kafka,
                topic,
                |r| {
                    let span = spans_here
                        .entry(r.partition)
                        .or_insert((r.offset, r.offset));
                    *span = (span.0.min(r.offset), span.1.max(r.offset));
                    let decoded = decode_keyed(
                        r.key.as_deref(),
                        r.value.as_deref(),
                        &r.header_refs(),
                        &config.event,
                    )
                    .0
                    .and_then(|e| {
                        let planned = policy.plan(&e)?;
                        Ok((e, planned))
                    });
                    let Ok((e, planned)) = decoded else {
                        log.invalid += 1;
                        return;
                    };
                    let here = (topic.clone(), r.partition);
                    let first = first_partition
                        .entry(e.entity.clone())
                        .or_insert_with(|| here.clone());
                    if *first != here {
                        log.spanning.insert(e.entity.clone());
                    }
                    let topics_of = log.topics_of.entry(e.entity.clone()).or_default();
                    if !topics_of.contains(topic) {
                        topics_of.push(topic.clone());
                    }
                    if first.0 == *topic {
                        log.last_offsets
                            .entry(e.entity.clone())
                            .or_default()
                            .insert(r.partition, r.offset);
                    }
                    let at = r.timestamp_ms.unwrap_or(0);
                    log.model.apply_at(&e, &planned, &policy, at, false);
                    log.kept.apply_at(&e, &planned, &policy, at, true);
                },
                |n| progress(before + n),
            )?;
            log.read += read;
            log.spans.insert(topic.clone(), spans_here);
        }
        anyhow::Ok(log)
    })
    .await?
}

/// The expectation for `entities` (whose events span partitions or
/// topics): each one's events applied in (seq, topic, partition, offset)
/// order, each under its own topic's window.
pub(super) async fn seq_ordered_model(
    config: &Config,
    topics: &[String],
    entities: &BTreeSet<String>,
) -> anyhow::Result<Model> {
    let (config, topics, entities) = (config.clone(), topics.to_vec(), entities.clone());
    tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        let policies: Vec<_> = topics.iter().map(|t| config.policy(t)).collect();
        for (t, topic) in topics.iter().enumerate() {
            read_topic(
                &config.kafka,
                topic,
                |r| {
                    let Ok(e) = decode_keyed(
                        r.key.as_deref(),
                        r.value.as_deref(),
                        &r.header_refs(),
                        &config.event,
                    )
                    .0
                    else {
                        return;
                    };
                    if let (true, Ok(planned)) =
                        (entities.contains(&e.entity), policies[t].plan(&e))
                    {
                        let at = r.timestamp_ms.unwrap_or(0);
                        events.push(((e.seq, t, r.partition, r.offset), at, e, planned));
                    }
                },
                |_| {},
            )?;
        }
        events.sort_by_key(|(order, ..)| *order);
        let mut model = Model::default();
        for ((_, t, ..), at, e, planned) in &events {
            model.apply_at(e, planned, &policies[*t], *at, false);
        }
        anyhow::Ok(model)
    })
    .await?
}
