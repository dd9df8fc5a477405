//! Blocked partitions: records in flight and no progress for longer than
//! `pipeline.stall_timeout`. Checked every second by the loop; sets
//! `idem_partition_blocked`, `/readyz`, and logs when a partition becomes
//! blocked and when it moves again.

use std::collections::BTreeMap;
use std::time::Duration;

use super::owned::OwnedPartitions;
use crate::metrics::{self, Health};

use crate::offsets::TopicPartition;

/// The partitions reported blocked, with the cause they were reported with.
#[derive(Default)]
pub struct BlockedWatch {
    reported: BTreeMap<TopicPartition, &'static str>,
}

impl BlockedWatch {
    /// `retrying`: what the guard stage said it retries, if anything (the
    /// cause named; else `slow`).
    pub fn check(
        &mut self,
        progress: &OwnedPartitions,
        health: &Health,
        stall: Duration,
        retrying: Option<&'static str>,
    ) {
        let cause = retrying.unwrap_or("slow");
        let blocked = progress.blocked(stall);
        for (tp, was) in std::mem::take(&mut self.reported) {
            if !blocked.iter().any(|(b, _)| *b == tp) {
                metrics::set_partition_blocked(&tp.topic, tp.partition, was, false);
                tracing::info!(topic = %tp.topic, partition = tp.partition, "partition moves again");
            } else {
                self.reported.insert(tp, was);
            }
        }
        for (tp, idle) in &blocked {
            let previous = self.reported.insert(tp.clone(), cause);
            if previous != Some(cause) {
                if let Some(old) = previous {
                    metrics::set_partition_blocked(&tp.topic, tp.partition, old, false);
                }
                metrics::set_partition_blocked(&tp.topic, tp.partition, cause, true);
                tracing::error!(
                    topic = %tp.topic,
                    partition = tp.partition,
                    cause,
                    idle = ?idle,
                    "partition blocked: records in flight and no progress for longer than pipeline.stall_timeout; nothing past them is committed until the cause is fixed"
                );
            }
        }
        health.set_blocked((!blocked.is_empty()).then(|| describe(&blocked, cause)));
    }
}

/// `/readyz`'s reason for blocked partitions.
fn describe(blocked: &[(TopicPartition, Duration)], cause: &str) -> String {
    let names: Vec<String> = blocked
        .iter()
        .map(|(tp, idle)| format!("{}/{} ({}s)", tp.topic, tp.partition, idle.as_secs()))
        .collect();
    format!(
        "{} partition(s) blocked by {cause}, no progress for longer than pipeline.stall_timeout: {}",
        blocked.len(),
        names.join(", ")
    )
}
