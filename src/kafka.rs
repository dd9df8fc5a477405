//! Kafka clients: the consumer's fixed delivery settings and its rebalance
//! context, plus small admin helpers shared by the CLI and the tests.
//!
//! Guarantee: offsets are stored only by idem after an effect
//! (`enable.auto.offset.store=false`); librdkafka's auto commit then commits
//! nothing but those stored offsets. No config key can change this.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::metrics::{self, Health};

/// The consumer configuration: user passthrough first, then the settings
/// that protect the guarantee, which always win.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &cfg.librdkafka {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        // Offsets are stored by idem only once the record's outcome is durable in Redis.
        .set("enable.auto.offset.store", "false")
        // Auto commit only ever commits what idem stored: safe, and off the hot path.
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().to_string(),
        )
        .set("auto.offset.reset", cfg.auto_offset_reset.as_str())
        .set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        )
        // End-of-partition events are noise for a long-running consumer.
        .set("enable.partition.eof", "false");
    if !cfg.librdkafka.contains_key("partition.assignment.strategy") {
        // Cooperative rebalancing moves only the partitions that must move.
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    c
}

/// Logs and counts rebalances; on revoke, commits what is stored so the next
/// owner starts after everything this instance finished.
#[derive(Default)]
pub struct IdemContext {
    pub health: Health,
}

impl ClientContext for IdemContext {}

impl ConsumerContext for IdemContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                metrics::record_rebalance("revoke");
                tracing::info!(
                    partitions = tpl.count(),
                    "partitions revoked; committing finished offsets"
                );
                commit_stored(consumer);
            }
            Rebalance::Assign(tpl) => {
                metrics::record_rebalance("assign");
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                metrics::record_rebalance("error");
                tracing::warn!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        if let Ok(assignment) = consumer.assignment() {
            metrics::set_assigned_partitions(assignment.count());
            self.health.set_assigned(assignment.count() > 0);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &rdkafka::TopicPartitionList,
    ) {
        match result {
            Ok(()) => tracing::debug!(partitions = offsets.count(), "offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; it is retried with the next commit")
            }
        }
    }
}

/// Synchronously commits the stored offsets; "nothing to commit" is fine.
pub fn commit_stored<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "synchronous commit failed"),
    }
}

/// How long admin and metadata calls may take.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
