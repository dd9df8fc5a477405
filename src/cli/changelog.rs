//! `idem changelog`: the change stream's own tools (docs/change-stream.md).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::store::{self, KeyLayout};

/// The change stream's tools (docs/change-stream.md)
///
/// Examples:
///   idem changelog snapshot --topic orders             # how many entities it would write
///   idem changelog snapshot --topic orders --execute   # write them
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ChangelogArgs {
    #[command(subcommand)]
    what: ChangelogWhat,
}

#[derive(Debug, Subcommand)]
enum ChangelogWhat {
    /// Publish every entity's current state once (a snapshot), to bootstrap a consumer
    ///
    /// Each entity under redis.key_prefix gets one change of kind "snapshot"
    /// under its next version: type "idem.change" with its whole state (and
    /// its counters and sets in "change"), or "delete" for a tombstone. The
    /// relay of `idem run` or `idem relay` publishes them like any change, so
    /// one must run. Live changes go on meanwhile: each entity's versions stay
    /// dense and in order, and a chained idem's dense mark starts at the
    /// first version it sees. Every entity of the prefix goes to the
    /// changelog of --topic. Waits while an outbox is at changelog.max_outbox.
    ///
    /// Without --execute it only counts the entities. With it, it prints when
    /// it started: a new consumer group can start the changelog there
    /// (`idem replay --topic orders.changes --group G --to-timestamp TIME --execute`).
    ///
    /// Example:
    ///   IDEM__CHANGELOG__TOPICS=orders idem changelog snapshot --topic orders --execute
    #[command(verbatim_doc_comment)]
    Snapshot {
        /// The source topic whose changelog gets the snapshot (one of
        /// changelog.topics; default: the only one).
        #[arg(long)]
        topic: Option<String>,
        /// Write the changes (default: a dry run that counts the entities).
        #[arg(long)]
        execute: bool,
    },
}

pub async fn run(args: ChangelogArgs, config: Config) -> anyhow::Result<ExitCode> {
    let ChangelogWhat::Snapshot { topic, execute } = args.what;
    let topics = &config.changelog.topics;
    let topic = match (topic, topics.as_slice()) {
        (Some(t), _) if topics.contains(&t) => t,
        (None, [only]) => only.clone(),
        (Some(t), _) => {
            eprintln!(
                "error: --topic {t} has no changelog: changelog.topics is [{}]. Add it (e.g. IDEM__CHANGELOG__TOPICS={t}); docs/change-stream.md",
                topics.join(",")
            );
            return Ok(ExitCode::from(super::EXIT_FAILED));
        }
        (None, _) => {
            eprintln!(
                "error: name the source topic with --topic (changelog.topics is [{}]); docs/change-stream.md",
                topics.join(",")
            );
            return Ok(ExitCode::from(super::EXIT_FAILED));
        }
    };
    let changelog = config.changelog.topic_for(&topic);
    let mut conn = store::connect_or_explain(&config.redis).await?;
    let prefix = &config.redis.key_prefix;
    if !execute {
        let entities = conn.entities(&KeyLayout::new(prefix)).await?.len();
        crate::outln!(
            "would write {entities} snapshot changes (every entity of prefix {prefix}) to the outbox, for {changelog}"
        );
        eprintln!("dry run: nothing written; add --execute to write them");
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = std::time::Instant::now();
    let report = crate::relay::snapshot(&config, &mut conn, &topic, |done, of| {
        if last.elapsed() >= std::time::Duration::from_secs(5) || done as usize == of {
            eprintln!("snapshot: {done}/{of} entities");
            last = std::time::Instant::now();
        }
    })
    .await?;
    let started = super::utc_millis(report.started_ms as i64);
    crate::outln!(
        "wrote {} snapshot changes to the outbox of prefix {prefix}, for {changelog} ({} entities gone meanwhile); started at {started}: a new consumer group can start {changelog} there (idem replay --topic {changelog} --group G --to-timestamp {started} --execute)",
        report.written,
        report.gone,
    );
    Ok(ExitCode::SUCCESS)
}
