//! Tying a replay's commits to Redis, as idem's own start does (`resume`):
//! the commits name Redis's epoch, so a loss of Redis after the replay is
//! seen and repaired like any other. And first, a replay must not erase the
//! evidence of a loss that happened before it: a commit naming an epoch
//! Redis no longer holds is how the next start knows to re-read the log.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::offsets::TopicPartition;
use crate::pipeline::judged_start;
use crate::resume::{Cause, Start};
use crate::store::progress::ProgressStore;
use crate::tools::replay::{PlanRow, ReplayPlan};

/// Whether moving `row` would hide a loss the next start would repair.
///
/// | Redis, against the current commit           | current commit  | new offset      | hides |
/// |---------------------------------------------|-----------------|-----------------|-------|
/// | holds it (or went back: records say where)  | any             | any             | no    |
/// | lost it (marker gone or renewed)            | past log start  | the log's start | no: everything left is re-read |
/// | lost it                                     | past log start  | later           | yes   |
/// | lost it, or ambiguous                       | at log start    | any             | no: nothing before it |
/// | ambiguous (a plain commit, Redis empty)     | past log start  | the log's start | no    |
/// | ambiguous                                   | past log start  | later           | yes   |
pub fn hides_a_loss(start: &Start, row: &PlanRow) -> bool {
    let lost = matches!(
        start,
        Start::Rewind {
            cause: Cause::Lost,
            ..
        } | Start::Ambiguous { .. }
    );
    let before_commit = row.current.is_some_and(|c| c > row.log_start);
    lost && before_commit && row.new > row.log_start
}

/// Ties the plan to Redis before its commit. Refuses a move that would hide
/// a loss (`hides_a_loss`), writing nothing. Then: the epoch every marker
/// agrees on (set where none is); the progress records raised to the new
/// offset on every server for each forward move (a skip the operator
/// allowed: the next start must not take Redis for behind it and undo it)
/// and each move to the log's start (what Redis lacks before it is gone
/// from the log too: the replay accepts that, and says so). Any other
/// backward move leaves the records as they are: where a record is below
/// the new offset, the next start re-reads from it. Returns the commit
/// metadata naming the epoch.
pub async fn tie_to_redis(config: &Config, plan: &ReplayPlan) -> anyhow::Result<String> {
    let conn = crate::store::connect(&config.redis).await?;
    let layout = crate::store::KeyLayout::new(&config.redis.key_prefix);
    let mut store = ProgressStore::new(conn, layout);
    // The records of the topic as it is now (its id from the brokers).
    if let Some(id) = crate::kafka::topic_ids::topic_id_of(&config.kafka, &plan.topic).await? {
        store.learn_incarnations(&BTreeMap::from([(plan.topic.clone(), id)]));
    }
    let moved: Vec<&PlanRow> = plan.moves().collect();
    let tps: Vec<TopicPartition> = moved
        .iter()
        .map(|r| TopicPartition::new(&plan.topic, r.partition))
        .collect();
    let views = store.read(&tps).await?;
    let mut entities: Option<bool> = None;
    let mut raised = Vec::new();
    for ((row, tp), servers) in moved.iter().zip(&tps).zip(&views) {
        let committed = row.current.map(|c| (c, row.metadata.as_str()));
        let start = judged_start(&mut store, committed, servers, false, &mut entities).await?;
        anyhow::ensure!(
            !hides_a_loss(&start, row),
            "{}/{}: Redis lost its state since the group's commit at {} ({}), and moving to {} would hide it: \
             the next start would take Redis as holding everything before {}. Start idem first, so it re-applies \
             the log, or replay from the log's start (--to-earliest: offset {})",
            tp.topic,
            tp.partition,
            row.current.map_or("none".to_string(), |c| c.to_string()),
            if matches!(start, Start::Ambiguous { .. }) {
                "a commit idem did not write, over a Redis that holds nothing of idem's"
            } else {
                "its epoch marker is gone or renewed"
            },
            row.new,
            row.new,
            row.log_start
        );
        let short = servers.iter().any(|s| s.next.is_none_or(|n| n < row.new));
        if row.new == row.log_start && row.reread >= 0 && short && row.log_start > 0 {
            eprintln!(
                "note: Redis's state of {}/{} stops before the log's start {}: the effects before it are gone from Redis and from Kafka; this replay accepts that",
                tp.topic, tp.partition, row.log_start
            );
        }
        if row.reread < 0 || row.new == row.log_start {
            raised.push((tp.clone(), row.new, None));
        }
    }
    let epoch = store.establish_epoch().await?;
    store.record(&epoch, &raised, &[]).await?;
    Ok(crate::resume::commit_metadata(&epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of `hides_a_loss`.
    #[test]
    fn a_move_hides_a_loss_by_table() {
        let row = |new| {
            let mut r = crate::tools::replay::plan_row(
                0,
                new,
                100,
                500,
                Some(400),
                crate::config::OffsetReset::Earliest,
            );
            r.log_start = 100;
            r
        };
        let lost = Start::Rewind {
            to: 0,
            committed: 400,
            cause: Cause::Lost,
        };
        let behind = Start::Rewind {
            to: 300,
            committed: 400,
            cause: Cause::RolledBack,
        };
        let ambiguous = Start::Ambiguous { committed: 400 };
        assert!(!hides_a_loss(&Start::Committed, &row(200)));
        assert!(!hides_a_loss(&behind, &row(200)));
        assert!(!hides_a_loss(&lost, &row(0)), "to the log's start");
        assert!(hides_a_loss(&lost, &row(200)));
        assert!(!hides_a_loss(&ambiguous, &row(100)));
        assert!(hides_a_loss(&ambiguous, &row(450)));
        let mut at_start = row(450);
        at_start.current = Some(100);
        assert!(!hides_a_loss(&lost, &at_start), "nothing before the commit");
    }
}
