//! Every key idem writes, named in one place: an entity's keys (state,
//! bookkeeping, remembered ids, effects), the epoch markers and progress
//! records, the durability barrier and the redrive record.
//! docs/redis-layout.md lists the same keys; a test checks the page
//! against this module.
//!
//! An entity's keys all start with `<prefix>:{<entity>}`: the braces are a
//! Redis Cluster hash tag, so one script can read and write all of them.

use crate::consumed::TopicId;
use crate::offsets::TopicPartition;

/// Names of the keys idem writes under one `redis.key_prefix`.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
}

/// The keys of one entity: all share its hash tag (so one cluster slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityKeys {
    base: String,
}

impl KeyLayout {
    pub fn new(prefix: impl Into<String>) -> Self {
        KeyLayout {
            prefix: prefix.into(),
        }
    }

    /// The key prefix every key of this layout starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of `entity`.
    pub fn entity(&self, entity: &str) -> EntityKeys {
        let mut base = String::with_capacity(self.prefix.len() + entity.len() + 3);
        base.push_str(&self.prefix);
        base.push_str(":{");
        base.push_str(entity);
        base.push('}');
        EntityKeys { base }
    }

    /// `<prefix>:{<entity>}`: the base every key of the entity starts with
    /// (what its hash slot is computed from).
    pub fn entity_base(&self, entity: &str) -> String {
        self.entity(entity).base
    }

    /// The materialized view other services read: a hash of the entity's fields.
    pub fn state_key(&self, entity: &str) -> String {
        self.entity(entity).state()
    }

    /// idem's bookkeeping for the entity: seq, last id, fingerprint, applied, deleted.
    pub fn meta_key(&self, entity: &str) -> String {
        self.entity(entity).meta()
    }

    /// The `SCAN` pattern of every entity's bookkeeping key, and the length
    /// of the text before the entity's name in each match.
    pub fn meta_pattern(&self) -> (String, usize) {
        (self.meta_key("*"), self.prefix.len() + 2)
    }

    /// The epoch marker every guard call checks: the one key of a
    /// standalone server (`None`), or the one of cluster slot `slot`.
    pub fn epoch_key(&self, slot: Option<u16>) -> String {
        self.own_key("epoch", slot)
    }

    /// The progress records of a server (`None`), or of the cluster master
    /// whose lowest slot is `slot`: a hash, field [`progress_field`],
    /// value the next offset to read.
    pub fn progress_key(&self, slot: Option<u16>) -> String {
        self.own_key("progress", slot)
    }

    /// The decided ranges of a server (`None`), or of the cluster master
    /// whose lowest slot is `slot` (beside its progress records): a hash,
    /// field [`decided_field`], value the ranges (`crate::consumed`).
    pub fn decided_key(&self, slot: Option<u16>) -> String {
        self.own_key("decided", slot)
    }

    /// The outbox of a server (`None`), or of cluster slot `slot`: a
    /// stream of the changes the guard wrote there (docs/change-stream.md),
    /// in the slot of the entities whose changes it holds.
    pub fn outbox_key(&self, slot: Option<u16>) -> String {
        self.own_key("outbox", slot)
    }

    /// Cluster: the slots whose outboxes may hold entries (a set, in slot
    /// 0's tag). The guard adds a slot after writing there; the relay
    /// removes one it found empty.
    pub fn outbox_dirty_key(&self) -> String {
        self.own_key("outbox-dirty", Some(0))
    }

    /// The list a guard pushes to after writing changes (at most one
    /// element), on which an idle relay blocks: the wake-up on write.
    pub fn outbox_bell_key(&self, cluster: bool) -> String {
        self.own_key("outbox-bell", cluster.then_some(0))
    }

    /// The relay's lease (docs/change-stream.md): the holder's name, expiring.
    pub fn relay_lease_key(&self, cluster: bool) -> String {
        self.own_key("relay-lease", cluster.then_some(0))
    }

    /// Who in consumer group `group` writes changes (docs/change-stream.md,
    /// "Turning it on"): a hash, field the instance, value its registration.
    pub fn members_key(&self, group: &str) -> String {
        format!("{}:members:{{{group}}}", self.prefix)
    }

    /// The topics every `idem run` on this prefix consumes (a set, never
    /// shrunk): who writes the prefix, for `idem reconcile --delete-extra`.
    pub fn writers_key(&self) -> String {
        self.own_key("writers", None)
    }

    /// The counter a durable wait increments (standalone Redis only).
    pub fn durability_barrier_key(&self) -> String {
        self.own_key("durability-barrier", None)
    }

    /// The barrier counter that lives in cluster slot `slot`: at most one key per slot.
    pub fn slot_barrier_key(&self, slot: u16) -> String {
        self.own_key("durability-barrier", Some(slot))
    }

    /// The set of dead letters of `dlq_topic` that `idem dlq redrive`
    /// re-published (members `partition:offset`).
    pub fn redriven_key(&self, dlq_topic: &str) -> String {
        format!("{}:redriven:{{{dlq_topic}}}", self.prefix)
    }

    /// `idem gateway`'s bindings whose response is not stored yet, by
    /// lease expiry (a sorted set of binding keys): of a server (`None`),
    /// or of cluster slot `slot`, beside the entities whose bindings it holds.
    pub fn gateway_pending_key(&self, slot: Option<u16>) -> String {
        self.own_key("gw-pending", slot)
    }

    /// The `SCAN` pattern of every slot's [`Self::gateway_pending_key`] on a cluster.
    pub fn gateway_pending_pattern(&self) -> String {
        format!("{}:gw-pending:*", self.prefix)
    }

    /// `<prefix>:<name>`, or on a cluster `<prefix>:<name>:{<tag>}` in slot `slot`.
    fn own_key(&self, name: &str, slot: Option<u16>) -> String {
        match slot {
            None => format!("{}:{name}", self.prefix),
            Some(s) => format!("{}:{name}:{{{}}}", self.prefix, slot_tag(s)),
        }
    }
}

/// The field of a partition in a progress hash: `<topic>:<partition>`.
pub fn progress_field(tp: &TopicPartition) -> String {
    format!("{}:{}", tp.topic, tp.partition)
}

/// The field of a partition's progress record in one topic incarnation:
/// `<topic>:<partition>:<id>` (a topic created again starts without one).
pub fn progress_incarnation_field(tp: &TopicPartition, topic_id: &TopicId) -> String {
    format!("{}:{}:{}", tp.topic, tp.partition, topic_id.short())
}

/// The field that names the incarnation whose offsets the partition's
/// [`progress_field`] last counted: `<topic>:<partition>:id`.
pub fn progress_owner_field(tp: &TopicPartition) -> String {
    format!("{}:{}:id", tp.topic, tp.partition)
}

/// The field of a partition's decided ranges: `<topic>:<partition>:<id>`,
/// with the topic incarnation's short id (a topic created again has others).
pub fn decided_field(tp: &TopicPartition, topic_id: &TopicId) -> String {
    format!("{}:{}:{}", tp.topic, tp.partition, topic_id.short())
}

/// The field of an entity's offset mark for a partition, in its meta hash:
/// `o:<id>:<partition>` (the topic incarnation's short id names the topic).
pub fn mark_field(partition: i32, topic_id: &TopicId) -> String {
    format!("o:{}:{partition}", topic_id.short())
}

/// The suffixes of an entity's keys after its base, as Rust and the
/// scripts both write them (the guard's prelude carries them).
pub const STATE_SUFFIX: &str = ":state";
pub const META_SUFFIX: &str = ":meta";
pub const COUNTERS_SUFFIX: &str = ":counters";
/// `idem gateway`'s keys of an entity: its counters, and after one more
/// `:` each binding.
pub const GATEWAY_SUFFIX: &str = ":gw";
/// Between the base and a ledger's name.
pub const LEDGER_INFIX: &str = ":ledger:";
/// Between the base and a set's name.
pub const SET_INFIX: &str = ":set:";

impl EntityKeys {
    /// `<prefix>:{<entity>}`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Hash: the materialized view (user fields only).
    pub fn state(&self) -> String {
        self.with(STATE_SUFFIX)
    }

    /// Hash: seq, last_id, fingerprint, applied, updated_ms, deleted, and
    /// one offset mark per partition ([`mark_field`]).
    pub fn meta(&self) -> String {
        self.with(META_SUFFIX)
    }

    /// Hash: the ids remembered in dedupe-window generation `generation`.
    pub fn ids(&self, generation: u64) -> String {
        format!("{}:ids:{generation}", self.base)
    }

    /// Hash: counter field → stored decimal; commutative custom effects' fields.
    pub fn counters(&self) -> String {
        self.with(COUNTERS_SUFFIX)
    }

    /// Stream: one entry per event, in the order they were applied.
    pub fn ledger(&self, stream: &str) -> String {
        format!("{}{LEDGER_INFIX}{stream}", self.base)
    }

    /// Set: the members.
    pub fn set(&self, set: &str) -> String {
        format!("{}{SET_INFIX}{set}", self.base)
    }

    /// Hash: member → seq of the newest add or remove that touched it.
    pub fn set_seqs(&self, set: &str) -> String {
        format!("{}{SET_INFIX}{set}:seq", self.base)
    }

    /// Hash: data field → seq of the event that wrote (or removed) it, under
    /// `state.order = "per_field"`; beside the state so that the state hash
    /// holds user fields only.
    pub fn field_seqs(&self) -> String {
        self.with(":field_seqs")
    }

    /// Hash: `idem gateway`'s counters for the entity: `next` (the next
    /// seq to bind) and `unacked` (bound, not yet acknowledged by the broker).
    pub fn gateway(&self) -> String {
        self.with(GATEWAY_SUFFIX)
    }

    /// Hash: one Idempotency-Key's binding (`key_hash` names the caller
    /// and the key): its seq, request fingerprint, lease and stored response.
    pub fn gateway_binding(&self, key_hash: &str) -> String {
        format!("{}{GATEWAY_SUFFIX}:{key_hash}", self.base)
    }

    fn with(&self, suffix: &str) -> String {
        let mut key = String::with_capacity(self.base.len() + suffix.len());
        key.push_str(&self.base);
        key.push_str(suffix);
        key
    }
}

/// A short hash tag for each cluster slot ("0", "1", … whichever lands there first).
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); 16384];
        let mut missing = tags.len();
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = n.to_string();
            let s = usize::from(hash_slot(tag.as_bytes()));
            if tags[s].is_empty() {
                tags[s] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % 16384)]
}

/// How many hash slots a Redis Cluster has.
pub const SLOTS: u16 = 16384;

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag, mod 16384.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(tagged) % 16384
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entitys_keys_share_its_slot() {
        let l = KeyLayout::new("idem");
        assert_eq!(l.state_key("orders:42"), "idem:{orders:42}:state");
        assert_eq!(l.meta_key("orders:42"), "idem:{orders:42}:meta");
        let e = l.entity("a");
        for key in [
            e.state(),
            e.meta(),
            e.ids(7),
            e.counters(),
            e.ledger("l"),
            e.set("s"),
            e.set_seqs("s"),
            e.field_seqs(),
        ] {
            assert_eq!(hash_slot(key.as_bytes()), hash_slot(b"a"), "{key}");
        }
        let (pattern, before) = l.meta_pattern();
        assert_eq!(pattern, "idem:{*}:meta");
        assert_eq!(&l.meta_key("x:1")[before..before + 3], "x:1");
        for slot in [0, 5, 16383] {
            assert_eq!(hash_slot(l.epoch_key(Some(slot)).as_bytes()), slot);
            assert_eq!(hash_slot(l.slot_barrier_key(slot).as_bytes()), slot);
            assert_eq!(hash_slot(l.outbox_key(Some(slot)).as_bytes()), slot);
            assert_eq!(
                hash_slot(l.gateway_pending_key(Some(slot)).as_bytes()),
                slot
            );
        }
    }

    /// Every key idem writes, with placeholders, as docs/redis-layout.md
    /// must name it.
    fn every_key() -> Vec<String> {
        let l = KeyLayout::new("<prefix>");
        let e = l.entity("<entity>");
        let tag = |key: String| key.replace(&format!("{{{}}}", slot_tag(5)), "{<tag>}");
        vec![
            e.state(),
            e.meta(),
            e.base().to_string() + ":ids:<g>",
            e.counters(),
            e.ledger("<stream>"),
            e.set("<set>"),
            e.set_seqs("<set>"),
            e.field_seqs(),
            e.gateway(),
            e.gateway_binding("<key hash>"),
            l.gateway_pending_key(None),
            tag(l.gateway_pending_key(Some(5))),
            l.epoch_key(None),
            tag(l.epoch_key(Some(5))),
            l.progress_key(None),
            tag(l.progress_key(Some(5))),
            l.decided_key(None),
            tag(l.decided_key(Some(5))),
            l.durability_barrier_key(),
            tag(l.slot_barrier_key(5)),
            l.outbox_key(None),
            tag(l.outbox_key(Some(5))),
            l.outbox_dirty_key()
                .replace(&format!("{{{}}}", slot_tag(0)), "{<tag>}"),
            l.outbox_bell_key(false),
            l.outbox_bell_key(true)
                .replace(&format!("{{{}}}", slot_tag(0)), "{<tag>}"),
            l.relay_lease_key(false),
            l.relay_lease_key(true)
                .replace(&format!("{{{}}}", slot_tag(0)), "{<tag>}"),
            l.redriven_key("<dlq topic>"),
            l.members_key("<group>"),
            l.writers_key(),
        ]
    }

    #[test]
    fn the_layout_page_names_every_key_idem_writes() {
        let page = include_str!("../../docs/redis-layout.md");
        assert_eq!(
            KeyLayout::new("p").entity("e").ids(3),
            "p:{e}:ids:3",
            "the page's <g> stands for the generation"
        );
        for key in every_key() {
            assert!(
                page.contains(&format!("`{key}`")),
                "docs/redis-layout.md does not name `{key}`"
            );
        }
    }

    #[test]
    fn hash_slots_match_redis() {
        // Values from CLUSTER KEYSLOT on a real server.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"bar"), 5061);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        // An empty tag: the whole key is hashed.
        assert_eq!(
            hash_slot(b"foo{}{bar}"),
            crc16_xmodem(b"foo{}{bar}") % 16384
        );
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
    }
}
