//! `idem-testbench conformance`: the fault-injection suite with an oracle.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use idem::config::{Config, GroupProtocol};
use idem_testbench::conformance::{self, ConformanceSpec, Env, Profile};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    /// A few minutes: what `make test` runs.
    Short,
    /// Every scenario, 20 SIGKILLs in one scenario: `make conformance`.
    Full,
}

/// Inject faults and check the exactly-once invariants against an oracle.
///
/// Faults: SIGKILL and SIGTERM of idem, a stalled, killed or full Redis, an
/// evicting Redis refused, a Redis Cluster master failover, a script error
/// inside a batch, a restarted or paused broker, rebalance storms, zombies,
/// replays, late duplicates, poison records and floods, oversized dead
/// letters and a missing dead-letter topic; then the invariants against
/// an oracle: I1 no lost effect, I2 no doubled effect, I3 no seq observed to
/// decrease, I4 no committed offset ahead of its effect or moving backwards,
/// I5 recovery within a bound. Runs against the Kafka and Redis of the config
/// (kafka.brokers, redis.url); scenarios that kill Redis start a private
/// redis-server of their own when one is installed. Prints a table and
/// writes conformance.json and conformance.md; exits 1 if a scenario failed.
///
/// Examples:
///   idem-testbench conformance --profile short
///   idem-testbench conformance --profile full --group-protocol consumer
///   IDEM__KAFKA__BROKERS=kafka:9092 IDEM__REDIS__URL=redis://redis:6379 idem-testbench conformance --profile full
///   idem-testbench conformance --profile full --kafka-kill-cmd 'scripts/services.sh kill-kafka' --kafka-start-cmd 'scripts/services.sh up'
///     --kafka-pause-cmd 'scripts/services.sh pause-kafka' --kafka-resume-cmd 'scripts/services.sh resume-kafka'
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ConformanceArgs {
    #[arg(long, value_enum, default_value = "short")]
    profile: ProfileArg,
    /// Seed of the generator and of the fault timing.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Folder for conformance.json, conformance.md and the idem logs.
    #[arg(long, default_value = "conformance-out")]
    out: PathBuf,
    /// Only scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Shell command that kills the Kafka broker (enables kafka-broker-restart).
    #[arg(long)]
    kafka_kill_cmd: Option<String>,
    /// Shell command that starts it again and waits until it answers.
    #[arg(long)]
    kafka_start_cmd: Option<String>,
    /// Shell command that SIGSTOPs the broker (enables commit-fails-in-rebalance).
    #[arg(long)]
    kafka_pause_cmd: Option<String>,
    /// Shell command that SIGCONTs it.
    #[arg(long)]
    kafka_resume_cmd: Option<String>,
    /// The consumer group protocol of every idem the suite starts (the
    /// brokers must serve it; `idem check` says whether they do).
    #[arg(long, value_enum, default_value = "classic")]
    group_protocol: ProtocolArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// Kafka's classic group protocol (what idem defaults to).
    Classic,
    /// KIP-848's consumer protocol (Kafka 4 brokers).
    Consumer,
}

pub async fn run(
    args: ConformanceArgs,
    config: Config,
    idem_exe: PathBuf,
) -> anyhow::Result<ExitCode> {
    let spec = ConformanceSpec {
        env: Env {
            brokers: config.kafka.brokers.clone(),
            redis: idem_testbench::conformance::harness::RedisTarget::new(
                &config.redis.url,
                config.redis.mode,
            ),
            idem_exe,
            work_dir: args.out.join("work"),
            group_protocol: match args.group_protocol {
                ProtocolArg::Classic => GroupProtocol::Classic,
                ProtocolArg::Consumer => GroupProtocol::Consumer,
            },
        },
        profile: match args.profile {
            ProfileArg::Short => Profile::Short,
            ProfileArg::Full => Profile::Full,
        },
        seed: args.seed,
        out_dir: args.out.clone(),
        only: args.only,
        kafka_kill_cmd: args.kafka_kill_cmd,
        kafka_start_cmd: args.kafka_start_cmd,
        kafka_pause_cmd: args.kafka_pause_cmd,
        kafka_resume_cmd: args.kafka_resume_cmd,
    };
    let report = conformance::run(&spec).await?;
    idem::outln!("{}", report.to_markdown());
    eprintln!(
        "[conformance] wrote {}/conformance.json and conformance.md",
        args.out.display()
    );
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
