//! The command line: one subcommand per file, each with its own `run`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

pub mod changelog;
pub mod check;
pub mod config;
pub mod dlq;
pub mod gateway;
pub mod inspect;
pub mod reconcile;
pub mod relay;
pub mod replay;
pub mod run;
pub mod sample;
pub mod top;
pub mod topics;

/// idem applies Kafka topics to Redis with exactly-once effects.
///
/// Each event (a JSON record with `id`, `entity` and `seq`) has its effect
/// applied once, however often Kafka delivers it: duplicates and stale
/// out-of-order events are rejected atomically in Redis, and offsets are
/// committed only after the effects are durable.
///
/// Configuration: config/default.toml (built in), then --config FILE, then
/// IDEM__SECTION__KEY environment variables, e.g. IDEM__KAFKA__GROUP_ID=orders.
/// `idem config show` prints the result; `idem check` tries it.
///
/// Exit status, for every command: 0 done; 1 done and found something to
/// report (reconcile divergences, topic drift, a failed check); 2 could not
/// do its work (bad configuration, unreachable service, refused operation);
/// 3 the entity or group looked up does not exist.
///
/// --json, wherever a command offers it, prints one JSON document on stdout
/// (an object, or an array of objects, as the command's help says) and
/// nothing else there; progress and diagnostics go to stderr.
#[derive(Debug, Parser)]
#[command(name = "idem", version = crate::version::LONG, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML) layered over the defaults; keys as in config/default.toml.
    #[arg(long, global = true, env = "IDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long to wait for the brokers to answer one request (e.g. 5s);
    /// sets kafka.request_timeout for this run.
    #[arg(long, global = true, value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(run::RunArgs),
    Inspect(inspect::InspectArgs),
    Topics(topics::TopicsArgs),
    Sample(sample::SampleArgs),
    Dlq(dlq::DlqArgs),
    Replay(replay::ReplayArgs),
    Reconcile(reconcile::ReconcileArgs),
    Relay(relay::RelayArgs),
    Gateway(gateway::GatewayArgs),
    Changelog(changelog::ChangelogArgs),
    Config(config::ConfigArgs),
    Check(check::CheckArgs),
    Top(top::TopArgs),
}

/// Loads config, starts logging and runs the chosen command.
pub fn main(cli: Cli) -> ExitCode {
    let file = cli.config.clone();
    let timeout = cli.timeout;
    with_config(cli.config.as_deref(), move |mut config| async move {
        if let Some(t) = timeout {
            config.kafka.request_timeout = t;
        }
        match cli.command {
            Command::Run(args) => run::run(args, config).await,
            Command::Inspect(args) => inspect::run(args, config).await,
            Command::Topics(args) => topics::run(args, config).await,
            Command::Sample(args) => sample::run(args, config).await,
            Command::Dlq(args) => dlq::run(args, config).await,
            Command::Replay(args) => replay::run(args, config).await,
            Command::Reconcile(args) => reconcile::run(args, config).await,
            Command::Relay(args) => relay::run(args, config).await,
            Command::Gateway(args) => gateway::run(args, config).await,
            Command::Changelog(args) => changelog::run(args, config).await,
            Command::Config(args) => config::run(args, config, file, timeout).await,
            Command::Check(args) => check::run(args, config).await,
            Command::Top(args) => top::run(args, config).await,
        }
    })
}

pub(crate) fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("expected a duration such as 500ms, 10s or 1m, got {text:?}"))
}

/// Exit status of a command that found something to report (a divergence,
/// drift, a failed check): it ran to the end.
pub const EXIT_FOUND: u8 = 1;
/// Exit status of a command that could not do its work (a bad config, an
/// unreachable service, a refused operation).
pub const EXIT_FAILED: u8 = 2;
/// Exit status of a lookup that found nothing (`inspect entity`, `inspect group`).
pub const EXIT_NOT_FOUND: u8 = 3;

/// Loads the config (defaults, `file`, `IDEM__…` variables), starts
/// logging and the runtime, and runs `command` on them; errors are printed
/// with their causes. A bad config exits 2, naming the key.
pub fn with_config<F, Fut>(file: Option<&std::path::Path>, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Config::load(file, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("hint: every key is documented in config/default.toml");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let json_logs = config.log.format == LogFormat::Json;
    match runtime.block_on(command(config)) {
        Ok(code) => code,
        Err(e) => {
            // Once: as a log record for log pipelines, else as plain text.
            if json_logs {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Colours only for a person at a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `println!` for a command's output: when the reader has gone (`idem … |
/// head`), the rest of the output is dropped quietly instead of panicking on
/// the broken pipe, and the command still does its work and exits with its
/// own status (a `replay --execute | head` still executes).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Set once stdout's reader has gone.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes to stdout; see [`outln!`].
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            return;
        }
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Unix milliseconds as an RFC 3339 UTC time with milliseconds
/// (`2026-11-27T23:52:01.123Z`), for people reading the tools' output.
pub fn utc_millis(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_millis_read_as_utc_dates() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_795_823_521_123, "2026-11-27T23:52:01.123Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(utc_millis(ms), text, "{ms}");
        }
    }
}
