//! The outcome counts of this process, by topic, beside the Prometheus
//! counter they mirror: what `idem run` publishes to the members registry
//! for `idem top` (the registry holds no addresses, so no one scrapes).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::model::Outcome;

/// Counts by outcome, in [`Outcome::ALL`]'s order.
pub type Counts = [u64; Outcome::ALL.len()];

static TALLY: Mutex<BTreeMap<String, Counts>> = Mutex::new(BTreeMap::new());

/// Adds `n` to `topic`'s `outcome` (a batch's worth at a time).
pub(super) fn add(topic: &str, outcome: Outcome, n: u64) {
    let mut tally = TALLY.lock().unwrap_or_else(|e| e.into_inner());
    match tally.get_mut(topic) {
        Some(counts) => counts[outcome as usize] += n,
        None => {
            let mut counts = Counts::default();
            counts[outcome as usize] = n;
            tally.insert(topic.to_string(), counts);
        }
    }
}

/// Every topic's counts since start (equal to `idem_events_total`).
pub fn outcome_counts() -> BTreeMap<String, Counts> {
    TALLY.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
