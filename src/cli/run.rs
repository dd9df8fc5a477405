//! `idem run`: consume the configured topics and apply them to Redis.

use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::pipeline::{self, Shutdown};

/// Consume the configured topics and apply every event to Redis exactly once
///
/// Runs as a member of the consumer group kafka.group_id.
///
/// Stops cleanly on SIGINT/SIGTERM: no new work is taken, the current batch
/// finishes, finished offsets are committed. A second signal exits at once,
/// which is still safe: redelivered events are recognised as duplicates.
///
/// Example:
///   IDEM__KAFKA__TOPICS=orders IDEM__KAFKA__GROUP_ID=orders-view idem run
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// Start at the group's commits where they cannot be tied to Redis: a
    /// commit idem did not write (a plain Kafka client, an older idem) while
    /// Redis holds no progress records and no entity. Without it idem
    /// refuses such a start, as it reads two ways (a new Redis meant to start
    /// there, or one that lost its state while idem was down); see
    /// docs/runbook.md, "An ambiguous start". Needed once: the records idem
    /// then writes settle it.
    #[arg(long, env = "IDEM_ACCEPT_COMMITS")]
    accept_commits: bool,
}

pub async fn run(args: RunArgs, config: Config) -> anyhow::Result<ExitCode> {
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: finishing the current batch, then committing (signal again to exit at once)");
        trigger.trigger();
        wait_for_signal().await;
        tracing::warn!(
            "second signal: exiting now; uncommitted events will be redelivered and deduplicated"
        );
        std::process::exit(130);
    });
    let options = pipeline::RunOptions {
        accept_commits: args.accept_commits,
    };
    pipeline::run(config, options, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
