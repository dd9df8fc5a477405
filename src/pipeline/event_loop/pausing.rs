//! Pausing fetching while records wait for a full guard stage (or after
//! consumption stopped), and resuming it.

use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;

use super::{EventLoop, Resume};
use crate::metrics;

impl<R: Resume> EventLoop<R> {
    /// While paused: pauses what is paused and assigned by now (a partition
    /// assigned during the pause is assigned after the loop answered).
    /// Pausing a paused partition changes nothing.
    pub(super) fn keep_paused(&mut self) {
        let Some(paused) = &self.paused else { return };
        let owned = self.consumer.assignment().unwrap_or_default();
        let mut assigned = TopicPartitionList::new();
        for e in paused.elements() {
            if owned.find_partition(e.topic(), e.partition()).is_some() {
                assigned.add_partition(e.topic(), e.partition());
            }
        }
        if assigned.count() > 0 {
            if let Err(e) = self.consumer.pause(&assigned) {
                tracing::warn!(error = %e, "could not pause fetching");
            }
        }
    }

    /// Pauses fetching for every assigned partition.
    pub(super) fn pause(&mut self) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                return tracing::warn!(error = %e, "could not read the assignment to pause it")
            }
        };
        match self.consumer.pause(&assignment) {
            Ok(()) => {
                metrics::set_paused(true);
                tracing::debug!(partitions = assignment.count(), "fetching paused");
                self.paused = Some(assignment);
            }
            Err(e) => tracing::warn!(error = %e, "could not pause fetching"),
        }
    }

    pub(super) fn resume(&mut self) {
        let Some(paused) = self.paused.take() else {
            return;
        };
        // Every paused partition, assigned now or not: librdkafka keeps a
        // pause with the partition across a rebalance, and one lost and
        // assigned again is missing from the assignment while the loop
        // answers the assignment (the consumer thread assigns it after). If
        // librdkafka refuses the whole list, the assigned ones at least.
        if self.consumer.resume(&paused).is_err() {
            let owned = self.consumer.assignment().unwrap_or_default();
            let mut resume = TopicPartitionList::new();
            for e in paused.elements() {
                if owned.find_partition(e.topic(), e.partition()).is_some() {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::warn!(error = %e, "could not resume fetching");
            }
        }
        metrics::set_paused(false);
    }
}
