//! The changelog's outboxes (docs/change-stream.md): the layout of an
//! entry, written by one Lua function ([`ENTRY_LUA`], joined into the
//! guard's script and the snapshot's) and read by one parser ([`entry`],
//! the relay's); and what a writer sends after it wrote changes, so that
//! the relay finds them without polling ("The relay"; src/relay/outboxes.rs).

mod entry;

pub use entry::{parse_entries, written_ms, Entry, Form, REFERENCE_TYPE};

use super::KeyLayout;

/// `add_outbox_entry(outbox, fields, state, effects)`: the one writer of
/// an entry's layout, as (path, text) to join into a script.
pub const ENTRY_LUA: (&str, &str) = (
    "src/store/outbox/entry.lua",
    include_str!("outbox/entry.lua"),
);

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
