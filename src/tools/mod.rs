//! The operator's tools: everything idem does besides the data path, each
//! run by a subcommand of `idem` (see `cli/`). They read topics and Redis,
//! and write only where the operator asked them to.
//!
//! - [`topics`]: topics as code (`idem topics plan|apply`).
//! - [`group`]: a group's members and lag (`idem inspect group`).
//! - [`replay`]: moving a group's committed offsets (`idem replay`).
//! - [`reconcile`]: Redis's state against a topic's history (`idem reconcile`).
//! - [`dead_letters`]: looking at dead letters (`idem dlq inspect`).
//! - [`redrive`]: re-publishing them once each (`idem dlq redrive`).
//! - [`outbox`]: the changelog's outboxes and lease (`idem inspect outbox`).
//! - [`topic_reader`]: reading a partition range, shared by the tools above.
//! - [`sample`]: a deterministic test-data generator (`idem sample`).
//! - [`top`]: a running group's outcome rates and duplicate ratio (`idem top`).

pub mod check;
pub mod dead_letters;
pub mod group;
pub mod outbox;
pub mod reconcile;
pub mod redrive;
pub mod replay;
pub mod replay_tie;
pub mod sample;
pub mod top;
pub mod topic_reader;
pub mod topics;

/// A request the brokers did not answer, as an error that names the
/// brokers, the wait and what to do.
pub(crate) fn unanswered(
    cfg: &crate::config::KafkaConfig,
    doing: &str,
    e: rdkafka::error::KafkaError,
) -> anyhow::Error {
    anyhow::anyhow!(
        "{doing}: no answer from the brokers at {} within {:?} ({e}); is kafka.brokers right and the broker up? (--timeout waits longer)",
        cfg.brokers,
        cfg.request_timeout
    )
}
