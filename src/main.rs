//! The `idem` binary: parse the command line and dispatch.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = idem::cli::Cli::parse();
    idem::cli::main(cli)
}
