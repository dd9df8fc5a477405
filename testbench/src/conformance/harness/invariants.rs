//! The oracle and the invariant checks (I1-I4) against what Redis and
//! Kafka hold.

use super::*;

/// The oracle: the model applied in production order.
pub fn oracle(records: &[SampleRecord]) -> Model {
    let mut model = Model::default();
    for r in records {
        if let Ok(e) = decode(Some(&r.value), &FieldMap::default(), 1 << 20) {
            model.apply(&e);
        }
    }
    model
}

pub async fn read_views(
    redis: &RedisTarget,
    prefix: &str,
    entities: impl Iterator<Item = &String>,
) -> anyhow::Result<BTreeMap<String, EntityView>> {
    let mut conn = redis.connect().await?;
    let layout = KeyLayout::new(prefix);
    let mut out = BTreeMap::new();
    for e in entities {
        out.insert(e.clone(), store::read_entity(&mut conn, &layout, e).await?);
    }
    Ok(out)
}

/// I1 and I2: (lost effects, doubled effects, a few examples) against the oracle.
pub async fn lost_and_doubled(
    redis: &RedisTarget,
    prefix: &str,
    model: &Model,
) -> anyhow::Result<(u64, u64, Vec<String>)> {
    let views = read_views(redis, prefix, model.entities.keys()).await?;
    let (mut lost, mut doubled) = (0, 0);
    let mut examples = Vec::new();
    for (name, want) in &model.entities {
        let got = &views[name];
        doubled += got.applied.saturating_sub(want.applied);
        let missing = want.applied.saturating_sub(got.applied);
        // A state that differs with equal counters is a lost (or wrong) effect too.
        let wrong_state = missing == 0
            && (got.state != want.state || got.seq != want.seq || got.deleted != want.deleted);
        lost += missing + u64::from(wrong_state);
        if (missing > 0 || wrong_state || got.applied > want.applied) && examples.len() < 3 {
            examples.push(format!(
                "{name}: redis seq {:?} applied {}, oracle seq {:?} applied {}",
                got.seq, got.applied, want.seq, want.applied
            ));
        }
    }
    Ok((lost, doubled, examples))
}

/// I4 at a quiet moment: every record below a committed offset has its effect
/// (its entity's recorded seq is at least the record's seq). Returns violations.
pub async fn commits_ahead_of_effects(
    env: &Env,
    redis: &RedisTarget,
    group: &str,
    topic: &str,
    partitions: i32,
    prefix: &str,
    positions: &Positions,
) -> anyhow::Result<u64> {
    let committed = committed(env, group, topic, partitions).await?;
    let entities: std::collections::BTreeSet<String> =
        positions.values().map(|r| r.entity.clone()).collect();
    let views = read_views(redis, prefix, entities.iter()).await?;
    let mut violations = 0;
    // Per entity, how many records the oracle applies below the commit points:
    // Redis must have applied at least that many (a seq check alone would miss
    // a committed record whose effect is lost under a later one).
    let mut must_have_applied: HashMap<&str, u64> = HashMap::new();
    for ((p, offset), r) in positions {
        if *offset < committed[*p as usize] {
            if views[&r.entity].seq.unwrap_or(0) < r.seq {
                violations += 1;
            }
            if r.applied_by_oracle {
                *must_have_applied.entry(&r.entity).or_default() += 1;
            }
        }
    }
    for (entity, need) in must_have_applied {
        violations += need.saturating_sub(views[entity].applied);
    }
    Ok(violations)
}

/// What the suite knows about one produced record.
#[derive(Debug, Clone)]
pub struct RecordFacts {
    pub entity: String,
    pub seq: u64,
    /// Whether the oracle applies it (the first sighting of a newer seq).
    pub applied_by_oracle: bool,
}

/// Produced records by (partition, offset).
pub type Positions = HashMap<(i32, i64), RecordFacts>;

/// For each record in production order: does the oracle apply it?
pub fn oracle_applies(records: &[SampleRecord]) -> Vec<bool> {
    let mut model = Model::default();
    records
        .iter()
        .map(
            |r| match decode(Some(&r.value), &FieldMap::default(), 1 << 20) {
                Ok(e) => model.apply(&e) == Outcome::Applied,
                Err(_) => false,
            },
        )
        .collect()
}

/// Where each produced record landed, with what the suite knows about it.
pub fn positions(
    records: &[SampleRecord],
    delivered: &[(i32, i64)],
    applied: &[bool],
) -> Positions {
    records
        .iter()
        .zip(delivered)
        .zip(applied)
        .filter_map(|((r, pos), applied)| {
            let e = decode(Some(&r.value), &FieldMap::default(), 1 << 20).ok()?;
            Some((
                *pos,
                RecordFacts {
                    entity: e.entity,
                    seq: e.seq,
                    applied_by_oracle: *applied,
                },
            ))
        })
        .collect()
}

/// I3 and I4 samplers: while a scenario runs, read every entity's seq and the
/// group's committed offsets; count decreases of either.
pub struct Sampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>,
}

impl Sampler {
    pub fn start(
        env: &Env,
        redis: &RedisTarget,
        prefix: &str,
        group: &str,
        topic: &str,
        partitions: i32,
        entities: Vec<String>,
    ) -> Sampler {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (env, redis, prefix, group, topic) = (
            env.clone(),
            redis.clone(),
            prefix.to_string(),
            group.to_string(),
            topic.to_string(),
        );
        let task = tokio::spawn(async move {
            let mut seqs: HashMap<String, u64> = HashMap::new();
            let mut last_committed = vec![-1i64; partitions as usize];
            let (mut seq_decreases, mut commit_decreases) = (0u64, 0u64);
            while !*stopped.borrow() {
                if let Ok(views) = read_views(&redis, &prefix, entities.iter()).await {
                    for (e, v) in views {
                        let now = v.seq.unwrap_or(0);
                        let before = seqs.entry(e).or_insert(now);
                        if now < *before {
                            seq_decreases += 1;
                        }
                        *before = now.max(*before);
                    }
                }
                if let Ok(c) = committed(&env, &group, &topic, partitions).await {
                    for (i, o) in c.iter().enumerate() {
                        // -1: no commit read (none yet, or a failed read): not a move back.
                        if *o >= 0 && *o < last_committed[i] {
                            commit_decreases += 1;
                        }
                        last_committed[i] = last_committed[i].max(*o);
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Ok((seq_decreases, commit_decreases))
        });
        Sampler { stop, task }
    }

    /// (seq decreases, committed-offset decreases) seen.
    pub async fn finish(self) -> anyhow::Result<(u64, u64)> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}
