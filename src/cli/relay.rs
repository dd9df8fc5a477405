//! `idem relay`: publish the changelog alone, without consuming.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::config::Config;

/// Publish the changes in the outboxes to the changelog topics, and nothing else
///
/// `idem run` already runs a relay when changelog.topics is set; run this
/// one beside it to publish from a process that does not consume (e.g. to
/// drain the outboxes before a rollback, or while the consumers are
/// stopped). Relays sharing a Redis and redis.key_prefix take turns: one
/// holds the lease and publishes, the others wait (docs/change-stream.md).
///
/// Each change goes to changelog.topic (default "{topic}.changes") with
/// key = the entity and header `id` = "<entity>#<version>"; an entry leaves
/// its outbox once the broker acknowledged it. Stops on SIGINT/SIGTERM,
/// handing the lease over.
///
/// Example:
///   IDEM__CHANGELOG__TOPICS=orders idem relay
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct RelayArgs {}

pub async fn run(_args: RelayArgs, config: Config) -> anyhow::Result<ExitCode> {
    if config.changelog.topics.is_empty() {
        eprintln!("error: changelog.topics is empty: there is no changelog to publish. Set it (e.g. IDEM__CHANGELOG__TOPICS=orders); docs/change-stream.md");
        return Ok(ExitCode::from(super::EXIT_FAILED));
    }
    let refusals = config.refusals();
    if !refusals.is_empty() {
        eprintln!("error: {}", refusals.join("\nerror: "));
        return Ok(ExitCode::from(super::EXIT_FAILED));
    }
    let handle = crate::metrics::install(&config.kafka.group_id, &config.redis.key_prefix)?;
    crate::metrics::serve(
        config.metrics.listen,
        handle,
        crate::metrics::Health::default(),
    )
    .await?;
    crate::relay::run(Arc::new(config), super::run::wait_for_signal()).await;
    Ok(ExitCode::SUCCESS)
}
