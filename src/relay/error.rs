//! Why a relay round did not finish.

use crate::store::StoreError;

/// Why a round did not finish. Each is retried after a backoff; entries
/// not acknowledged stay in their outbox.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("Redis: {0}")]
    Redis(#[from] StoreError),
    #[error(
        "the changelog topic {topic} does not exist: create it (topics/, `idem topics apply`)"
    )]
    UnknownTopic { topic: String },
    /// Refined by asking the broker whether `topic` exists (the relay's
    /// `explain`): a missing topic makes records time out, not fail.
    #[error("Kafka did not acknowledge the changes to {topic} in time: {error}")]
    TimedOut { topic: String, error: String },
    #[error("Kafka did not acknowledge the changes: {0}")]
    Kafka(String),
    #[error("an outbox holds an entry idem did not write: {0}")]
    Protocol(String),
    #[error("cannot create the changelog producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
}

impl RelayError {
    /// The `kind` label of `idem_changelog_publish_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Redis(_) => "redis",
            RelayError::UnknownTopic { .. } => "unknown_topic",
            RelayError::Kafka(_) | RelayError::TimedOut { .. } | RelayError::Producer(_) => "kafka",
            RelayError::Protocol(_) => "protocol",
        }
    }
}
