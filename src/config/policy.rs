//! A topic's policy: everything its events are decided under (the dedupe
//! window, dense seqs, the changelog, the state's order, the dead-letter
//! topic, the effect rules), resolved once from the checked config and
//! handed around by reference. The data path resolves each consumed topic
//! once per start ([`Policies`]); a tool resolves the topics it reads once
//! each ([`Config::policy`]). Nothing decides from the config's sections
//! per event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Config;
use crate::effects::{pick_rule, plan, Effects, Order, Rule, StateOrder};
use crate::event::{Event, Invalid};

/// What the events of one topic are decided under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicPolicy {
    pub topic: String,
    /// How long an id is remembered (`dedupe.window`, `dedupe.windows`).
    pub window: Duration,
    /// Whether the topic numbers its entities' seqs densely
    /// (`dedupe.dense_seq_topics`): the guard then recognises a decided seq
    /// whatever the window.
    pub dense_seqs: bool,
    /// Whether its changes go to the outbox (`changelog.topics`): the guard
    /// writes each change it makes there, naming this topic.
    pub changelog: bool,
    /// How a state write meets order (`state.order`, one mode per keyspace).
    pub state_order: StateOrder,
    /// Where its invalid records and conflicts go (`dlq.topic`).
    pub dead_letter_topic: String,
    /// Its `[[effects]]` rules, in the config's order.
    pub rules: Vec<Rule>,
}

impl TopicPolicy {
    /// `event`'s effects: the rule naming its type, else the topic's
    /// catch-all, else a merge of every field (`effects::plan`).
    pub fn plan(&self, event: &Event) -> Result<Effects, Invalid> {
        plan(event, pick_rule(self.rules.iter(), event.kind.as_deref()))
    }

    /// Whether some event of the topic has an effect that applies to a late
    /// event too (so a replay from before the dedupe window counts again).
    pub fn has_commutative(&self) -> bool {
        self.rules.iter().any(|r| {
            r.changes
                || !r.counters.is_empty()
                || r.ledger.is_some()
                || !r.sets.is_empty()
                || r.custom.iter().any(|c| c.order == Order::Commutative)
        })
    }

    /// Whether its state is ordered per field (`state.order = "per_field"`).
    pub fn per_field(&self) -> bool {
        self.state_order == StateOrder::PerField
    }
}

impl Config {
    /// `topic`'s policy, resolved from the sections that say it.
    pub fn policy(&self, topic: &str) -> TopicPolicy {
        TopicPolicy {
            topic: topic.to_string(),
            window: self.dedupe.window_for(topic),
            dense_seqs: self.dedupe.dense_seq_topics.iter().any(|t| t == topic),
            changelog: self.changelog.topics.iter().any(|t| t == topic),
            state_order: self.effects.state_order,
            dead_letter_topic: self.dlq.topic_for(topic),
            rules: self
                .effects
                .rules
                .iter()
                .filter(|r| r.topic == topic)
                .cloned()
                .collect(),
        }
    }
}

/// The policies of the consumed topics (`kafka.topics`), resolved once when
/// consumption starts and shared by the fetch loop and the guard stage.
#[derive(Debug, Clone)]
pub struct Policies {
    config: Arc<Config>,
    by_topic: HashMap<String, Arc<TopicPolicy>>,
}

impl Policies {
    pub fn of(config: Arc<Config>) -> Policies {
        let by_topic = config
            .kafka
            .topics
            .iter()
            .map(|t| (t.clone(), Arc::new(config.policy(t))))
            .collect();
        Policies { config, by_topic }
    }

    /// `topic`'s policy. A topic outside `kafka.topics` (a consumer is only
    /// ever assigned those) is resolved on the spot rather than refused.
    pub fn get(&self, topic: &str) -> Arc<TopicPolicy> {
        match self.by_topic.get(topic) {
            Some(policy) => Arc::clone(policy),
            None => Arc::new(self.config.policy(topic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::{Mutation, StateEffect};
    use crate::event::Op;

    /// A config from TOML text (`SNIPPET` stands for a readable Lua file).
    fn config(toml: &str) -> Config {
        super::super::effects::tests::load(toml).unwrap()
    }

    /// Each field comes from its own key, for the topic named and no other.
    #[test]
    fn a_topics_policy_is_what_each_key_says_of_it() {
        let c = config(
            "[kafka]\ntopics = [\"a\", \"b\"]\n\
             [dedupe]\nwindow = \"1h\"\nwindows = \"b=2h\"\ndense_seq_topics = [\"a\"]\n\
             [changelog]\ntopics = [\"b\"]\n\
             [dlq]\ntopic = \"{topic}.dead\"\n\
             [state]\norder = \"per_field\"\n\
             [[effects]]\ntopic = \"a\"\ncounters = [{ field = \"n\", by = \"1\" }]\n",
        );
        let a = c.policy("a");
        let b = c.policy("b");
        assert_eq!(a.window, Duration::from_secs(3600));
        assert_eq!(b.window, Duration::from_secs(7200));
        assert!(a.dense_seqs && !b.dense_seqs);
        assert!(!a.changelog && b.changelog);
        assert_eq!((a.per_field(), b.per_field()), (true, true));
        assert_eq!(a.dead_letter_topic, "a.dead");
        assert_eq!(b.dead_letter_topic, "b.dead");
        assert!(a.has_commutative() && !b.has_commutative());
        assert_eq!(a.rules.len(), 1);
        assert!(b.rules.is_empty());
    }

    /// A topic has effects that apply to a late event when any rule of it
    /// counts, appends, adds or removes set members, applies a change's
    /// effects, or runs a commutative custom effect; not for state rules
    /// or ordered custom effects alone.
    #[test]
    fn a_topic_has_commutative_effects_by_its_rules() {
        let table = [
            ("counters = [{ field = \"n\", by = \"1\" }]", true),
            ("ledger = { max_len = 5 }", true),
            ("set_add = [{ set = \"s\", from = \"/m\" }]", true),
            ("set_remove = [{ set = \"s\", from = \"/m\" }]", true),
            (
                "types = [\"idem.change\"]\nchanges = true\nledger = { max_len = 5 }",
                true,
            ),
            (
                "custom = [{ file = \"SNIPPET\", order = \"commutative\", writes = [\"p\"] }]",
                true,
            ),
            (
                "custom = [{ file = \"SNIPPET\", order = \"ordered\", writes = [\"p\"] }]",
                false,
            ),
            ("state = \"replace\"", false),
        ];
        for (body, want) in table {
            let c = config(&format!(
                "[dedupe]\ndense_seq_topics = [\"t\"]\n[[effects]]\ntopic = \"t\"\n{body}\n"
            ));
            assert_eq!(c.policy("t").has_commutative(), want, "{body}");
            assert!(!c.policy("u").has_commutative(), "{body}");
        }
    }

    /// An event is planned by the rule naming its type, else the topic's
    /// catch-all, else as a merge of every field; another topic's rules
    /// never apply.
    #[test]
    fn an_event_is_planned_by_its_topics_rule_for_its_type() {
        let c = config(
            "[[effects]]\ntopic = \"t\"\ntypes = [\"deposit\"]\ncounters = [{ field = \"n\", by = \"1\" }]\n\
             [[effects]]\ntopic = \"t\"\nstate = \"keep\"\n\
             [[effects]]\ntopic = \"u\"\nstate = \"replace\"\n",
        );
        let event = |kind: Option<&str>| Event {
            ts: None,
            change: None,
            id: "i".into(),
            entity: "e".into(),
            seq: 1,
            op: Op::Upsert,
            kind: kind.map(String::from),
            set: vec![],
            unset: vec![],
            fingerprint: 0,
        };
        let t = c.policy("t");
        let deposit = t.plan(&event(Some("deposit"))).unwrap();
        assert!(matches!(&deposit.mutations[..], [Mutation::Count { field, .. }] if field == "n"));
        assert_eq!(
            t.plan(&event(Some("other"))).unwrap().state,
            StateEffect::Keep
        );
        assert_eq!(t.plan(&event(None)).unwrap().state, StateEffect::Keep);
        let plain = c.policy("v").plan(&event(Some("deposit"))).unwrap();
        assert_eq!(plain, Effects::default());
        assert_eq!(
            c.policy("u").plan(&event(None)).unwrap().state,
            StateEffect::Replace
        );
    }

    /// The shared policies are the ones `Config::policy` resolves, and a
    /// topic outside `kafka.topics` still gets its own.
    #[test]
    fn policies_hold_each_consumed_topic_and_resolve_any_other() {
        let c = Arc::new(config(
            "[kafka]\ntopics = [\"a\"]\n[dedupe]\nwindows = \"a=2h,z=3h\"\n",
        ));
        let policies = Policies::of(Arc::clone(&c));
        assert_eq!(*policies.get("a"), c.policy("a"));
        assert!(Arc::ptr_eq(&policies.get("a"), &policies.get("a")));
        assert_eq!(policies.get("z").window, Duration::from_secs(3 * 3600));
    }
}
