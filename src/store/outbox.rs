//! What a writer of the changelog's outboxes (the guard, the snapshot)
//! sends after it wrote changes, so that the relay finds them without
//! polling (docs/change-stream.md, "The relay"; src/relay/outboxes.rs).

use super::KeyLayout;

/// The ring after changes were written to the outboxes of `slots` (the
/// entities' hash slots; ignored standalone): on a cluster the slots join
/// the dirty set, then the bell rings (a list of at most one element, on
/// which an idle relay blocks). Sent after the writes: an entry is always
/// in its outbox before its slot is dirty.
pub fn ring(layout: &KeyLayout, cluster: bool, slots: &[u16]) -> redis::Pipeline {
    let bell = layout.outbox_bell_key(cluster);
    let mut pipe = redis::pipe();
    if cluster && !slots.is_empty() {
        pipe.cmd("SADD")
            .arg(layout.outbox_dirty_key())
            .arg(slots)
            .ignore();
    }
    pipe.cmd("LPUSH").arg(&bell).arg(1).ignore();
    pipe.cmd("LTRIM").arg(&bell).arg(0).arg(0).ignore();
    pipe
}
