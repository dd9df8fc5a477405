//! The guard's side of the changelog's outboxes (docs/change-stream.md): after
//! a batch, it rings the relay and keeps the deepest outbox the batch's
//! calls wrote to (each call that writes changes ends its reply with its
//! outbox's length), so the guard stage can hold the next batch at
//! `changelog.max_outbox`.

use super::{Guard, GuardInput};
use crate::store::{hash_slot, StoreError};

impl Guard {
    /// Tells the relay that outboxes may have new entries (src/relay/outboxes.rs):
    /// on a cluster the slots join the dirty set, then the bell rings. Sent
    /// after the calls, apart, and not awaited: a lost ring only leaves the
    /// entries to the relay's sweep.
    pub(super) fn ring_outboxes(&self, inputs: &[GuardInput<'_>]) {
        let cluster = self.conn.is_cluster();
        let slots: std::collections::BTreeSet<u16> = inputs
            .iter()
            .filter(|i| i.policy.changelog)
            .map(|i| {
                if cluster {
                    hash_slot(self.layout.entity_base(&i.event.entity).as_bytes())
                } else {
                    0
                }
            })
            .collect();
        if slots.is_empty() {
            return;
        }
        let dirty: Vec<u16> = slots.iter().copied().collect();
        let pipe = crate::store::outbox::ring(&self.layout, cluster, &dirty);
        let mut conn = self.conn.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.pipeline_on(&None, &pipe).await {
                tracing::debug!(error = %e, "could not ring the outbox bell; the relay's sweep finds the entries");
            }
        });
    }

    /// Keeps the deepest of the outboxes the calls reported (slot, length
    /// after the call; `None` for a call that wrote no change), if any did.
    pub(super) fn note_outbox_depths(
        &self,
        depths: impl Iterator<Item = (Option<u16>, Option<u64>)>,
    ) {
        let deepest = depths
            .filter_map(|(slot, depth)| Some((slot, depth?)))
            .max_by_key(|&(_, depth)| depth);
        if let Some(deepest) = deepest {
            *self
                .deepest_outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = deepest;
        }
    }

    /// The deepest outbox the last batch with changes wrote to, as its
    /// calls found it: its slot (`None` standalone) and how many entries it
    /// held after the call.
    pub fn deepest_outbox(&self) -> (Option<u16>, u64) {
        *self
            .deepest_outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Measures the outbox of `slot` again (for a stage waiting on it).
    pub async fn measure_outbox(&mut self, slot: Option<u16>) -> Result<u64, StoreError> {
        let len: u64 = redis::cmd("XLEN")
            .arg(self.layout.outbox_key(slot))
            .query_async(&mut self.conn)
            .await?;
        *self
            .deepest_outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (slot, len);
        Ok(len)
    }
}
