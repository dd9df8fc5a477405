//! The guard stage: takes decoded batches in order, runs the guard for them
//! (retrying until Redis answers), counts outcomes and marks their offsets done.
//!
//! Guarantee: batches are applied strictly in the order they were fetched,
//! one at a time, and a batch's offsets are marked done only after Redis
//! answered for all of its events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::batch::Batch;
use super::progress::Progress;
use super::{Backoff, Shutdown, Summary};
use crate::config::Config;
use crate::guard::{Guard, GuardInput, Verdict};
use crate::metrics::{self, Health};
use crate::model::Outcome;

pub struct GuardStage {
    pub config: Arc<Config>,
    pub guard: Guard,
    pub progress: Arc<Progress>,
    pub health: Health,
    pub shutdown: Shutdown,
    pub summary: Arc<std::sync::Mutex<Summary>>,
}

impl GuardStage {
    /// Applies batches until the channel closes, or shutdown fires while Redis fails.
    pub async fn run(mut self, mut batches: mpsc::Receiver<Batch>) {
        while let Some(batch) = batches.recv().await {
            if !self.apply(batch).await {
                return;
            }
        }
    }

    async fn apply(&mut self, batch: Batch) -> bool {
        let started = Instant::now();
        let inputs: Vec<GuardInput<'_>> = batch
            .items
            .iter()
            .filter_map(|it| {
                it.decoded.as_ref().ok().map(|event| GuardInput {
                    event,
                    window: batch.windows[it.partition],
                })
            })
            .collect();
        let Some(verdicts) = self.guard_with_retry(&inputs).await else {
            return false;
        };
        drop(inputs);
        self.progress.mark_done(batch.positions());
        self.record(&batch, &verdicts);
        metrics::record_batch(batch.len(), started.elapsed());
        true
    }

    fn record(&self, batch: &Batch, verdicts: &[Verdict]) {
        let mut counts: HashMap<(usize, Outcome), u64> = HashMap::new();
        let mut verdicts = verdicts.iter();
        for it in &batch.items {
            let Ok(event) = &it.decoded else {
                continue; // invalid records were counted when decoded
            };
            let v = verdicts.next().expect("one verdict per decoded event");
            *counts.entry((it.partition, v.outcome)).or_default() += 1;
            match v.outcome {
                Outcome::Duplicate => {
                    if let Some(age) = v.duplicate_age {
                        metrics::record_duplicate_age(age);
                    }
                }
                Outcome::Conflict => {
                    let tp = &batch.partitions[it.partition];
                    tracing::warn!(
                        topic = %tp.topic,
                        partition = tp.partition,
                        offset = it.offset,
                        id = %event.id,
                        fingerprint = %format!("{:016x}", event.fingerprint),
                        remembered = %format!("{:016x}", v.remembered_fingerprint.unwrap_or(0)),
                        "conflict: id reused with a different payload; not applied"
                    );
                }
                _ => {}
            }
        }
        let mut summary = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        for ((partition, outcome), n) in counts {
            metrics::record_outcome(&batch.partitions[partition].topic, outcome, n);
            summary.add(outcome, n);
        }
        let now_ms = super::unix_millis();
        metrics::record_event_latencies(
            batch
                .items
                .iter()
                .filter_map(|it| Some((now_ms - it.timestamp_ms?).max(0) as f64 / 1000.0)),
        );
    }

    async fn guard_with_retry(&mut self, inputs: &[GuardInput<'_>]) -> Option<Vec<Verdict>> {
        let mut backoff = Backoff::new(&self.config);
        loop {
            let started = Instant::now();
            match self.guard.apply(inputs).await {
                Ok(verdicts) => {
                    metrics::record_round_trip(started.elapsed());
                    self.health.set_redis_ok(true);
                    return Some(verdicts);
                }
                Err(e) => {
                    self.health.set_redis_ok(false);
                    metrics::record_retry(e.cause());
                    let wait: Duration = backoff.next();
                    tracing::warn!(
                        error = %e,
                        retryable = e.is_retryable(),
                        events = inputs.len(),
                        retry_in = ?wait,
                        "redis guard call failed; nothing past this batch is committed until it succeeds"
                    );
                    tokio::select! {
                        _ = self.shutdown.wait() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}
