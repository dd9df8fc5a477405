//! The guard's side of the changelog's outboxes (docs/changelog.md): after
//! a batch, it rings the relay and measures the outboxes it wrote to, so
//! the guard stage can hold the next batch at `changelog.max_outbox`.

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
            .filter(|i| i.effects.changelog.is_some())
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
        let outboxes: Vec<(Option<u16>, String)> = slots
            .iter()
            .map(|&s| {
                let slot = cluster.then_some(s);
                (slot, self.layout.outbox_key(slot))
            })
            .collect();
        let deepest = self.deepest_outbox.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.pipeline_on(&None, &pipe).await {
                tracing::debug!(error = %e, "could not ring the outbox bell; the relay's sweep finds the entries");
            }
            let mut seen = (None, 0);
            for (slot, key) in outboxes {
                let len: u64 = redis::cmd("XLEN")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(0);
                if len >= seen.1 {
                    seen = (slot, len);
                }
            }
            *deepest.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        });
    }

    /// The deepest outbox the last batch with changes wrote to, as measured
    /// after it: its slot (`None` standalone) and how many entries it holds.
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
