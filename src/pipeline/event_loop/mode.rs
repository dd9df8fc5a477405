//! What the loop does with fetched records, as one [`Mode`]: vector's Kafka
//! source keeps its consumer's state the same way, so that no impossible
//! combination of flags can be written. Each transition takes the mode and
//! returns the next; pausing and resuming fetching happen only in them.

use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tokio::time::Instant;

use crate::metrics;
use crate::pipeline::consumer::Consumer;

/// How long a ready batch waits for room in the guard stage's queue before
/// fetching pauses (instead of buffering) while rebalances are still served.
pub(super) const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// What the loop does with fetched records.
#[derive(Debug)]
pub enum Mode {
    /// Fetching, and handing batches over as the stage has room.
    Consuming,
    /// A batch is ready and the stage has had no room since `since`:
    /// fetching goes on until [`PAUSE_AFTER`], then pauses.
    Waiting { since: Instant },
    /// Fetching paused while a ready batch waits for room; `paused` is
    /// what resumes once the batch is handed over (or its records dropped).
    Paused { paused: TopicPartitionList },
    /// Consumption stopped (the dead-letter budget, `reason`): nothing more
    /// is fetched until idem restarts; rebalances are served and what
    /// finishes is committed. Outlives a restart of consumption: the
    /// pipeline hands it to the next round's loop.
    Stopped {
        paused: TopicPartitionList,
        reason: String,
    },
}

impl Mode {
    pub fn is_stopped(&self) -> bool {
        matches!(self, Mode::Stopped { .. })
    }

    /// What is paused, in the modes that pause.
    pub fn paused(&self) -> Option<&TopicPartitionList> {
        match self {
            Mode::Paused { paused } | Mode::Stopped { paused, .. } => Some(paused),
            Mode::Consuming | Mode::Waiting { .. } => None,
        }
    }

    pub fn paused_mut(&mut self) -> Option<&mut TopicPartitionList> {
        match self {
            Mode::Paused { paused } | Mode::Stopped { paused, .. } => Some(paused),
            Mode::Consuming | Mode::Waiting { .. } => None,
        }
    }
}

impl Mode {
    /// The next moment the loop must look again without any message: when
    /// a waiting batch should pause fetching, or the linger deadline.
    pub fn wake_at(&self, ready: bool, linger_until: Option<Instant>) -> Option<Instant> {
        match self {
            Mode::Waiting { since } if ready => Some(*since + PAUSE_AFTER),
            _ if ready => None,
            _ => linger_until,
        }
    }

    /// Waiting → Paused once the batch waited [`PAUSE_AFTER`] (Waiting
    /// again, from now, if librdkafka refused the pause); any other mode
    /// stays.
    pub fn pause_if_waited(self, consumer: &Consumer) -> Mode {
        match self {
            Mode::Waiting { since } if since.elapsed() >= PAUSE_AFTER => match pause(consumer) {
                Some(paused) => Mode::Paused { paused },
                None => Mode::Waiting {
                    since: Instant::now(),
                },
            },
            other => other,
        }
    }

    /// Paused → Consuming, resuming what was paused; Waiting → Consuming;
    /// Stopped stays.
    pub fn resume_fetching(self, consumer: &Consumer) -> Mode {
        match self {
            Mode::Paused { paused } => {
                unpause(consumer, &paused);
                Mode::Consuming
            }
            Mode::Waiting { .. } | Mode::Consuming => Mode::Consuming,
            stopped @ Mode::Stopped { .. } => stopped,
        }
    }

    /// Any mode → Stopped, with fetching paused (what was paused stays so).
    pub fn stop(self, reason: String, consumer: &Consumer) -> Mode {
        let paused = match self {
            Mode::Paused { paused } | Mode::Stopped { paused, .. } => paused,
            Mode::Consuming | Mode::Waiting { .. } => pause(consumer).unwrap_or_default(),
        };
        Mode::Stopped { paused, reason }
    }

    /// While paused or stopped: pauses what is paused and assigned by now
    /// (a partition assigned during the pause is assigned after the loop
    /// answered). Pausing a paused partition changes nothing.
    pub fn keep_paused(&self, consumer: &Consumer) {
        let Some(paused) = self.paused() else {
            return;
        };
        let owned = consumer.assignment().unwrap_or_default();
        let mut assigned = TopicPartitionList::new();
        for e in paused.elements() {
            if owned.find_partition(e.topic(), e.partition()).is_some() {
                assigned.add_partition(e.topic(), e.partition());
            }
        }
        if assigned.count() > 0 {
            if let Err(e) = consumer.pause(&assigned) {
                tracing::warn!(error = %e, "could not pause fetching");
            }
        }
    }
}

/// Pauses fetching for every assigned partition; what it paused, or `None`
/// if librdkafka refused.
fn pause(consumer: &Consumer) -> Option<TopicPartitionList> {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the assignment to pause it");
            return None;
        }
    };
    match consumer.pause(&assignment) {
        Ok(()) => {
            metrics::set_paused(true);
            tracing::debug!(partitions = assignment.count(), "fetching paused");
            Some(assignment)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not pause fetching");
            None
        }
    }
}

fn unpause(consumer: &Consumer, paused: &TopicPartitionList) {
    // Every paused partition, assigned now or not: librdkafka keeps a pause
    // with the partition across a rebalance, and one lost and assigned
    // again is missing from the assignment while the loop answers the
    // assignment (the consumer thread assigns it after). If librdkafka
    // refuses the whole list, the assigned ones at least.
    if consumer.resume(paused).is_err() {
        let owned = consumer.assignment().unwrap_or_default();
        let mut resume = TopicPartitionList::new();
        for e in paused.elements() {
            if owned.find_partition(e.topic(), e.partition()).is_some() {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        if let Err(e) = consumer.resume(&resume) {
            tracing::warn!(error = %e, "could not resume fetching");
        }
    }
    metrics::set_paused(false);
}
