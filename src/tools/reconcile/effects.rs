//! Reconcile's check of the commutative state (docs/effects.md): counters,
//! ledgers and sets against what the log's events make them.

use std::collections::BTreeSet;

use super::DivergenceKind;
use crate::config::{Config, TopicPolicy};
use crate::model::EntityModel;
use crate::store::{self, KeyLayout, StoreError};

/// What of the commutative state (docs/effects.md) reconcile compares.
pub(super) struct EffectsCheck {
    /// Ledgers trimmed by length only (the model cannot know when an age
    /// trim ran).
    streams: Vec<String>,
    sets: Vec<String>,
    /// Fields written by custom effects: the model does not run Lua.
    unmodelled: BTreeSet<String>,
}

impl EffectsCheck {
    /// `None` when the topic has no commutative effects.
    pub(super) fn of(config: &Config, policy: &TopicPolicy) -> Option<EffectsCheck> {
        let effects = &config.effects;
        if !policy.has_commutative() {
            return None;
        }
        let rules = || policy.rules.iter();
        let (_, sets) = effects.names();
        Some(EffectsCheck {
            streams: rules()
                .filter_map(|r| r.ledger.as_ref())
                .filter(|l| l.max_age.is_none())
                .map(|l| l.stream.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            sets,
            unmodelled: effects
                .snippets
                .iter()
                .flat_map(|s| s.writes.iter().cloned())
                .collect(),
        })
    }

    /// `EffectsDiffer` when Redis's counters, ledgers or sets are not what
    /// `want` says (`WindowAmbiguous` when they are what `kept` says).
    pub(super) async fn judge(
        &self,
        conn: &mut store::RedisConn,
        layout: &KeyLayout,
        entity: &str,
        want: &EntityModel,
        kept: Option<&EntityModel>,
    ) -> Result<Option<DivergenceKind>, StoreError> {
        let mut got =
            store::commutative::read(conn, layout, entity, &self.streams, &self.sets).await?;
        got.counters.retain(|k, _| !self.unmodelled.contains(k));
        let expected = |m: &EntityModel| {
            let mut v = m.commutative_view();
            v.counters.retain(|k, _| !self.unmodelled.contains(k));
            v.ledgers.retain(|k, _| self.streams.contains(k));
            v
        };
        Ok(if got == expected(want) {
            None
        } else if kept.is_some_and(|k| got == expected(k)) {
            Some(DivergenceKind::WindowAmbiguous)
        } else {
            Some(DivergenceKind::EffectsDiffer)
        })
    }
}
