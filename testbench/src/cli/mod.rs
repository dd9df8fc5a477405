//! The `idem-testbench` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bench;
pub mod conformance;
pub mod handover;

/// idem's test bench: fault injection against an oracle, and the benchmark.
///
/// It drives the real `idem` binary (the one built beside this one, or
/// --idem PATH) against the Kafka and Redis of the config, which loads as
/// idem's does: config/default.toml, then --config FILE, then IDEM__… variables.
#[derive(Debug, Parser)]
#[command(name = "idem-testbench", version, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML) layered over the defaults; keys as in config/default.toml.
    #[arg(long, global = true, env = "IDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// The idem binary to test (default: `idem` beside this executable).
    #[arg(long, global = true)]
    pub idem: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Bench(bench::BenchArgs),
    Conformance(conformance::ConformanceArgs),
    Handover(handover::HandoverArgs),
}

pub fn main(cli: Cli) -> ExitCode {
    let idem_exe = match cli.idem.clone().map_or_else(idem_beside_this, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    idem::cli::with_config(cli.config.as_deref(), move |config| async move {
        match cli.command {
            Command::Bench(args) => bench::run(args, config, idem_exe).await,
            Command::Conformance(args) => conformance::run(args, config, idem_exe).await,
            Command::Handover(args) => handover::run(args, config, idem_exe).await,
        }
    })
}

/// The `idem` binary of the same build (`target/<profile>/idem`).
fn idem_beside_this() -> anyhow::Result<PathBuf> {
    idem_testbench::process::idem_beside(&std::env::current_exe()?)
}
