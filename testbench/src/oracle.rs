//! The oracle: what idem must have done with a stream, from the pure model.

use std::collections::HashMap;

use idem::event::{decode, FieldMap};
use idem::model::{Model, Outcome};
use idem::tools::sample::SampleRecord;

/// The model applied to `records` in order (the order a keyed producer
/// delivers them per entity), with the count of each outcome.
pub fn oracle(records: &[SampleRecord]) -> (Model, HashMap<Outcome, u64>) {
    let mut model = Model::default();
    let mut counts = HashMap::new();
    for r in records {
        let outcome = match decode(Some(&r.value), &FieldMap::default(), 1 << 20) {
            Ok(e) => model.apply(&e),
            Err(_) => Outcome::Invalid,
        };
        *counts.entry(outcome).or_insert(0) += 1;
    }
    (model, counts)
}
