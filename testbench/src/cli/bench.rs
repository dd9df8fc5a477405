//! `idem-testbench bench`: measure the whole pipeline against its baselines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use idem::config::Config;
use idem_testbench::bench::{self, BenchSpec, Variant};

/// Measure idem end to end against two baselines run on the same records.
///
/// Produces a backlog, runs idem on it, then a fixed-rate latency load, then
/// (a) the naive consumer (three Redis round trips and a synchronous commit
/// per record) and (b) the per-event script ceiling (one guard script call
/// per event, pipelined, no Kafka). Writes bench.json and bench.md into
/// --out. Uses kafka.brokers and redis.url from the config.
///
/// Example (what `make bench` runs, on a release build):
///   idem-testbench bench --events 1000000 --entities 10000 --out bench-out
/// A smoke run:
///   idem-testbench bench --events 2000 --naive-records 200 --latency-seconds 1
/// This build against an older one and against itself with per-field order,
/// alternated over three rounds on one backlog (prints the ratios):
///   idem-testbench bench --events 200000 --rounds 3 \
///     --compare-idem 'before=/tmp/idem-old' \
///     --compare-idem 'per-field=target/release/idem IDEM__STATE__ORDER=per_field'
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct BenchArgs {
    /// Distinct events in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Entities the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    entities: usize,
    /// Skew the entities' popularity: the k-th most popular gets events in
    /// proportion to 1/k^S (Zipf). `make bench` runs once uniform and once
    /// with 1.1 (the hottest of 10,000 entities takes 15% of the events,
    /// and its partition more than its share).
    #[arg(long, value_name = "S")]
    zipf: Option<f64>,
    /// Fraction of produced records that are redelivered copies.
    #[arg(long, default_value_t = 0.2)]
    duplicates: f64,
    /// Fraction of events that arrive out of order.
    #[arg(long, default_value_t = 0.05)]
    out_of_order: f64,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 200)]
    data_bytes: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Records the naive consumer (a) processes; it is slow, its rate is what counts.
    #[arg(long, default_value_t = 5_000)]
    naive_records: usize,
    /// Records the per-event script ceiling (b) processes (default: all).
    #[arg(long)]
    ceiling_records: Option<usize>,
    /// Duration of each fixed-rate latency load (at 25%, 50% and 75% of the measured throughput).
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Rate of a single latency load, records/s, in place of the three levels.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// idem instances (one consumer group) on the backlog.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Measure the backlog throughput only: no latency phase, no baselines.
    /// With redis.mode = cluster only this part runs.
    #[arg(long)]
    throughput_only: bool,
    /// Another build to run on the same backlog, alternated with this one:
    /// `NAME=PATH [KEY=VALUE ...]` (the variables it alone gets; `{topic}`
    /// stands for the benchmark topic). Repeat for more; then only the
    /// backlog phase runs, once per build per round.
    #[arg(long = "compare-idem", value_name = "NAME=PATH [KEY=VALUE ...]", value_parser = Variant::parse)]
    compare_idem: Vec<Variant>,
    /// Rounds of --compare-idem (the order rotates every round).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Folder for bench.json, bench.md and idem.log.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
}

pub async fn run(args: BenchArgs, config: Config, idem_exe: PathBuf) -> anyhow::Result<ExitCode> {
    let command: Vec<String> = std::env::args().collect();
    let spec = BenchSpec {
        brokers: config.kafka.brokers.clone(),
        redis_url: config.redis.url.clone(),
        events: args.events,
        entities: args.entities,
        zipf: args.zipf,
        duplicate_ratio: args.duplicates,
        out_of_order_ratio: args.out_of_order,
        data_bytes: args.data_bytes,
        partitions: args.partitions,
        naive_records: args.naive_records,
        ceiling_records: args.ceiling_records.unwrap_or(usize::MAX),
        latency_seconds: args.latency_seconds,
        latency_rate: args.latency_rate,
        instances: args.instances,
        throughput_only: args.throughput_only
            || config.redis.mode == idem::config::RedisMode::Cluster,
        idem_exe,
        compare: args.compare_idem,
        compare_rounds: args.rounds,
        out_dir: args.out.clone(),
        seed: args.seed,
    };
    let report = bench::run(&spec, command.join(" ")).await?;
    idem::outln!("{}", report.to_markdown());
    eprintln!(
        "[bench] wrote {}/bench.json and bench.md",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
