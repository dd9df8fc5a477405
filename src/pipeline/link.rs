//! What the loop and the guard stage tell each other.
//!
//! Loop → stage: one queue ([`stage_queue`]) of batches and ownership
//! changes in the order the loop decided them, so the stage sees an
//! assignment after every batch fetched before it and a release after
//! every batch of the released partitions, by construction. Only batches
//! count toward its bound (the stage holds one batch while another waits,
//! so fetching and decoding overlap the Redis round trip): an ownership
//! change never waits for room, so a revoke is answered while the stage
//! retries a Redis outage instead of stalling the rebalance.
//!
//! Stage → loop: [`StageEvent`]s, in the order the stage decided them.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::batch::{Batch, Finished};
use super::recovery::StateChanged;
use crate::consumed::LogView;
use crate::offsets::TopicPartition;

/// What the guard stage tells the loop: the only way it steers it.
#[derive(Debug)]
pub enum StageEvent {
    /// A batch is applied and its progress recorded: its offsets are done.
    Finished(Finished),
    /// The dead-letter budget is exceeded: fetch nothing more (the reason
    /// is what `/readyz` and the log show).
    StopConsuming(String),
    /// Redis lost or rolled back its state (a refused write, or the
    /// progress check): nothing more is written, consumption restarts from
    /// what Redis holds.
    Restart(StateChanged),
    /// A partition's log went back to an earlier offset without a new
    /// assignment (truncated, or deleted and created again): consumption
    /// restarts, so every partition resumes with the ids and records of the
    /// log as it is now.
    LogReplaced(String),
    /// The stage retries a write (`redis`, `dead_letter`) until it is done
    /// (`None`): the cause named for a partition blocked meanwhile.
    Retrying(Option<&'static str>),
}

/// What the loop tells the guard stage besides batches, in the same queue:
/// which partitions it owns, so the progress check covers exactly those.
#[derive(Debug)]
pub enum Ownership {
    /// Assigned: each partition with the offset Redis's record was raised
    /// to at the assignment (the check expects at least that from then on),
    /// and what Redis says of its log (where its topic has an id).
    Taken {
        floors: Vec<(TopicPartition, i64)>,
        logs: Vec<(TopicPartition, LogView)>,
    },
    /// Revoked or lost: no longer checked.
    Released(Vec<TopicPartition>),
}

/// What the loop hands the guard stage, in the order it decided it.
pub enum ToStage {
    Batch(Batch),
    Ownership(Ownership),
}

impl std::fmt::Debug for ToStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToStage::Batch(batch) => write!(f, "Batch({})", batch.describe()),
            ToStage::Ownership(change) => write!(f, "{change:?}"),
        }
    }
}

/// Room for one batch in the queue, taken before the batch is built and
/// given back when the stage takes the batch.
pub struct Room(#[allow(dead_code)] OwnedSemaphorePermit);

/// The guard stage ended: nothing handed to it any more is applied.
#[derive(Debug)]
pub struct StageGone;

/// The loop's end of the queue.
pub struct StageSender {
    /// `None` once closed: the stage ends after what is queued.
    queue: Option<mpsc::UnboundedSender<(ToStage, Option<Room>)>>,
    room: Arc<Semaphore>,
}

/// The guard stage's end of the queue.
pub struct StageReceiver {
    queue: mpsc::UnboundedReceiver<(ToStage, Option<Room>)>,
}

/// A queue that holds at most `batches` batches not yet taken by the stage
/// (and any number of ownership changes).
pub fn stage_queue(batches: usize) -> (StageSender, StageReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sender = StageSender {
        queue: Some(tx),
        room: Arc::new(Semaphore::new(batches)),
    };
    (sender, StageReceiver { queue: rx })
}

impl StageSender {
    /// Waits until the queue has room for one more batch. Cancel-safe: the
    /// loop waits on it in a `select!`. A stage that ended dropped what it
    /// held, so its room comes back and the send then says it is gone.
    pub async fn room(&self) -> Room {
        let permit = self.room.clone().acquire_owned().await;
        Room(permit.expect("the queue's semaphore is never closed"))
    }

    pub fn batch(&self, room: Room, batch: Batch) -> Result<(), StageGone> {
        self.send(ToStage::Batch(batch), Some(room))
    }

    /// Never waits: an ownership change does not count toward the bound.
    pub fn ownership(&self, change: Ownership) -> Result<(), StageGone> {
        self.send(ToStage::Ownership(change), None)
    }

    /// Sends nothing more: the stage ends once it applied what is queued.
    pub fn close(&mut self) {
        self.queue = None;
    }

    /// Closed by [`StageSender::close`].
    pub fn is_closed(&self) -> bool {
        self.queue.is_none()
    }

    fn send(&self, item: ToStage, room: Option<Room>) -> Result<(), StageGone> {
        let queue = self.queue.as_ref().ok_or(StageGone)?;
        queue.send((item, room)).map_err(|_| StageGone)
    }
}

impl StageReceiver {
    /// The next batch or ownership change, `None` once the loop dropped its
    /// end. A batch's room is free again as soon as it is taken.
    pub async fn recv(&mut self) -> Option<ToStage> {
        self.queue.recv().await.map(|(item, _room)| item)
    }

    /// What is queued now, without waiting (the loop's tests read it).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<ToStage> {
        self.queue.try_recv().ok().map(|(item, _room)| item)
    }

    /// How many items are queued (the loop's tests wait on it).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty batch told apart by its one partition's number.
    fn batch(number: i32) -> Batch {
        Batch {
            partitions: vec![TopicPartition::new("batch", number)],
            policies: Vec::new(),
            items: Vec::new(),
        }
    }

    fn number(batch: &Batch) -> i32 {
        batch.partitions[0].partition
    }

    fn released(partition: i32) -> Ownership {
        Ownership::Released(vec![TopicPartition::new("t", partition)])
    }

    /// Order holds across both kinds, and an ownership change goes in while
    /// the queue is full of batches (a revoke during a Redis outage).
    #[tokio::test]
    async fn ownership_changes_keep_their_place_and_never_wait_for_room() {
        let (tx, mut rx) = stage_queue(1);
        tx.batch(tx.room().await, batch(1)).unwrap();
        let full = tokio::time::timeout(std::time::Duration::from_millis(50), tx.room()).await;
        assert!(full.is_err(), "one batch fills a queue of one");
        tx.ownership(released(0)).unwrap();
        let order: Vec<String> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .map(|item| match item {
                Some(ToStage::Batch(b)) => format!("batch {}", number(&b)),
                Some(ToStage::Ownership(o)) => format!("{o:?}"),
                None => "closed".into(),
            })
            .collect();
        assert_eq!(order[0], "batch 1");
        assert!(order[1].starts_with("Released"), "{order:?}");
        // Taking the batch gave its room back.
        tx.batch(tx.room().await, batch(2)).unwrap();
        assert!(matches!(rx.recv().await, Some(ToStage::Batch(b)) if number(&b) == 2));
        // Closed: the stage takes nothing more once the queue is empty.
        let mut tx = tx;
        tx.close();
        assert!(tx.ownership(released(1)).is_err());
        assert!(rx.recv().await.is_none());
    }

    /// A stage that ended gives back the room of what it held, and the
    /// loop's next send says it is gone instead of waiting for ever.
    #[tokio::test]
    async fn a_stage_that_ended_is_found_gone_not_waited_for() {
        let (tx, rx) = stage_queue(1);
        tx.batch(tx.room().await, batch(1)).unwrap();
        drop(rx);
        let room = tokio::time::timeout(std::time::Duration::from_secs(5), tx.room())
            .await
            .expect("the dropped batch's room came back");
        assert!(tx.batch(room, batch(2)).is_err());
        assert!(tx.ownership(released(0)).is_err());
    }
}
