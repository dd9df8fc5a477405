//! What goes into which script call: the pure planning of one batch (which
//! events share a call, and which dedupe-window keys each event names).

use std::collections::HashMap;
use std::time::Duration;

use super::GuardInput;
use crate::store::{hash_slot, KeyLayout};

/// One call per hash slot, events in batch order within each.
pub fn chunk_by_slot(inputs: &[GuardInput<'_>], layout: &KeyLayout) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut chunk_of: HashMap<u16, usize> = HashMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let slot = hash_slot(layout.entity_base(&input.event.entity).as_bytes());
        let c = *chunk_of.entry(slot).or_insert_with(|| {
            chunks.push(Vec::new());
            chunks.len() - 1
        });
        chunks[c].push(i);
    }
    chunks
}

/// Splits a batch into script calls of about `per_call` events, keeping all
/// events of one entity in the same call, in their order.
///
/// Why: Redis runs every call of a pipeline even when one fails halfway, and
/// the batch is then retried. If an entity's events were spread over two
/// calls and the first failed, the second would apply its newer events
/// first, and the retry would find the older ones stale: a reordering.
/// With one call per entity per batch, a retry resumes each entity exactly
/// where it stopped.
///
/// | batch (entities)      | per_call | calls                 |
/// |-----------------------|----------|-----------------------|
/// | a b c d               | 2        | [a b] [c d]           |
/// | a b a c               | 2        | [a b a] [c]           |
/// | a a a b               | 2        | [a a a] [b]           |
pub fn chunk_by_entity(inputs: &[GuardInput<'_>], per_call: usize) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut chunk_of: HashMap<&str, usize> = HashMap::new();
    let mut open: Option<usize> = None;
    for (i, input) in inputs.iter().enumerate() {
        let entity = input.event.entity.as_str();
        if let Some(&c) = chunk_of.get(entity) {
            chunks[c].push(i);
            continue;
        }
        let c = match open {
            Some(c) if chunks[c].len() < per_call => c,
            _ => {
                chunks.push(Vec::with_capacity(per_call));
                open = Some(chunks.len() - 1);
                chunks.len() - 1
            }
        };
        chunks[c].push(i);
        chunk_of.insert(entity, c);
    }
    chunks
}

/// The dedupe window's keys for an event guarded at `now_ms`: time is cut
/// into generations of one window; an id is written into the current
/// generation's hash, which expires at the end of the next generation, and
/// looked up in the current and the previous one. So an id is remembered
/// for at least one window and at most two (see `lua/call.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdGenerations {
    pub current: u64,
    pub previous: u64,
    /// When the current generation's hash expires (Unix ms).
    pub expire_at_ms: u64,
}

/// | now_ms | window  | current | previous | expire_at_ms |
/// |--------|---------|---------|----------|--------------|
/// | 0      | 1 s     | 0       | 0        | 2000         |
/// | 999    | 1 s     | 0       | 0        | 2000         |
/// | 1000   | 1 s     | 1       | 0        | 3000         |
/// | 2500   | 1 s     | 2       | 1        | 4000         |
/// | 7      | 0 (1ms) | 7       | 6        | 9            |
pub fn id_generations(now_ms: u64, window: Duration) -> IdGenerations {
    // A zero window would divide by zero; config refuses it, the guard
    // still never panics.
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    let current = now_ms / window;
    IdGenerations {
        current,
        previous: current.saturating_sub(1),
        expire_at_ms: current.saturating_add(2).saturating_mul(window),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TopicPolicy;
    use crate::event::{Event, Op};

    static POLICY: std::sync::LazyLock<TopicPolicy> = std::sync::LazyLock::new(Default::default);

    fn event(entity: &str) -> Event {
        Event {
            ts: None,
            change: None,
            id: String::new(),
            entity: entity.into(),
            seq: 0,
            op: Op::Upsert,
            kind: None,
            set: vec![],
            unset: vec![],
            fingerprint: 0,
        }
    }

    fn inputs(events: &[Event]) -> Vec<GuardInput<'_>> {
        events
            .iter()
            .map(|event| GuardInput {
                event,
                policy: &POLICY,
                effects: &crate::effects::MERGE,
                place: None,
            })
            .collect()
    }

    #[test]
    fn chunks_keep_each_entity_in_one_call() {
        type Row = (&'static [&'static str], usize, &'static [&'static [usize]]);
        let table: &[Row] = &[
            (&["a", "b", "c", "d"], 2, &[&[0, 1], &[2, 3]]),
            (&["a", "b", "a", "c"], 2, &[&[0, 1, 2], &[3]]),
            (&["a", "a", "a", "b"], 2, &[&[0, 1, 2], &[3]]),
            (&["a", "b", "c", "a"], 1, &[&[0, 3], &[1], &[2]]),
        ];
        for (entities, per_call, want) in table {
            let events: Vec<Event> = entities.iter().map(|e| event(e)).collect();
            let got = chunk_by_entity(&inputs(&events), *per_call);
            let want: Vec<Vec<usize>> = want.iter().map(|c| c.to_vec()).collect();
            assert_eq!(got, want, "{entities:?}");
        }
    }

    #[test]
    fn chunks_by_slot_group_entities_of_one_slot() {
        let layout = KeyLayout::new("t");
        let names = ["a", "b", "c", "a", "d", "b"];
        let events: Vec<Event> = names.iter().map(|e| event(e)).collect();
        let chunks = chunk_by_slot(&inputs(&events), &layout);
        let slot = |i: usize| hash_slot(layout.entity_base(names[i]).as_bytes());
        // Every event in exactly one chunk, in batch order, one slot per chunk,
        // and no two chunks for the same slot.
        let mut seen: Vec<usize> = chunks.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..names.len()).collect::<Vec<_>>());
        let mut slots = Vec::new();
        for chunk in &chunks {
            assert!(chunk.windows(2).all(|w| w[0] < w[1]), "{chunks:?}");
            assert!(
                chunk.iter().all(|&i| slot(i) == slot(chunk[0])),
                "{chunks:?}"
            );
            slots.push(slot(chunk[0]));
        }
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), chunks.len(), "{chunks:?}");
        assert!(
            chunks.len() >= 2,
            "distinct entities spread over slots: {chunks:?}"
        );
    }

    #[test]
    fn id_generations_by_table() {
        let table: &[(u64, u64, (u64, u64, u64))] = &[
            (0, 1000, (0, 0, 2000)),
            (999, 1000, (0, 0, 2000)),
            (1000, 1000, (1, 0, 3000)),
            (2500, 1000, (2, 1, 4000)),
            (7, 0, (7, 6, 9)),
            (
                86_400_000 * 20_000 + 5,
                86_400_000,
                (20_000, 19_999, 86_400_000 * 20_002),
            ),
            (u64::MAX, 1, (u64::MAX, u64::MAX - 1, u64::MAX)),
        ];
        for &(now_ms, window_ms, (current, previous, expire_at_ms)) in table {
            let got = id_generations(now_ms, Duration::from_millis(window_ms));
            let want = IdGenerations {
                current,
                previous,
                expire_at_ms,
            };
            assert_eq!(got, want, "now {now_ms} window {window_ms}");
        }
    }
}
