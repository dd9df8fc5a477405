//! `idem-testbench bench`: the whole pipeline on local services, measured against two
//! baselines in the same run so that the result is a ratio, not a number
//! that depends on how busy the machine was.
//!
//! Phases: produce a generated backlog into a fresh topic; run the real
//! `idem` binary on it until every record has an outcome (throughput, CPU,
//! peak memory, Redis memory per remembered id); fixed-rate loads at 25%,
//! 50% and 75% of that throughput (end-to-end latency, latency.rs); then
//! the naive consumer (a) and the per-event script ceiling (b) on the same
//! records; last, the effects phase: one payments stream through idem with
//! no effects declared, then with each kind of effect, then all together
//! (records/s, Redis µs per record and bytes per entity, docs/effects.md);
//! and the changelog phase: the same stream with the changelog off, on,
//! on with the relay unable to publish, and off again (docs/change-stream.md).

mod backlog;
mod baselines;
mod changelog;
mod compare;
mod cpu;
mod effects;
mod io;
mod latency;
mod report;
mod runner;

pub use compare::{CompareRow, Variant};
pub use cpu::Busy;
pub use report::BenchReport;
pub use runner::run;

use std::path::PathBuf;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub brokers: String,
    pub redis_url: String,
    /// Distinct events in the backlog.
    pub events: usize,
    pub entities: usize,
    /// Zipf exponent of the entities' popularity (None: uniform).
    pub zipf: Option<f64>,
    pub duplicate_ratio: f64,
    pub out_of_order_ratio: f64,
    /// Padding in each event's data, bytes.
    pub data_bytes: usize,
    pub partitions: i32,
    /// Records the naive consumer processes (it is slow; its rate is what counts).
    pub naive_records: usize,
    /// Records the per-event script ceiling processes.
    pub ceiling_records: usize,
    /// How long each fixed-rate latency load runs.
    pub latency_seconds: u64,
    /// Rate of a single latency load; None: 25%, 50% and 75% of the measured throughput.
    pub latency_rate: Option<f64>,
    /// idem instances in the group during the backlog phase.
    pub instances: usize,
    /// Measure the backlog phase only (no latency phase, no baselines).
    pub throughput_only: bool,
    /// The idem binary to run (normally this very executable).
    pub idem_exe: PathBuf,
    /// Other builds (or settings) to run on the same backlog, alternated
    /// with this one (`--compare-idem`); then only that phase runs.
    pub compare: Vec<Variant>,
    /// Rounds of the comparison: each build runs once per round.
    pub compare_rounds: usize,
    pub out_dir: PathBuf,
    pub seed: u64,
}
