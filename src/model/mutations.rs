//! The mutations (counters, ledgers, sets, custom effects) as
//! `mutations.lua` plans and writes them: all or none, the commutative
//! ones when late too.

use super::entity::EntityModel;
use crate::effects::{Amount, Effects, Mutation, Order};
use crate::event::Event;

impl EntityModel {
    /// The counters, ledgers and sets as Redis stores them.
    pub fn commutative_view(&self) -> crate::effects::CommutativeView {
        crate::effects::CommutativeView {
            counters: self
                .counters
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            ledgers: self
                .ledgers
                .iter()
                .filter(|(_, l)| !l.is_empty())
                .map(|(k, l)| (k.clone(), l.clone()))
                .collect(),
            sets: self
                .sets
                .iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(k, m)| (k.clone(), m.clone()))
                .collect(),
            set_seqs: self.set_seqs.clone(),
        }
    }

    /// Applies the mutations that apply (all when newer, the commutative
    /// ones when late), all or none: false when a counter would overflow.
    pub(super) fn apply_mutations(
        &mut self,
        event: &Event,
        effects: &Effects,
        newer: bool,
    ) -> bool {
        let mut counters = self.counters.clone();
        for m in &effects.mutations {
            if let Mutation::Count { field, amount } = m {
                let now = counters
                    .get(field)
                    .copied()
                    .unwrap_or(Amount::zero(amount.scale));
                let Some(sum) = now.checked_add(*amount) else {
                    return false;
                };
                counters.insert(field.clone(), sum);
            }
        }
        self.counters = counters;
        let seq = event.seq;
        for m in &effects.mutations {
            match m {
                Mutation::Count { .. } => {}
                Mutation::SetCounter { field, value } => {
                    if !newer {
                        continue;
                    }
                    match value.as_deref().map(stored_counter) {
                        None => {
                            self.counters.remove(field);
                        }
                        Some(Some(amount)) => {
                            self.counters.insert(field.clone(), amount);
                        }
                        // Not a decimal (a custom effect's value): the model
                        // cannot hold it, as for custom effects.
                        Some(None) => self.ran_custom = true,
                    }
                }
                Mutation::Append {
                    stream,
                    entry,
                    max_len,
                    ..
                } => {
                    let ledger = self.ledgers.entry(stream.clone()).or_default();
                    ledger.push(entry.clone());
                    if *max_len > 0 && ledger.len() as u64 > *max_len {
                        ledger.drain(..ledger.len() - *max_len as usize);
                    }
                }
                Mutation::SetAdd { set, member } | Mutation::SetRemove { set, member } => {
                    let remove = matches!(m, Mutation::SetRemove { .. });
                    let seqs = self.set_seqs.entry(set.clone()).or_default();
                    let wins = match seqs.get(member) {
                        None => true,
                        Some(&last) => seq > last || (remove && seq == last),
                    };
                    if wins {
                        seqs.insert(member.clone(), seq);
                        let members = self.sets.entry(set.clone()).or_default();
                        if remove {
                            members.remove(member);
                        } else {
                            members.insert(member.clone());
                        }
                    }
                }
                Mutation::Custom { order, .. } => {
                    self.ran_custom |= newer || *order == Order::Commutative;
                }
            }
        }
        true
    }
}

/// A counter's stored text (`12.50`, `-3`) as an amount at the scale it is
/// written with.
fn stored_counter(text: &str) -> Option<Amount> {
    let scale = text.split_once('.').map_or(0, |(_, d)| d.len());
    Amount::parse(text, u8::try_from(scale).ok()?).ok()
}
