//! How a consumption round ends, and why consumption restarts: what
//! [`super::EventLoop::run`] returns to the pipeline.

use crate::offsets::TopicPartition;
use crate::pipeline::recovery::{StateChanged, Unrecoverable};

/// Why the loop ended.
#[derive(Debug)]
pub enum LoopEnd {
    Shutdown,
    /// Consumption restarts from what Redis holds (its state changed, or
    /// the progress check of an assignment could not be made).
    Restart(Restart),
    /// Redis lost effects the log no longer holds.
    Unrecoverable(Unrecoverable),
}

/// Why consumption restarts.
#[derive(Debug)]
pub enum Restart {
    /// The guard stage found Redis's state changed.
    StateChanged(StateChanged),
    /// A partition's log went back to an earlier offset.
    LogReplaced(String),
    /// The Kafka consumer failed fatally (the reason, with a hint).
    KafkaFatal(String),
    /// An assigned partition's committed offset could not be read.
    CommitUnknown(TopicPartition),
    /// Redis's progress records of an assignment could not be read.
    ProgressUnreadable(String),
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::StateChanged(changed) => write!(
                f,
                "the guard stage found Redis's state changed ({}: {})",
                changed.cause.as_str(),
                changed.detail
            ),
            Restart::LogReplaced(detail) => write!(f, "a partition's log was replaced ({detail})"),
            Restart::KafkaFatal(why) => f.write_str(why),
            Restart::CommitUnknown(tp) => write!(
                f,
                "could not read the committed offset of {}/{}",
                tp.topic, tp.partition
            ),
            Restart::ProgressUnreadable(e) => write!(
                f,
                "could not read Redis's progress records for the assigned partitions: {e}"
            ),
        }
    }
}
