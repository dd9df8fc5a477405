//! What the report says of one diverged entity beyond its kind: each field
//! that differs (expected, found), and why an entity was not repaired.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::DivergenceKind;

/// One field of the state hash that Redis holds otherwise than the log makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldDifference {
    pub field: String,
    /// What the log's events make it (`None`: absent).
    pub expected: Option<String>,
    /// What Redis holds (`None`: absent).
    pub found: Option<String>,
}

/// The pseudo-field for a tombstone (an applied delete) on one side only.
pub const TOMBSTONE: &str = "(deleted)";

/// Every field whose value differs between `expected` and `found`, in
/// field order, with a tombstone on one side only as [`TOMBSTONE`].
pub fn field_differences(
    expected: &BTreeMap<String, String>,
    expected_deleted: bool,
    found: &BTreeMap<String, String>,
    found_deleted: bool,
) -> Vec<FieldDifference> {
    let fields: BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    let mut out: Vec<FieldDifference> = fields
        .into_iter()
        .filter(|f| expected.get(*f) != found.get(*f))
        .map(|f| FieldDifference {
            field: f.clone(),
            expected: expected.get(f).cloned(),
            found: found.get(f).cloned(),
        })
        .collect();
    if expected_deleted != found_deleted {
        out.push(FieldDifference {
            field: TOMBSTONE.to_string(),
            expected: Some(expected_deleted.to_string()),
            found: Some(found_deleted.to_string()),
        });
    }
    out
}

/// How a reconcile run treats one divergence.
#[derive(Debug, Clone, Copy)]
pub struct RepairAsked {
    pub repair: bool,
    pub delete_extra: bool,
}

/// Why a divergence of `kind` was not repaired (`None`: it was, or it is
/// informational). `wrote`: whether the repair step changed Redis.
pub fn not_repaired_reason(
    kind: DivergenceKind,
    asked: RepairAsked,
    wrote: bool,
) -> Option<&'static str> {
    use DivergenceKind::*;
    if !kind.is_divergence() || wrote {
        return None;
    }
    Some(match kind {
        SeqAhead => "Redis is newer than the log (retention removed events, or another topic writes this entity): a repair would lower its seq",
        EffectsDiffer => "counters, ledgers and sets are not rewritten in place: rebuild them beside the live view (docs/operations.md)",
        OffsetMarkAhead => "the log lost records idem decided (an unclean leader election): see docs/guarantees.md, offsets reused in place",
        _ if !asked.repair => "not asked: run with --repair",
        EntityNotInLog if !asked.delete_extra => "not deleted without --delete-extra (retention may have removed its events)",
        _ => "Redis changed while reconcile ran (a newer event was applied since it read the log): run reconcile again",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn differences_name_each_field_with_both_sides() {
        let want = map(&[("status", "paid"), ("total", "12.5")]);
        let found = map(&[("status", "new"), ("total", "12.5"), ("note", "x")]);
        assert_eq!(
            field_differences(&want, false, &found, true),
            vec![
                FieldDifference {
                    field: "note".into(),
                    expected: None,
                    found: Some("x".into())
                },
                FieldDifference {
                    field: "status".into(),
                    expected: Some("paid".into()),
                    found: Some("new".into())
                },
                FieldDifference {
                    field: TOMBSTONE.into(),
                    expected: Some("false".into()),
                    found: Some("true".into())
                },
            ]
        );
    }

    #[test]
    fn every_divergence_not_repaired_has_a_reason() {
        let asked = RepairAsked {
            repair: true,
            delete_extra: false,
        };
        for kind in [
            DivergenceKind::MissingEntity,
            DivergenceKind::SeqBehind,
            DivergenceKind::SeqAhead,
            DivergenceKind::StateDiffers,
            DivergenceKind::EntityNotInLog,
            DivergenceKind::EffectsDiffer,
            DivergenceKind::OffsetMarkAhead,
        ] {
            assert!(
                not_repaired_reason(kind, asked, false).is_some(),
                "{kind:?}"
            );
            assert_eq!(not_repaired_reason(kind, asked, true), None, "{kind:?}");
        }
        assert_eq!(
            not_repaired_reason(DivergenceKind::SpansPartitions, asked, false),
            None
        );
    }
}
