//! The guard stage's runs of consumption, one per owned partition whose
//! topic has an id: where each run began, what it claims after each batch,
//! and each record's place for its entity's offset mark
//! (`crate::consumed` holds the rule and why it is sound). Pure: batches
//! in, places and claims out.
//!
//! Guarantee: a run begins at the first record of the first batch fetched
//! after the partition was taken, and only goes forward; a batch whose
//! offsets go back (below the run, or within the batch) means the log was
//! read from an earlier offset without a new assignment (librdkafka's
//! reset on a log that was truncated or created again): it is reported,
//! never placed. A batch fetched under an earlier assignment of the
//! partition reaches the stage before that assignment's release (one
//! ordered queue, `super::link`): it belongs to the earlier run.

use std::collections::HashMap;

use super::batch::{Batch, Item};
use crate::consumed::{LogView, Run};
use crate::guard::Place;
use crate::offsets::TopicPartition;
use crate::store::mark_field;
use crate::store::progress::Claim;

/// One owned partition's log and its current run.
#[derive(Debug)]
struct PartitionRun {
    view: LogView,
    mark_field: String,
    run: Option<Run>,
}

/// The runs of the partitions the stage owns.
#[derive(Debug, Default)]
pub struct Runs {
    partitions: HashMap<TopicPartition, PartitionRun>,
}

/// Where the records of a batch sit in their runs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Per partition of the batch (by index): its mark field and its run's
    /// start; `None` where the topic has no id.
    partitions: Vec<Option<(String, i64)>>,
    /// Per record of the batch: in a decided range (`replayed`, without
    /// asking Redis).
    pub decided: Vec<bool>,
}

impl Placed {
    /// The place of `item` for its entity's offset mark.
    pub fn place(&self, item: &Item) -> Option<Place<'_>> {
        let (field, run_start) = self.partitions[item.partition_index].as_ref()?;
        Some(Place {
            mark_field: field,
            offset: item.offset,
            run_start: *run_start,
        })
    }
}

impl Runs {
    /// Partitions taken, each with what Redis says of its log: their runs
    /// begin at the next record seen.
    pub fn take(&mut self, logs: Vec<(TopicPartition, LogView)>) {
        for (tp, view) in logs {
            let field = mark_field(tp.partition, &view.topic_id);
            self.partitions.insert(
                tp,
                PartitionRun {
                    view,
                    mark_field: field,
                    run: None,
                },
            );
        }
    }

    /// `tp`'s run, if the stage owns `tp`.
    fn current(&self, tp: &TopicPartition) -> Option<&PartitionRun> {
        self.partitions.get(tp)
    }

    /// Partitions revoked or lost.
    pub fn release(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.partitions.remove(tp);
        }
    }

    /// The batch's partitions whose offsets go back: below where their run
    /// is, or within the batch.
    pub fn jumped_back(&self, batch: &Batch) -> Vec<TopicPartition> {
        let mut last: Vec<Option<i64>> = batch
            .partitions
            .iter()
            .map(|tp| {
                let run = self.current(tp)?.run?;
                Some(run.next - 1)
            })
            .collect();
        let mut jumped: Vec<TopicPartition> = Vec::new();
        for it in &batch.items {
            let tp = &batch.partitions[it.partition_index];
            if self.current(tp).is_none() {
                continue;
            }
            let before = &mut last[it.partition_index];
            if before.is_some_and(|b| it.offset <= b) && !jumped.contains(tp) {
                jumped.push(tp.clone());
            }
            *before = Some(it.offset);
        }
        jumped
    }

    /// Begins the runs of the batch's partitions that have none, then
    /// places every record. Call [`Runs::jumped_back`] first.
    pub fn place(&mut self, batch: &Batch) -> Placed {
        for (index, first) in first_offsets(batch) {
            if let Some(p) = self.partitions.get_mut(&batch.partitions[index]) {
                if p.run.is_none() {
                    p.run = Some(Run::begin(&p.view.decided, first));
                }
            }
        }
        let by_index: Vec<Option<&PartitionRun>> =
            batch.partitions.iter().map(|tp| self.current(tp)).collect();
        Placed {
            partitions: by_index
                .iter()
                .map(|p| {
                    let p = (*p)?;
                    Some((p.mark_field.clone(), p.run?.start))
                })
                .collect(),
            decided: batch
                .items
                .iter()
                .map(|it| {
                    by_index[it.partition_index].is_some_and(|p| p.view.decided.contains(it.offset))
                })
                .collect(),
        }
    }

    /// After the batch is decided: what each run claims, `[start, next)`.
    pub fn claims(&mut self, batch: &Batch) -> Vec<Claim> {
        let mut ends: HashMap<usize, i64> = HashMap::new();
        for it in &batch.items {
            let end = ends.entry(it.partition_index).or_insert(it.offset + 1);
            *end = (*end).max(it.offset + 1);
        }
        let mut claims = Vec::new();
        for (index, end) in ends {
            let tp = &batch.partitions[index];
            let Some(p) = self.partitions.get_mut(tp) else {
                continue;
            };
            let Some(run) = p.run.as_mut() else { continue };
            let (start, end) = run.advance(end);
            claims.push(Claim {
                tp: tp.clone(),
                topic_id: p.view.topic_id.clone(),
                start,
                end,
            });
        }
        claims
    }

    /// The claims are in Redis: later runs of the partition begin from them.
    pub fn claimed(&mut self, claims: &[Claim]) {
        for c in claims {
            if let Some(p) = self.partitions.get_mut(&c.tp) {
                if p.view.topic_id == c.topic_id {
                    p.view.decided.claim(c.start, c.end);
                }
            }
        }
    }
}

/// Each partition index of the batch with its first offset in it.
fn first_offsets(batch: &Batch) -> Vec<(usize, i64)> {
    let mut first: Vec<Option<i64>> = vec![None; batch.partitions.len()];
    for it in &batch.items {
        let f = &mut first[it.partition_index];
        *f = Some(f.map_or(it.offset, |o: i64| o.min(it.offset)));
    }
    first
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| Some((i, f?)))
        .collect()
}

#[cfg(test)]
mod tests;
