//! `idem-testbench`: the conformance suite and the benchmark, run against
//! the `idem` binary built beside this one (or `--idem PATH`).

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    cli::main(cli::Cli::parse())
}
