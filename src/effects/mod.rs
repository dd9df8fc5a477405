//! Effects: what an event does to its entity, declared per topic and event
//! type (docs/effects.md), and the pure planning of one event's effects.
//!
//! Guarantee: an event's effects are planned without I/O and completely
//! before anything is written: an amount that is not a number, has too many
//! decimals or a missing field makes the whole event invalid (dead-lettered
//! with the reason), never a part of it. What only Redis can decide (a
//! counter that would overflow, a custom effect that fails) is checked by
//! the guard script before its first write, with the same all-or-nothing rule.
//!
//! Two kinds, by how they meet order:
//! - *ordered* (the state: merge, replace, delete; ordered custom effects)
//!   applies only when the event's seq is newer than the entity's;
//! - *commutative* (counters, ledger entries, set adds and removes,
//!   commutative custom effects) applies exactly once per event, whatever
//!   its seq, so a late deposit still counts.

pub mod decimal;
mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use decimal::{Amount, AmountError};
pub use plan::{data_value, plan};

/// Whether `name` may name a set or a ledger stream: not empty, no `:`
/// (which would reach another key, like a set's `<set>:seq`).
pub fn is_key_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(':')
}

/// What happens to the state hash when the event is newer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StateEffect {
    /// Merge the data fields (all, or only `fields`) into the state.
    #[default]
    Merge,
    /// The state becomes the data fields (only `fields`, if given).
    Replace,
    /// The state is left as it is (the seq still advances).
    Keep,
}

impl StateEffect {
    /// As written in the config (`state = "merge"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            StateEffect::Merge => "merge",
            StateEffect::Replace => "replace",
            StateEffect::Keep => "keep",
        }
    }
}

/// How the state hash meets order (`[state] order`, docs/effects.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateOrder {
    /// One seq per entity: an event not newer than the entity's recorded
    /// seq writes no state (`stale`, or `late` with commutative effects).
    #[default]
    PerEntity,
    /// Each data field remembers the seq that wrote it (a sibling hash): a
    /// field is written when the event's seq is newer than its own writer's,
    /// and a replace or delete sets a floor below which fields are removed
    /// and later writes refused. The state then equals in-order application
    /// whatever the arrival order.
    PerField,
}

impl StateOrder {
    /// The config's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StateOrder::PerEntity => "per_entity",
            StateOrder::PerField => "per_field",
        }
    }
}

/// Whether an effect waits for order or commutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ordered,
    Commutative,
}

/// Where a counter's amount comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountSource {
    /// A JSON pointer into the event's `data` (`/amount`, `/money/value`).
    Pointer(String),
    Constant(Amount),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSpec {
    pub field: String,
    pub amount: AmountSource,
    pub scale: u8,
    /// Subtract the amount instead of adding it (a withdrawal).
    pub subtract: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSpec {
    pub stream: String,
    /// Data fields copied into each entry (all when `None`).
    pub fields: Option<Vec<String>>,
    pub max_len: Option<u64>,
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub set: String,
    /// A JSON pointer into `data`: the member.
    pub member: String,
    pub remove: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomSpec {
    /// Index into [`EffectsConfig::snippets`].
    pub snippet: usize,
    pub order: Order,
}

/// A user's Lua snippet (docs/effects.md): pure, it gets the entity's
/// values and the event and returns fields to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    pub file: String,
    pub source: String,
    /// The only fields it may return.
    pub writes: Vec<String>,
}

/// The effects of one topic's events of some types.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub topic: String,
    /// Event types this rule is for; empty: every type without its own rule.
    pub types: Vec<String>,
    pub state: StateEffect,
    /// The data fields the state effect writes (all when `None`).
    pub fields: Option<Vec<String>>,
    pub counters: Vec<CounterSpec>,
    pub ledger: Option<LedgerSpec>,
    pub sets: Vec<SetSpec>,
    pub custom: Vec<CustomSpec>,
    /// The events are idem change records (`changes = true`, docs/change-stream.md,
    /// "A chained idem"): besides the state, each applies what its `change`
    /// says: counters set to their values after, set members added or
    /// removed, ledger entries appended (trimmed as `ledger` says, if given).
    pub changes: bool,
}

/// Every declared effect (`[[effects]]` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EffectsConfig {
    pub rules: Vec<Rule>,
    pub snippets: Vec<Snippet>,
    /// How every event's state write meets order (one mode per keyspace).
    pub state_order: StateOrder,
}

impl EffectsConfig {
    /// The rule for an event of `kind` on `topic` (see [`pick_rule`]).
    pub fn rule_for(&self, topic: &str, kind: Option<&str>) -> Option<&Rule> {
        pick_rule(self.rules.iter().filter(|r| r.topic == topic), kind)
    }

    /// Each rule in a line, as the start-up log shows them, e.g.
    /// `orders/deposit: merge amount, counter balance, ledger ledger`.
    pub fn describe(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|r| {
                let types = if r.types.is_empty() {
                    "*".to_string()
                } else {
                    r.types.join("|")
                };
                let mut parts = vec![match (&r.state, &r.fields) {
                    (StateEffect::Keep, _) => "keep".to_string(),
                    (state, Some(fields)) => format!("{} {}", state.as_str(), fields.join(" ")),
                    (state, None) => state.as_str().to_string(),
                }];
                if r.changes {
                    parts.push("the change's counters, sets and ledger entries".to_string());
                }
                parts.extend(r.counters.iter().map(|c| format!("counter {}", c.field)));
                parts.extend(r.ledger.iter().map(|l| format!("ledger {}", l.stream)));
                parts.extend(r.sets.iter().map(|s| format!("set {}", s.set)));
                parts.extend(r.custom.iter().map(|c| {
                    let file = self
                        .snippets
                        .get(c.snippet)
                        .map_or("?", |s| s.file.as_str());
                    format!("custom {}", file.rsplit('/').next().unwrap_or(file))
                }));
                format!("{}/{types}: {}", r.topic, parts.join(", "))
            })
            .collect()
    }

    /// Every declared ledger stream and set name (sorted, once each).
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        let streams: BTreeSet<String> = self
            .rules
            .iter()
            .filter_map(|r| r.ledger.as_ref().map(|l| l.stream.clone()))
            .collect();
        let sets: BTreeSet<String> = self
            .rules
            .iter()
            .flat_map(|r| r.sets.iter().map(|s| s.set.clone()))
            .collect();
        (streams.into_iter().collect(), sets.into_iter().collect())
    }
}

/// Among one topic's `rules`: the one naming `kind`, else the catch-all
/// (no types), else none (merge, as without effects).
pub fn pick_rule<'a>(
    rules: impl Iterator<Item = &'a Rule> + Clone,
    kind: Option<&str>,
) -> Option<&'a Rule> {
    let named = kind.and_then(|k| rules.clone().find(|r| r.types.iter().any(|t| t == k)));
    named.or_else(|| rules.clone().find(|r| r.types.is_empty()))
}

/// One commutative or custom change, ready for the guard and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Count {
        field: String,
        amount: Amount,
    },
    /// A counter set to a value (`None`: removed), as a change record of
    /// another idem says it is after the change: ordered, the last version
    /// wins.
    SetCounter {
        field: String,
        value: Option<String>,
    },
    Append {
        stream: String,
        entry: Vec<(String, String)>,
        max_len: u64,
        max_age_ms: u64,
    },
    SetAdd {
        set: String,
        member: String,
    },
    SetRemove {
        set: String,
        member: String,
    },
    Custom {
        snippet: usize,
        order: Order,
    },
}

impl Mutation {
    /// Whether it applies to a late event too.
    pub fn commutes(&self) -> bool {
        !matches!(
            self,
            Mutation::SetCounter { .. }
                | Mutation::Custom {
                    order: Order::Ordered,
                    ..
                }
        )
    }
}

/// Merge every field, nothing else: the effects of an event without a rule.
pub static MERGE: Effects = Effects {
    state: StateEffect::Merge,
    fields: None,
    mutations: Vec::new(),
};

/// An event's planned effects. The default is today's merge of every field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Effects {
    pub state: StateEffect,
    pub fields: Option<Vec<String>>,
    pub mutations: Vec<Mutation>,
}

impl Effects {
    /// Whether any part applies to a late event.
    pub fn commutes(&self) -> bool {
        self.mutations.iter().any(Mutation::commutes)
    }

    /// Whether the state effect writes data field `name`.
    pub fn writes_field(&self, name: &str) -> bool {
        self.state != StateEffect::Keep
            && self
                .fields
                .as_ref()
                .is_none_or(|f| f.iter().any(|x| x == name))
    }
}

/// Counters, ledgers and sets of one entity, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommutativeView {
    /// Counter field → stored decimal (and commutative custom effects' fields).
    pub counters: BTreeMap<String, String>,
    /// Stream → entries (fields, without the stream ids), oldest first.
    pub ledgers: BTreeMap<String, Vec<Vec<(String, String)>>>,
    /// Set → members (absent when empty).
    pub sets: BTreeMap<String, BTreeSet<String>>,
    /// Set → member → seq of the newest add or remove that touched it.
    pub set_seqs: BTreeMap<String, BTreeMap<String, u64>>,
}
