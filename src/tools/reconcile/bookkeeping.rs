//! Reconcile's check of what idem keeps beside the state to decide order
//! and re-reads (docs/guarantees.md): the dense-seq record, the per-field
//! seqs and the offset marks of the topic's incarnation.
//!
//! The dense-seq record and the field seqs follow from the log's events in
//! each partition's order, as the state does. An offset mark does not (its
//! run start depends on where consumption started), but it can never lie
//! past the entity's last record in its partition: one that does, at an
//! offset this read of the log covers, says the log lost records that idem
//! decided (an unclean leader election, a truncation), and the records
//! written at those offsets since would be taken as re-reads. A mark past
//! what was read (idem decided more since the read began) or below it
//! (retention removed the record) says nothing.

use std::collections::{BTreeMap, HashMap};

use super::DivergenceKind;
use crate::config::TopicPolicy;
use crate::consumed::{Mark, TopicId};
use crate::model::EntityModel;
use crate::store::{self, EntityView, KeyLayout, StoreError};

/// What of the bookkeeping reconcile compares for one topic.
pub(super) struct BookkeepingCheck {
    dense: bool,
    per_field: bool,
    /// `o:<topic id>:`, the mark fields of the topic as it is now (`None`:
    /// the brokers give no id, and idem keeps no marks).
    mark_prefix: Option<String>,
    /// Partition → offsets of the first and the last record read.
    spans: HashMap<i32, (i64, i64)>,
}

impl BookkeepingCheck {
    pub(super) fn of(
        policy: &TopicPolicy,
        id: Option<&TopicId>,
        spans: HashMap<i32, (i64, i64)>,
    ) -> Self {
        BookkeepingCheck {
            dense: policy.dense_seqs,
            per_field: policy.per_field(),
            mark_prefix: id.map(|id| format!("o:{}:", id.short())),
            spans,
        }
    }

    /// The first kind of bookkeeping that differs from the log's, if any
    /// (`WindowAmbiguous` where it is what `kept` says instead).
    /// `last_offsets`: partition → offset of the entity's last record there.
    pub(super) async fn judge(
        &self,
        conn: &mut store::RedisConn,
        layout: &KeyLayout,
        view: &EntityView,
        want: &EntityModel,
        kept: Option<&EntityModel>,
        last_offsets: Option<&BTreeMap<i32, i64>>,
    ) -> Result<Option<DivergenceKind>, StoreError> {
        if self.mark_ahead(view, last_offsets) {
            return Ok(Some(DivergenceKind::OffsetMarkAhead));
        }
        let either = |same: &dyn Fn(&EntityModel) -> bool, kind| {
            if same(want) {
                None
            } else if kept.is_some_and(same) {
                Some(DivergenceKind::WindowAmbiguous)
            } else {
                Some(kind)
            }
        };
        if self.dense {
            let same = |m: &EntityModel| dense_fields(m) == view.dense_seqs;
            if let Some(kind) = either(&same, DivergenceKind::DenseSeqsDiffer) {
                return Ok(Some(kind));
            }
        }
        if self.per_field {
            let order = store::read_field_order(conn, layout, &view.entity).await?;
            let same = |m: &EntityModel| m.field_seqs == order.field_seqs;
            return Ok(either(&same, DivergenceKind::FieldSeqsDiffer));
        }
        Ok(None)
    }

    /// Whether a mark of this incarnation lies past the entity's last
    /// record in its partition.
    fn mark_ahead(&self, view: &EntityView, last_offsets: Option<&BTreeMap<i32, i64>>) -> bool {
        let Some(prefix) = &self.mark_prefix else {
            return false;
        };
        view.offset_marks.iter().any(|(field, text)| {
            let partition = field
                .strip_prefix(prefix.as_str())
                .and_then(|p| p.parse::<i32>().ok());
            let (Some(p), Some(mark)) = (partition, Mark::decode(text)) else {
                return false;
            };
            let read = self.spans.get(&p);
            let within =
                read.is_some_and(|&(first, last)| first <= mark.offset && mark.offset <= last);
            within
                && last_offsets
                    .and_then(|l| l.get(&p))
                    .is_none_or(|&own| mark.offset > own)
        })
    }
}

/// The dense-seq fields as the guard stores them for `model`.
fn dense_fields(model: &EntityModel) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    if let Some((mark, above, closed)) = model.dense.as_ref().map(|d| d.encode()) {
        fields.insert("dense".to_string(), mark);
        if let Some(above) = above {
            fields.insert("dense_above".to_string(), above);
        }
        if let Some(closed) = closed {
            fields.insert("dense_closed".to_string(), closed);
        }
    }
    fields
}
