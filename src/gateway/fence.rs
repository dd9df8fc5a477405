//! The epoch fence: the gateway binds seqs only under the epoch idem's
//! markers hold, and only once idem has decided its topics under it.
//!
//! A Redis that loses or rolls back its state loses the seq counters with
//! it; a counter reseeded from a meta that idem has not rebuilt yet would
//! hand out seqs already in the log. So BIND checks the entity's slot's
//! marker, and after a change (or at start) writes wait (`503`) until the
//! group's commits, written under the new epoch, reach the end offsets the
//! gateway read when it noticed: then every seq in the log is in the meta
//! BIND reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::resume::metadata_epoch;

use crate::store::progress::ProgressStore;

/// Whether writes are admitted, and under which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Open {
        epoch: String,
    },
    /// Writes wait; the reason, for the `503` and `/readyz`.
    Closed {
        reason: String,
    },
}

/// The fence, shared by the handlers, the sweeper and its watcher.
#[derive(Clone)]
pub struct Fence {
    gate: Arc<Mutex<Gate>>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            gate: Arc::new(Mutex::new(Gate::Closed {
                reason: "starting: waiting for idem run's epoch and its catch-up".into(),
            })),
        }
    }
}

impl Fence {
    pub fn gate(&self) -> Gate {
        self.gate.lock().expect("not poisoned").clone()
    }

    /// BIND found another marker than `epoch`: close until idem caught up.
    pub fn lost(&self, epoch: &str, found: &str) {
        let mut gate = self.gate.lock().expect("not poisoned");
        if *gate
            == (Gate::Open {
                epoch: epoch.to_string(),
            })
        {
            tracing::warn!(
                expected = epoch,
                found,
                "Redis's epoch changed under the gateway: writes wait until idem has caught up"
            );
            *gate = Gate::Closed {
                reason: format!("Redis lost or rolled back its state (epoch marker {found}, expected {epoch}): waiting until idem has decided the gateway's topics again"),
            };
        }
    }

    fn set(&self, gate: Gate) {
        *self.gate.lock().expect("not poisoned") = gate;
    }

    /// Opens the gate whenever it can, and keeps it honest: runs until the
    /// process ends.
    pub async fn watch(self, markers: ProgressStore, config: Arc<Config>) {
        let mut markers = markers;
        let mut target = None;
        loop {
            if let Gate::Closed { .. } = self.gate() {
                match try_open(&mut markers, &config, &mut target).await {
                    Ok(Some(epoch)) => {
                        tracing::info!(epoch, "gateway admits writes");
                        self.set(Gate::Open { epoch });
                    }
                    Ok(None) => {}
                    Err(reason) => self.set(Gate::Closed { reason }),
                }
            } else {
                target = None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The end offsets to wait for under one epoch, read once when the wait
/// began (ends that keep moving under other writers cannot hold it).
type Target = Option<(String, BTreeMap<(String, i32), i64>)>;

/// The epoch to open under, once idem decided everything in the gateway's
/// topics up to their ends as read when the wait began; `Ok(None)` when the
/// marker moved meanwhile; the reason while it waits.
async fn try_open(
    markers: &mut ProgressStore,
    config: &Arc<Config>,
    target: &mut Target,
) -> Result<Option<String>, String> {
    // Every slot's marker, not one: BIND checks the entity's slot, and an
    // idem run starting on a new prefix sets the slots one server at a time.
    let epoch = match markers.agreed_epoch().await {
        Ok(Some(epoch)) => epoch,
        Ok(None) => return Err(format!(
            "Redis's epoch markers under prefix {} are absent or disagree: idem run has not started there (or is setting them), or Redis lost its state and idem has not noticed yet",
            config.redis.key_prefix
        )),
        Err(e) => return Err(format!("cannot read the epoch marker: {e}")),
    };
    let positions = group_positions(config).await?;
    if target.as_ref().is_none_or(|(e, _)| *e != epoch) {
        let ends = positions
            .iter()
            .map(|(tp, p)| (tp.clone(), p.end))
            .collect();
        *target = Some((epoch.clone(), ends));
    }
    let ends = &target.as_ref().expect("just set").1;
    let behind: Vec<String> = positions
        .iter()
        .filter(|(tp, p)| !p.caught_up(&epoch, ends.get(*tp).copied().unwrap_or(0)))
        .map(|((t, p), at)| format!("{t}[{p}] at {:?}", at.committed))
        .collect();
    if !behind.is_empty() {
        return Err(format!(
            "waiting for group {} to decide the gateway's topics under epoch {epoch}: {}",
            config.kafka.group_id,
            behind.join(", ")
        ));
    }
    // Read again: a marker that changed during the wait starts it over.
    match markers.agreed_epoch().await {
        Ok(Some(again)) if again == epoch => Ok(Some(epoch)),
        _ => Ok(None),
    }
}

/// A partition's commit and end, as the group's coordinator and the
/// brokers give them.
#[derive(Debug, Clone)]
struct Position {
    committed: Option<i64>,
    metadata: String,
    end: i64,
}

impl Position {
    /// Decided up to `end` under `epoch` (nothing to decide always is).
    fn caught_up(&self, epoch: &str, end: i64) -> bool {
        end == 0
            || (self.committed.unwrap_or(0) >= end && metadata_epoch(&self.metadata) == Some(epoch))
    }
}

async fn group_positions(
    config: &Arc<Config>,
) -> Result<BTreeMap<(String, i32), Position>, String> {
    let config = config.clone();
    let status = tokio::task::spawn_blocking(move || {
        crate::tools::group::group_status(
            &config.kafka,
            &config.kafka.group_id,
            &config.gateway.topics,
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read group commits: {e:#}"))?;
    Ok(status
        .partitions
        .into_iter()
        .map(|p| {
            (
                (p.topic, p.partition),
                Position {
                    committed: p.committed,
                    metadata: p.metadata,
                    end: p.end,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_caught_up_at_its_end_under_the_epoch() {
        let at = |committed: Option<i64>, epoch: &str| Position {
            committed,
            metadata: crate::resume::commit_metadata(epoch),
            end: 99,
        };
        assert!(at(Some(10), "e1").caught_up("e1", 10));
        assert!(at(Some(12), "e1").caught_up("e1", 10));
        assert!(!at(Some(9), "e1").caught_up("e1", 10));
        assert!(
            !at(Some(10), "e0").caught_up("e1", 10),
            "a commit of the old epoch"
        );
        assert!(!at(None, "e1").caught_up("e1", 3));
        assert!(at(None, "").caught_up("e1", 0), "nothing to decide");
        let fence = Fence::default();
        fence.set(Gate::Open { epoch: "e1".into() });
        fence.lost("e0", "x");
        assert_eq!(
            fence.gate(),
            Gate::Open { epoch: "e1".into() },
            "a stale report"
        );
        fence.lost("e1", "missing");
        assert!(matches!(fence.gate(), Gate::Closed { .. }));
    }
}
