//! `idem-testbench handover`: partitions without an owner, per group protocol.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use idem::config::{Config, GroupProtocol};
use idem_testbench::conformance::harness::RedisTarget;
use idem_testbench::conformance::Env;
use idem_testbench::handover::{self, HandoverSpec};

/// Measure how long partitions go without an owner when a group of idem
/// instances changes, under the classic and the consumer (KIP-848) group
/// protocol, in the same run.
///
/// Each round runs both protocols: on a fresh topic with a trickle of
/// records, three instances settle; then a fourth joins, one leaves with
/// SIGTERM, one is SIGKILLed. After each change every instance's
/// idem_assigned_partitions is read every 50 ms for 25 s. Then a backlog is
/// consumed twice by three instances: without changes, and while one
/// instance every 2 s leaves (SIGTERM and SIGKILL in turn) and is replaced.
/// The brokers must serve both protocols at equal session timeouts (the
/// local broker of `make services` runs both at 6 s, as idem's tests do).
/// Writes handover.json and handover.md into --out.
///
/// Examples:
///   idem-testbench handover
///   idem-testbench handover --rounds 1 --storm-records 50000
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct HandoverArgs {
    /// Rounds; each runs both protocols (the report gives medians).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Records of each storm backlog.
    #[arg(long, default_value_t = 300_000)]
    storm_records: usize,
    /// Folder for handover.json, handover.md and the idem logs.
    #[arg(long, default_value = "bench-out/handover")]
    out: PathBuf,
}

pub async fn run(
    args: HandoverArgs,
    config: Config,
    idem_exe: PathBuf,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.rounds > 0, "--rounds: expected at least 1");
    anyhow::ensure!(
        args.partitions >= 4,
        "--partitions: expected at least 4 (4 instances share them)"
    );
    let spec = HandoverSpec {
        env: Env {
            brokers: config.kafka.brokers.clone(),
            redis: RedisTarget::new(&config.redis.url, config.redis.mode),
            idem_exe,
            work_dir: args.out.join("work"),
            group_protocol: GroupProtocol::Classic,
        },
        partitions: args.partitions,
        rounds: args.rounds,
        storm_records: args.storm_records,
    };
    let report = handover::run(&spec).await?;
    std::fs::write(
        args.out.join("handover.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("handover.md"), report.to_markdown())?;
    idem::outln!("{}", report.to_markdown());
    eprintln!(
        "[handover] wrote {}/handover.json and handover.md",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
