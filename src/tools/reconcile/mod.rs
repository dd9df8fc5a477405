//! `idem reconcile`: does Redis still agree with the log?
//!
//! Reads a topic from its start with a throwaway consumer (never the live
//! group), computes every entity's expected final state with the same rules
//! as the guard (`crate::model`), and compares with Redis.
//!
//! The comparison assumes the topic still holds every event of the entities
//! it mentions (retention): an entity whose early events were deleted by
//! retention shows up as "state differs" or "seq ahead".
//!
//! Guarantee: the expectation is deterministic and is one the live pipeline
//! could have produced. An entity's events in one partition are applied in
//! their offset order, as idem applies them, whatever order the partitions
//! are read in. An entity whose events span partitions has no such order
//! (idem may interleave them any way): it is reported as `spans_partitions`
//! and repaired only with `repair_spanning`, toward its events applied in
//! seq order. The dedupe window is modelled from the records' timestamps;
//! where a decision falls between one and two windows (Redis may or may not
//! still remember the id) a difference is reported as `window_ambiguous`,
//! not as a divergence, and not repaired.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::config::Config;
use crate::model::{EntityModel, Model};
use crate::store::{self, EntityView, KeyLayout, StoreError};

mod bookkeeping;
mod effects;
mod log;
mod report;
mod writers;

use bookkeeping::BookkeepingCheck;
use effects::EffectsCheck;
use log::{read_logs, seq_ordered_model, LogModels};
use report::{field_differences, not_repaired_reason};
pub use report::{FieldDifference, RepairAsked};

const REPAIR: &str = include_str!("repair.lua");

/// How Redis differs from the log for one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceKind {
    /// The log has the entity; Redis has nothing.
    MissingEntity,
    /// Redis's seq is older than the log's newest applied event.
    SeqBehind,
    /// Redis's seq is newer than anything in the log.
    SeqAhead,
    /// Same seq, different state (or tombstone).
    StateDiffers,
    /// Redis has an entity the log never mentions.
    EntityNotInLog,
    /// The entity's events are in several partitions: no single expected
    /// state (informational, not a divergence; see the module doc).
    SpansPartitions,
    /// Redis differs, but the model's decision depended on whether Redis
    /// still remembered a reused id (one to two windows): undecidable from
    /// the log alone (informational, not a divergence).
    WindowAmbiguous,
    /// State and seq agree, but counters, a ledger or a set differ from what
    /// the log's events make them (docs/effects.md). Not repaired: rebuild
    /// beside the live view (docs/operations.md).
    EffectsDiffer,
    /// An offset mark of the topic lies past the entity's last record in
    /// its partition: the log lost records idem decided (an unclean leader
    /// election), and records at those offsets since would be taken as
    /// re-reads. Not repaired (docs/guarantees.md, offsets reused in place).
    OffsetMarkAhead,
    /// State and seq agree, but the dense-seq record (mark, seqs waiting
    /// above it, closed gaps) is not what the log's seqs make it.
    /// Informational (expected where the topic was declared dense late, or
    /// retention removed early seqs); not repaired.
    DenseSeqsDiffer,
    /// State and seq agree, but per-field order's field seqs are not what
    /// the log's events make them. Informational (expected where the mode
    /// was switched); not repaired.
    FieldSeqsDiffer,
}

impl DivergenceKind {
    /// Whether this kind says Redis is wrong (exit 1), rather than that the
    /// log cannot say what is right.
    pub fn is_divergence(self) -> bool {
        !matches!(
            self,
            DivergenceKind::SpansPartitions
                | DivergenceKind::WindowAmbiguous
                | DivergenceKind::DenseSeqsDiffer
                | DivergenceKind::FieldSeqsDiffer
        )
    }
}

/// One diverged entity.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub entity: String,
    pub kind: DivergenceKind,
    pub redis_seq: Option<u64>,
    pub log_seq: Option<u64>,
    /// Each state field Redis holds otherwise than the log makes it.
    pub fields: Vec<FieldDifference>,
    /// Whether --repair rewrote it.
    pub repaired: bool,
    /// Why not, for a divergence that was not repaired.
    pub not_repaired: Option<&'static str>,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    /// The topics read, comma-separated: every entity they name was compared.
    pub topic: String,
    /// Why entities that no topic read names were not judged (other topics
    /// write the prefix); `None`: they were (`entity_not_in_log`).
    pub extras_not_judged: Option<String>,
    pub key_prefix: String,
    pub records_read: u64,
    pub invalid_records: u64,
    pub entities_in_log: usize,
    pub by_kind: BTreeMap<DivergenceKind, usize>,
    pub divergences: Vec<Divergence>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.divergences
            .iter()
            .all(|d| d.repaired || !d.kind.is_divergence())
    }

    /// Diverged entities (not counting the informational kinds).
    pub fn divergence_count(&self) -> usize {
        self.divergences
            .iter()
            .filter(|d| d.kind.is_divergence())
            .count()
    }
}

/// Compares one entity.
///
/// | Redis                    | log (model)            | result          |
/// |--------------------------|------------------------|-----------------|
/// | nothing                  | seq 5                  | missing_entity  |
/// | seq 3                    | seq 5                  | seq_behind      |
/// | seq 7                    | seq 5                  | seq_ahead       |
/// | seq 5, other state       | seq 5                  | state_differs   |
/// | seq 5, same state        | seq 5                  | none            |
pub fn compare(model: &EntityModel, view: &EntityView) -> Option<DivergenceKind> {
    if !view.exists {
        return Some(DivergenceKind::MissingEntity);
    }
    match (view.seq, model.seq) {
        (Some(r), Some(l)) if r < l => Some(DivergenceKind::SeqBehind),
        (None, Some(_)) => Some(DivergenceKind::SeqBehind),
        (Some(r), Some(l)) if r > l => Some(DivergenceKind::SeqAhead),
        _ if view.state != model.state || view.deleted != model.deleted => {
            Some(DivergenceKind::StateDiffers)
        }
        _ => None,
    }
}

/// What to report for one entity, given whether its events span
/// partitions (with no seq-order expectation for it), what the model
/// expects, the other window branch's expectation (only when a decision was
/// ambiguous) and what Redis holds.
///
/// | spans partitions | Redis vs model | Redis vs the other branch | report |
/// |------------------|----------------|---------------------------|--------|
/// | yes              | any            | any                       | spans_partitions |
/// | no               | same           | –                         | nothing |
/// | no               | differs: kind  | same                      | window_ambiguous |
/// | no               | differs: kind  | differs, or no other branch | kind |
pub fn judge(
    spanning: bool,
    want: &EntityModel,
    other_branch: Option<&EntityModel>,
    view: &EntityView,
) -> Option<DivergenceKind> {
    if spanning {
        return Some(DivergenceKind::SpansPartitions);
    }
    let kind = compare(want, view)?;
    match other_branch {
        Some(other) if compare(other, view).is_none() => Some(DivergenceKind::WindowAmbiguous),
        _ => Some(kind),
    }
}

/// Options of one reconcile run.
pub struct ReconcileOptions {
    /// The topics read (`--topic`, repeated; by default `kafka.topics`):
    /// every entity their records name is compared.
    pub topics: Vec<String>,
    /// Rewrite missing, behind and differing entities (never lowering a seq).
    pub repair: bool,
    /// With `repair`: also delete entities that are not in the log.
    pub delete_extra: bool,
    /// With `repair`: also rewrite entities whose events span partitions,
    /// toward their events applied in seq order.
    pub repair_spanning: bool,
}

impl ReconcileOptions {
    fn asked(&self) -> RepairAsked {
        RepairAsked {
            repair: self.repair,
            delete_extra: self.delete_extra,
        }
    }
}

/// Runs a reconcile; `progress` gets human-readable progress lines.
pub async fn reconcile(
    config: &Config,
    opts: &ReconcileOptions,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> anyhow::Result<ReconcileReport> {
    let progress = std::sync::Arc::new(progress);
    let mut conn = store::connect_or_explain(&config.redis).await?;
    let layout = KeyLayout::new(&config.redis.key_prefix);
    let extras_not_judged = writers::unread_or_refuse(&mut conn, &layout, config, opts).await?;
    // Entities changed from here on may come from records the read misses.
    let read_started_ms = crate::relay::members::redis_now_ms(&mut conn).await?;
    let p = progress.clone();
    let log = read_logs(config, &opts.topics, move |n| {
        p(format!("read {n} records"))
    })
    .await?;
    progress(format!(
        "read {} records of {} ({} invalid), {} entities ({} with events in several partitions or topics); comparing with Redis",
        log.read,
        opts.topics.join(", "),
        log.invalid,
        log.model.entities.len(),
        log.spanning.len()
    ));
    // Spanning entities: with repair_spanning, their expectation is their
    // events in seq order (a second read, of those entities only).
    let seq_ordered = if opts.repair && opts.repair_spanning && !log.spanning.is_empty() {
        Some(seq_ordered_model(config, &opts.topics, &log.spanning).await?)
    } else {
        None
    };
    let checks = checks_of(config, opts, &log, &*progress).await;
    let mut divergences = compare_with_redis(
        &mut conn,
        &layout,
        &log,
        seq_ordered.as_ref(),
        opts,
        &checks,
        &*progress,
    )
    .await?;
    match &extras_not_judged {
        None => {
            let in_log: BTreeSet<&String> = log.model.entities.keys().collect();
            let extras = not_in_log(
                &mut conn,
                &layout,
                &in_log,
                read_started_ms,
                opts,
                &*progress,
            )
            .await?;
            divergences.extend(extras);
        }
        Some(why) => progress(format!(
            "entities no topic read names are not judged (entity_not_in_log): {why}"
        )),
    }
    Ok(ReconcileReport {
        topic: opts.topics.join(","),
        extras_not_judged,
        key_prefix: config.redis.key_prefix.clone(),
        records_read: log.read,
        invalid_records: log.invalid,
        entities_in_log: log.model.entities.len(),
        by_kind: count_by_kind(&divergences),
        divergences,
    })
}

/// Each topic's checks beyond state and seq: its effects, its dense and
/// offset-mark bookkeeping (by its id as the brokers say it is now).
async fn checks_of(
    config: &Config,
    opts: &ReconcileOptions,
    log: &LogModels,
    progress: &(dyn Fn(String) + Send + Sync),
) -> HashMap<String, Checks> {
    let mut checks = HashMap::new();
    for topic in &opts.topics {
        let topic_id = match crate::kafka::topic_ids::topic_id_of(&config.kafka, topic).await {
            Ok(id) => id,
            Err(e) => {
                progress(format!(
                    "could not read the id of {topic} ({e}): its offset marks not compared"
                ));
                None
            }
        };
        let spans = log.spans.get(topic).cloned().unwrap_or_default();
        let policy = config.policy(topic);
        checks.insert(
            topic.clone(),
            Checks {
                effects: EffectsCheck::of(config, &policy),
                bookkeeping: BookkeepingCheck::of(&policy, topic_id.as_ref(), spans),
            },
        );
    }
    checks
}

fn count_by_kind(divergences: &[Divergence]) -> BTreeMap<DivergenceKind, usize> {
    let mut by_kind = BTreeMap::new();
    for d in divergences {
        *by_kind.entry(d.kind).or_insert(0) += 1;
    }
    by_kind
}

/// What is compared beyond the state and the seq.
struct Checks {
    effects: Option<EffectsCheck>,
    bookkeeping: BookkeepingCheck,
}

/// Each entity of the log against what Redis holds: the divergences found,
/// repaired where `opts.repair` says so.
async fn compare_with_redis(
    conn: &mut store::RedisConn,
    layout: &KeyLayout,
    log: &LogModels,
    seq_ordered: Option<&Model>,
    opts: &ReconcileOptions,
    checks: &HashMap<String, Checks>,
    progress: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<Vec<Divergence>> {
    let mut divergences = Vec::new();
    for (i, (entity, want)) in log.model.entities.iter().enumerate() {
        let Some(checks) = log.home(entity).and_then(|t| checks.get(t)) else {
            continue;
        };
        let view = store::read_entity(conn, layout, entity).await?;
        let is_spanning = log.spanning.contains(entity);
        let reordered = seq_ordered
            .filter(|_| is_spanning)
            .and_then(|m| m.entities.get(entity));
        let want = reordered.unwrap_or(want);
        let kept = log
            .kept
            .entities
            .get(entity)
            .filter(|_| want.window_ambiguous);
        let found = judge(is_spanning && reordered.is_none(), want, kept, &view);
        let found = match (found, &checks.effects) {
            (None, Some(check)) => check.judge(conn, layout, entity, want, kept).await?,
            (found, _) => found,
        };
        let found = match found {
            None => {
                let last = log.last_offsets.get(entity);
                checks
                    .bookkeeping
                    .judge(conn, layout, &view, want, kept, last)
                    .await?
            }
            found => found,
        };
        if let Some(kind) = found {
            let mut repaired = false;
            let repairable = !matches!(
                kind,
                DivergenceKind::SeqAhead
                    | DivergenceKind::EffectsDiffer
                    | DivergenceKind::OffsetMarkAhead
                    | DivergenceKind::DenseSeqsDiffer
                    | DivergenceKind::FieldSeqsDiffer
            );
            if opts.repair && kind.is_divergence() && repairable {
                repaired = repair(conn, layout, entity, want).await?;
            }
            divergences.push(Divergence {
                entity: entity.clone(),
                kind,
                redis_seq: view.seq,
                log_seq: want.seq,
                fields: field_differences(&want.state, want.deleted, &view.state, view.deleted),
                repaired,
                not_repaired: not_repaired_reason(kind, opts.asked(), repaired),
            });
        }
        if (i + 1) % 10_000 == 0 {
            progress(format!(
                "compared {} / {} entities",
                i + 1,
                log.model.entities.len()
            ));
        }
    }
    Ok(divergences)
}

/// Entities in Redis that no record of the log mentions; deleted with
/// `repair` and `delete_extra`.
async fn not_in_log(
    conn: &mut store::RedisConn,
    layout: &KeyLayout,
    in_log: &BTreeSet<&String>,
    read_started_ms: u64,
    opts: &ReconcileOptions,
    progress: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<Vec<Divergence>> {
    let mut divergences = Vec::new();
    let mut newer = 0;
    for entity in conn.entities(layout).await? {
        if !in_log.contains(&entity) {
            let view = store::read_entity(conn, layout, &entity).await?;
            // Written since the read began: by records the read did not reach.
            if view.updated_ms.is_some_and(|t| t >= read_started_ms) {
                newer += 1;
                continue;
            }
            let mut repaired = false;
            if opts.repair && opts.delete_extra {
                let keys = layout.entity(&entity);
                let _: i64 = redis::cmd("DEL")
                    .arg(keys.state())
                    .arg(keys.meta())
                    .query_async(conn)
                    .await?;
                repaired = true;
            }
            let kind = DivergenceKind::EntityNotInLog;
            divergences.push(Divergence {
                entity,
                kind,
                redis_seq: view.seq,
                log_seq: None,
                fields: field_differences(&BTreeMap::new(), false, &view.state, view.deleted),
                repaired,
                not_repaired: not_repaired_reason(kind, opts.asked(), repaired),
            });
        }
    }
    if newer > 0 {
        progress(format!(
            "{newer} entities no record read names were written after the read began (by newer records): not judged"
        ));
    }
    Ok(divergences)
}

async fn repair(
    conn: &mut crate::store::RedisConn,
    layout: &KeyLayout,
    entity: &str,
    want: &EntityModel,
) -> Result<bool, StoreError> {
    let script = redis::Script::new(REPAIR);
    let keys = layout.entity(entity);
    let mut inv = script.key(keys.meta());
    inv.key(keys.state());
    inv.arg(want.seq.unwrap_or(0))
        .arg(want.last_id.clone().unwrap_or_default())
        .arg(want.applied)
        .arg(if want.deleted { "1" } else { "0" })
        .arg(want.state.len());
    for (k, v) in &want.state {
        inv.arg(k).arg(v);
    }
    inv.arg(
        want.fingerprint
            .map_or(String::new(), |f| format!("{f:016x}")),
    );
    let written: i64 = inv.invoke_async(conn).await?;
    Ok(written == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(exists: bool, seq: Option<u64>, state: &[(&str, &str)]) -> EntityView {
        EntityView {
            entity: "e".into(),
            exists,
            deleted: false,
            seq,
            last_id: None,
            fingerprint: None,
            applied: 0,
            updated_ms: None,
            state: state
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            offset_marks: BTreeMap::new(),
            dense_seqs: BTreeMap::new(),
        }
    }

    #[test]
    fn compare_by_table() {
        let model = EntityModel {
            seq: Some(5),
            state: [("a".to_string(), "1".to_string())].into(),
            ..EntityModel::default()
        };
        use DivergenceKind::*;
        assert_eq!(
            compare(&model, &view(false, None, &[])),
            Some(MissingEntity)
        );
        assert_eq!(
            compare(&model, &view(true, Some(3), &[("a", "1")])),
            Some(SeqBehind)
        );
        assert_eq!(
            compare(&model, &view(true, Some(7), &[("a", "1")])),
            Some(SeqAhead)
        );
        assert_eq!(
            compare(&model, &view(true, Some(5), &[("a", "2")])),
            Some(StateDiffers)
        );
        assert_eq!(compare(&model, &view(true, Some(5), &[("a", "1")])), None);
    }

    /// The truth table of `judge`.
    #[test]
    fn judge_by_table() {
        use DivergenceKind::*;
        let model = |seq: u64, ambiguous: bool| EntityModel {
            seq: Some(seq),
            state: [("a".to_string(), "1".to_string())].into(),
            window_ambiguous: ambiguous,
            ..EntityModel::default()
        };
        let redis = view(true, Some(5), &[("a", "1")]);
        assert_eq!(
            judge(true, &model(5, false), None, &redis),
            Some(SpansPartitions)
        );
        assert_eq!(judge(false, &model(5, false), None, &redis), None);
        // Redis matches the other branch of an ambiguous window decision.
        assert_eq!(
            judge(false, &model(4, true), Some(&model(5, true)), &redis),
            Some(WindowAmbiguous)
        );
        // Matches neither branch: a real divergence, never hidden.
        assert_eq!(
            judge(false, &model(4, true), Some(&model(3, true)), &redis),
            Some(SeqAhead)
        );
        assert_eq!(
            judge(false, &model(6, false), None, &redis),
            Some(SeqBehind)
        );
    }
}
