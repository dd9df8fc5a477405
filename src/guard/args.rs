//! What one event sends to the guard script: its keys beyond the four every
//! event has, and its arguments (the layout is documented at the top of
//! the script, `lua/call.lua`). Pure: an event and its effects in, keys
//! and arguments out.
//! Each mutation kind has a code of its own ([`MutationKind::code`]), read
//! by its own function in the script; a test has the script report how it
//! parsed a call of every kind (tests/guard.rs).

use super::GuardInput;
use crate::effects::{Effects, Mutation, Order, StateEffect};
use crate::event::{id_hash, Event, Op};
use crate::store::EntityKeys;

/// The kinds of mutation a guard call carries, each with its own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutationKind {
    Counter,
    CounterSet,
    Ledger,
    SetAdd,
    SetRemove,
    Custom,
}

impl MutationKind {
    pub const ALL: [MutationKind; 6] = [
        MutationKind::Counter,
        MutationKind::CounterSet,
        MutationKind::Ledger,
        MutationKind::SetAdd,
        MutationKind::SetRemove,
        MutationKind::Custom,
    ];

    /// The code the script's `READ_MUTATION` is keyed by (its prelude
    /// names each `KIND_<CODE>`).
    pub fn code(self) -> &'static str {
        match self {
            MutationKind::Counter => "counter",
            MutationKind::CounterSet => "counter_set",
            MutationKind::Ledger => "ledger",
            MutationKind::SetAdd => "set_add",
            MutationKind::SetRemove => "set_remove",
            MutationKind::Custom => "custom",
        }
    }
}

/// A custom effect's order, as the script reads it (`ORDER_<CODE>`).
pub fn order_code(order: Order) -> &'static str {
    match order {
        Order::Ordered => "ordered",
        Order::Commutative => "commutative",
    }
}

/// An event's effect keys (after its four) and its mutations' arguments,
/// where a key is named by its 1-based position in `keys`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EffectParts {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

impl EffectParts {
    pub fn new(
        entity: &EntityKeys,
        event: &Event,
        effects: &Effects,
        per_field: bool,
    ) -> EffectParts {
        let mut parts = EffectParts::default();
        if per_field {
            // Always the first: the script reads it as the event's key 1.
            parts.key(entity.field_seqs());
        }
        if effects.mutations.is_empty() {
            return parts;
        }
        let mut args = Vec::new();
        for m in &effects.mutations {
            match m {
                Mutation::Count { field, amount } => {
                    let key = parts.key(entity.counters());
                    args.extend([
                        MutationKind::Counter.code().into(),
                        key,
                        field.clone(),
                        amount.units_text(),
                        amount.scale.to_string(),
                    ]);
                }
                Mutation::SetCounter { field, value } => {
                    let key = parts.key(entity.counters());
                    args.extend([
                        MutationKind::CounterSet.code().into(),
                        key,
                        field.clone(),
                        if value.is_some() { "1" } else { "0" }.into(),
                        value.clone().unwrap_or_default(),
                    ]);
                }
                Mutation::Append {
                    stream,
                    entry,
                    max_len,
                    max_age_ms,
                } => {
                    let key = parts.key(entity.ledger(stream));
                    args.extend([
                        MutationKind::Ledger.code().into(),
                        key,
                        max_len.to_string(),
                        max_age_ms.to_string(),
                        entry.len().to_string(),
                    ]);
                    args.extend(entry.iter().flat_map(|(k, v)| [k.clone(), v.clone()]));
                }
                Mutation::SetAdd { set, member } | Mutation::SetRemove { set, member } => {
                    let kind = if matches!(m, Mutation::SetAdd { .. }) {
                        MutationKind::SetAdd
                    } else {
                        MutationKind::SetRemove
                    };
                    let key = parts.key(entity.set(set));
                    let seqs = parts.key(entity.set_seqs(set));
                    args.extend([kind.code().into(), key, seqs, member.clone()]);
                }
                Mutation::Custom { snippet, order } => {
                    let key = parts.key(entity.counters());
                    args.extend([
                        MutationKind::Custom.code().into(),
                        (snippet + 1).to_string(),
                        key,
                        order_code(*order).into(),
                        event.set.len().to_string(),
                    ]);
                    args.extend(event.set.iter().flat_map(|(k, v)| [k.clone(), v.clone()]));
                }
            }
        }
        parts.args = args;
        parts
    }

    /// The position of `key` among the event's effect keys, added once.
    fn key(&mut self, key: String) -> String {
        let at = match self.keys.iter().position(|k| *k == key) {
            Some(at) => at,
            None => {
                self.keys.push(key);
                self.keys.len() - 1
            }
        };
        (at + 1).to_string()
    }
}

/// The state code the script reads (read.lua): what the event does to the state, and
/// under which order (`field:` for `state.order = "per_field"`, whose
/// event's first effect key is the field seqs hash).
pub fn state_code(event: &Event, effects: &Effects, per_field: bool) -> &'static str {
    match (event.op, &effects.state, per_field) {
        (Op::Delete, _, false) => "delete",
        (Op::Upsert, StateEffect::Merge, false) => "merge",
        (Op::Upsert, StateEffect::Replace, false) => "replace",
        (Op::Upsert, StateEffect::Keep, false) => "keep",
        (Op::Delete, _, true) => "field:delete",
        (Op::Upsert, StateEffect::Merge, true) => "field:merge",
        (Op::Upsert, StateEffect::Replace, true) => "field:replace",
        (Op::Upsert, StateEffect::Keep, true) => "field:keep",
    }
}

/// What the events of one call share with others of their topic and
/// partition, sent once per call (the script's "contexts") instead of once
/// per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context<'a> {
    /// When the current generation's id hash expires (Unix ms).
    pub expire_at_ms: u64,
    /// The entity's offset mark field for the partition ("" for none).
    pub mark_field: &'a str,
    /// The run that decides the records (the marks' first part).
    pub run_start: i64,
    pub dense: bool,
    /// The topic named in the changes written to the outbox; "" when the
    /// topic's changes do not go there.
    pub changelog: &'a str,
}

impl<'a> Context<'a> {
    pub fn of(input: &GuardInput<'a>, expire_at_ms: u64) -> Context<'a> {
        let policy = input.policy;
        Context {
            expire_at_ms,
            mark_field: input.place.map_or("", |p| p.mark_field),
            run_start: input.place.map_or(0, |p| p.run_start),
            dense: policy.dense_seqs,
            changelog: if policy.changelog { &policy.topic } else { "" },
        }
    }

    /// Its five arguments: expire_at_ms, mark_field, the marks' prefix
    /// ("<run start>:", "" without a mark field), dense ("1" or ""), changelog.
    pub fn push_args(&self, cmd: &mut redis::Cmd) {
        cmd.arg(self.expire_at_ms).arg(self.mark_field);
        if self.mark_field.is_empty() {
            cmd.arg("");
        } else {
            cmd.arg(format!("{}:", self.run_start));
        }
        cmd.arg(if self.dense { "1" } else { "" })
            .arg(self.changelog);
    }
}

/// The distinct contexts of a call, and each event's (1-based, as the
/// script reads it). A call holds few (one per topic and partition).
pub fn contexts<'a>(
    of_events: impl Iterator<Item = Context<'a>>,
) -> (Vec<Context<'a>>, Vec<usize>) {
    let mut distinct: Vec<Context<'a>> = Vec::new();
    let mut index = Vec::new();
    for ctx in of_events {
        let at = match distinct.iter().position(|c| *c == ctx) {
            Some(at) => at,
            None => {
                distinct.push(ctx);
                distinct.len() - 1
            }
        };
        index.push(at + 1);
    }
    (distinct, index)
}

/// One event's arguments (after the call's contexts): its context's
/// number, then its own head, state fields, effect keys and mutations.
pub fn push_event_args(
    cmd: &mut redis::Cmd,
    input: &GuardInput<'_>,
    context: usize,
    parts: &EffectParts,
) {
    let e = input.event;
    let effects = input.effects;
    let set: Vec<&(String, String)> = e
        .set
        .iter()
        .filter(|(k, _)| effects.writes_field(k))
        .collect();
    let unset: Vec<&String> = e.unset.iter().filter(|k| effects.writes_field(k)).collect();
    cmd.arg(context)
        .arg(&e.id)
        .arg(&id_hash(&e.id).to_be_bytes()[..])
        .arg(&e.fingerprint.to_be_bytes()[..])
        .arg(format!("{:016x}", e.fingerprint))
        .arg(e.seq)
        .arg(input.place.map_or(0, |p| p.offset));
    let policy = input.policy;
    cmd.arg(state_code(e, effects, policy.per_field()))
        .arg(set.len());
    for (k, v) in set {
        cmd.arg(k).arg(v);
    }
    cmd.arg(unset.len());
    for k in unset {
        cmd.arg(k);
    }
    cmd.arg(parts.keys.len())
        .arg(e.kind.as_deref().unwrap_or(""))
        .arg(effects.mutations.len());
    for a in &parts.args {
        cmd.arg(a);
    }
    if policy.changelog {
        cmd.arg(e.ts.as_deref().unwrap_or(""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::Amount;

    #[test]
    fn keys_are_named_once_and_args_follow_the_script_layout() {
        let event = Event {
            ts: None,
            change: None,
            id: "i".into(),
            entity: "e".into(),
            seq: 3,
            op: Op::Upsert,
            kind: None,
            set: vec![("tag".into(), "vip".into())],
            unset: vec![],
            fingerprint: 0,
        };
        let effects = Effects {
            mutations: vec![
                Mutation::Count {
                    field: "b".into(),
                    amount: Amount {
                        units: -5,
                        scale: 2,
                    },
                },
                Mutation::SetAdd {
                    set: "s".into(),
                    member: "vip".into(),
                },
                Mutation::Custom {
                    snippet: 0,
                    order: Order::Ordered,
                },
            ],
            ..Effects::default()
        };
        let entity = crate::store::KeyLayout::new("p").entity("e");
        let parts = EffectParts::new(&entity, &event, &effects, false);
        assert_eq!(
            parts.keys,
            ["p:{e}:counters", "p:{e}:set:s", "p:{e}:set:s:seq"]
        );
        let args: Vec<&str> = parts.args.iter().map(String::as_str).collect();
        assert_eq!(
            args,
            [
                "counter", "1", "b", "-5", "2", "set_add", "2", "3", "vip", "custom", "1", "1",
                "ordered", "1", "tag", "vip"
            ]
        );
        assert_eq!(
            EffectParts::new(&entity, &event, &Effects::default(), false),
            EffectParts::default()
        );
    }
}
