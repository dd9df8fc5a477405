//! The benchmark's results, as JSON and as a Markdown table.

use serde::Serialize;

/// One variant's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EffectsRow {
    pub name: String,
    pub records: usize,
    pub records_per_second: f64,
    /// Redis CPU in the guard script per record (standalone Redis only).
    pub redis_us_per_record: f64,
    /// `MEMORY USAGE` of the entity's keys of this variant ÷ entities.
    pub redis_bytes_per_entity: f64,
    /// Redis's whole CPU (`used_cpu_user` + `used_cpu_sys`, the relay's
    /// reads and deletes included) per record.
    pub redis_cpu_us_per_record: f64,
    /// Changelog on: records per second until every change was published
    /// and the outbox drained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_changelog_records_per_second: Option<f64>,
    /// Changelog on, relay unable to publish: the outbox's `MEMORY USAGE`
    /// ÷ its entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_bytes_per_entry: Option<f64>,
}

/// Everything one bench run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub command: String,
    pub records: usize,
    pub events: usize,
    pub entities: usize,
    pub partitions: i32,
    /// Zipf exponent of the entities' popularity, if skewed.
    pub zipf: Option<f64>,
    /// The fullest partition's records ÷ the mean.
    pub hottest_partition_share: f64,
    /// Only the backlog phase ran (`--throughput-only`): the other rows are left out.
    pub throughput_only: bool,
    pub produce_records_per_second: f64,
    /// idem, end to end from a Kafka backlog until every record had its outcome.
    pub idem_records_per_second: f64,
    pub idem_cpu_seconds_per_million: f64,
    /// What Redis spent per record over the backlog (standalone only):
    /// its CPU, the guard script's time, its commands' and the rest.
    pub redis: Option<super::io::RedisPerRecord>,
    /// Where the machine's cores went over the backlog.
    pub busy: super::Busy,
    pub idem_peak_rss_bytes: u64,
    pub outcomes: Vec<(String, u64)>,
    /// Remembered ids (applied + stale outcomes).
    pub remembered_ids: u64,
    /// `MEMORY USAGE` of the id hashes ÷ remembered ids: the dedupe storage alone.
    pub redis_bytes_per_id_dedupe: f64,
    /// `INFO memory` used_memory delta ÷ remembered ids: includes entity state.
    pub redis_bytes_per_id_total: f64,
    pub latency_rate_per_second: f64,
    pub latency_records: u64,
    /// Upper bounds of the histogram buckets holding the quantile, ms.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_p999_ms: f64,
    /// The latency histogram of the fixed-rate phase: (upper bound s, cumulative count).
    pub latency_histogram: Vec<(f64, u64)>,
    /// Every fixed-rate level (25%, 50%, 75% of the maximum); the single
    /// figures above are the 50% level's (or the one `--latency-rate` ran).
    pub latency_levels: Vec<super::latency::LatencyLevel>,
    pub naive_records: usize,
    pub naive_records_per_second: f64,
    pub ceiling_records: usize,
    pub ceiling_records_per_second: f64,
    /// (c) the guard alone on the same records.
    pub guard_alone: super::baselines::GuardAlone,
    pub ratio_vs_naive: f64,
    pub ratio_vs_ceiling: f64,
    /// The effects phase, one row per variant (the first declares none).
    pub effects: Vec<EffectsRow>,
    /// The changelog phase: off, on, on with the relay held, off again.
    pub changelog: Vec<EffectsRow>,
    /// `--compare-idem`: this build, then each other one, run by run.
    pub comparison: Vec<super::CompareRow>,
}

impl BenchReport {
    /// Takes the latency phase's levels; the single latency figures are
    /// those of the level at half the maximum, or of the only level.
    pub fn set_latency(&mut self, levels: Vec<super::latency::LatencyLevel>) {
        let main = levels
            .iter()
            .find(|l| l.share_of_maximum == Some(0.5))
            .or(levels.first());
        if let Some(l) = main {
            self.latency_rate_per_second = l.rate_per_second;
            self.latency_records = l.records;
            self.latency_p50_ms = l.p50_ms;
            self.latency_p99_ms = l.p99_ms;
            self.latency_p999_ms = l.p999_ms;
            self.latency_histogram = l.histogram.clone();
        }
        self.latency_levels = levels;
    }

    /// The latency levels as a table, with what each party used beside them.
    fn latency_markdown(&self) -> String {
        if self.latency_levels.is_empty() {
            return String::new();
        }
        let cores = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.2}"));
        let mut s = String::from(
            "\nLatency at fixed rates (end to end, from the record's timestamp to its decision; cores busy over each level):\n\n\
             | share of the maximum | records/s | p50 | p99 | p99.9 | load generator | idem | Redis | broker | machine |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for l in &self.latency_levels {
            let share = l
                .share_of_maximum
                .map_or("(asked)".to_string(), |v| format!("{:.0}%", v * 100.0));
            s.push_str(&format!(
                "| {share} | {:.0} | ≤ {:.0} ms | ≤ {:.0} ms | ≤ {:.0} ms | {:.2} | {:.2} | {} | {} | {} of {} |\n",
                l.rate_per_second,
                l.p50_ms,
                l.p99_ms,
                l.p999_ms,
                l.generator_cores_busy,
                l.busy.idem_cores_busy,
                cores(l.busy.redis_cores_busy),
                cores(l.busy.broker_cores_busy),
                cores(l.busy.machine_cores_busy),
                l.busy.cores
            ));
        }
        s
    }

    /// A Markdown table with the targets of the performance issue beside each figure.
    pub fn to_markdown(&self) -> String {
        let skew = self
            .zipf
            .map_or("uniform".to_string(), |s| format!("Zipf s = {s}"));
        let mut s = format!(
            "Machine: {}  \nCommand: `{}`  \nBacklog: {} records ({} events over {} entities, {skew}, {} partitions; the fullest partition holds {:.2}× the mean)\n\n",
            self.machine,
            self.command,
            self.records,
            self.events,
            self.entities,
            self.partitions,
            self.hottest_partition_share
        );
        if !self.comparison.is_empty() {
            s.push_str(&super::compare::to_markdown(&self.comparison));
            return s;
        }
        s.push_str("| measure | value | target |\n|---|---|---|\n");
        let rows = if self.throughput_only {
            [self.backlog_rows(), self.idem_rows()].concat()
        } else {
            self.rows()
        };
        for (measure, value, target) in rows {
            s.push_str(&format!("| {measure} | {value} | {target} |\n"));
        }
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        s.push_str(&format!(
            "\nOutcomes of the backlog run: {}\n",
            outcomes.join(", ")
        ));
        s.push_str(&self.latency_markdown());
        s.push_str(&self.effects_markdown());
        s.push_str(&self.changelog_markdown());
        s
    }

    /// The changelog phase: each row against the mean of the two runs with
    /// the changelog off (the first and the last: the order of the runs
    /// moves the figures as much as what is measured).
    fn changelog_markdown(&self) -> String {
        let (Some(first), Some(last)) = (self.changelog.first(), self.changelog.last()) else {
            return String::new();
        };
        let base = EffectsRow {
            records_per_second: (first.records_per_second + last.records_per_second) / 2.0,
            redis_us_per_record: (first.redis_us_per_record + last.redis_us_per_record) / 2.0,
            ..first.clone()
        };
        let mut s = format!(
            "\nChangelog ({} records of one stream per row, each through idem on its own topic):\n\n\
             | changelog | records/s (outcomes) | ÷ off (mean of both) | records/s until published | guard µs per record | + µs vs off (mean) | Redis CPU µs per record | outbox bytes per entry |\n|---|---|---|---|---|---|---|---|\n",
            base.records
        );
        let or_dash = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0}"));
        for r in &self.changelog {
            s.push_str(&format!(
                "| {} | {:.0} | {:.2} | {} | {:.1} | {:+.1} | {:.1} | {} |\n",
                r.name,
                r.records_per_second,
                r.records_per_second / base.records_per_second.max(1e-9),
                or_dash(r.to_changelog_records_per_second),
                r.redis_us_per_record,
                r.redis_us_per_record - base.redis_us_per_record,
                r.redis_cpu_us_per_record,
                or_dash(r.outbox_bytes_per_entry),
            ));
        }
        s
    }

    /// The effects phase: each variant against the first (no effects), same run.
    fn effects_markdown(&self) -> String {
        let Some(base) = self.effects.first() else {
            return String::new();
        };
        let mut s = format!(
            "\nEffects ({} records of one payments stream per variant, each through idem on its own topic):\n\n\
             | effects declared | records/s | ÷ none | Redis µs per record | + µs vs none | Redis bytes per entity (its keys) |\n|---|---|---|---|---|---|\n",
            base.records
        );
        for r in &self.effects {
            s.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.1} | {:+.1} | {:.0} |\n",
                r.name,
                r.records_per_second,
                r.records_per_second / base.records_per_second.max(1e-9),
                r.redis_us_per_record,
                r.redis_us_per_record - base.redis_us_per_record,
                r.redis_bytes_per_entity
            ));
        }
        s
    }

    /// The table's rows: (measure, value, target).
    fn rows(&self) -> Vec<(String, String, &'static str)> {
        [self.throughput_rows(), self.cost_rows(), self.idem_rows()].concat()
    }

    /// idem's own costs over the backlog, in both tables.
    fn idem_rows(&self) -> Vec<(String, String, &'static str)> {
        vec![
            (
                "idem peak resident memory".into(),
                format!("{:.1} MB", self.idem_peak_rss_bytes as f64 / 1e6),
                "≤ 100 MB",
            ),
            (
                "idem CPU per million records".into(),
                format!("{:.2} s", self.idem_cpu_seconds_per_million),
                "",
            ),
            (
                "cores busy over the backlog".into(),
                self.busy.summary(),
                "Redis ≥ 0.90",
            ),
        ]
    }

    /// What the backlog phase alone measures (`--throughput-only`).
    fn backlog_rows(&self) -> Vec<(String, String, &'static str)> {
        let mut rows = self.backlog_rate_rows();
        rows.push((
            "Redis bytes per remembered id (id hashes only)".into(),
            format!("{:.1}", self.redis_bytes_per_id_dedupe),
            "",
        ));
        rows
    }

    /// The backlog's rate and Redis's work per record.
    fn backlog_rate_rows(&self) -> Vec<(String, String, &'static str)> {
        let us = |v: Option<f64>| v.map_or("n/a (cluster)".to_string(), |v| format!("{v:.2} µs"));
        vec![
            (
                "idem end to end (Kafka backlog → Redis)".into(),
                format!("{:.0} records/s", self.idem_records_per_second),
                "",
            ),
            (
                "Redis CPU per record over the backlog (INFO cpu)".into(),
                us(self.redis.map(|r| r.cpu_us)),
                "",
            ),
            (
                "guard script time per record over the backlog (INFO commandstats)".into(),
                us(self.redis.map(|r| r.script_us)),
                "",
            ),
            (
                "of it, the commands the script ran, per record".into(),
                us(self.redis.map(|r| r.commands_us)),
                "",
            ),
            (
                "of it, the script's time outside its commands, per record".into(),
                us(self.redis.map(|r| r.outside_us)),
                "",
            ),
            (
                "commands the script ran per record".into(),
                self.redis
                    .map_or("–".into(), |r| format!("{:.2}", r.commands)),
                "",
            ),
        ]
    }

    /// Throughput and the baselines: (measure, value, target).
    fn throughput_rows(&self) -> Vec<(String, String, &'static str)> {
        let per_second =
            |rate: f64, records: usize| format!("{rate:.0} records/s ({records} records)");
        // Redis bytes per id follow in cost_rows.
        let mut rows = self.backlog_rate_rows();
        rows.extend([
            (
                "(a) naive consumer (3 round trips + sync commit per record)".into(),
                per_second(self.naive_records_per_second, self.naive_records),
                "",
            ),
            (
                "(b) per-event script ceiling (1 script call per event, pipelined, no Kafka)"
                    .into(),
                per_second(self.ceiling_records_per_second, self.ceiling_records),
                "",
            ),
            (
                "(c) the guard alone (idem's batches, offset marks, no Kafka)".into(),
                per_second(
                    self.guard_alone.records_per_second,
                    self.guard_alone.records,
                ),
                "",
            ),
            (
                "(c): Redis CPU per record (INFO cpu)".into(),
                format!("{:.2} µs", self.guard_alone.redis.cpu_us),
                "≤ 5 µs",
            ),
            (
                "(c): guard script time per record (INFO commandstats)".into(),
                format!("{:.2} µs", self.guard_alone.redis.script_us),
                "",
            ),
            (
                "(c): of it, commands / outside them / commands per record".into(),
                format!(
                    "{:.2} µs / {:.2} µs / {:.2}",
                    self.guard_alone.redis.commands_us,
                    self.guard_alone.redis.outside_us,
                    self.guard_alone.redis.commands
                ),
                "",
            ),
            (
                "idem ÷ (a)".into(),
                format!("{:.1}×", self.ratio_vs_naive),
                "≥ 20×",
            ),
            (
                "idem ÷ (b)".into(),
                format!("{:.2}×", self.ratio_vs_ceiling),
                "≥ 1.0×",
            ),
        ]);
        rows
    }

    /// Memory, latency and idem's own costs: (measure, value, target).
    fn cost_rows(&self) -> Vec<(String, String, &'static str)> {
        vec![
            (
                "Redis bytes per remembered id (id hashes only)".into(),
                format!("{:.1}", self.redis_bytes_per_id_dedupe),
                "≤ 40",
            ),
            (
                "Redis bytes per remembered id (all keys, incl. state)".into(),
                format!("{:.1}", self.redis_bytes_per_id_total),
                "",
            ),
            (
                format!(
                    "latency p50 at {:.0} records/s",
                    self.latency_rate_per_second
                ),
                format!("≤ {:.0} ms", self.latency_p50_ms),
                "",
            ),
            (
                "latency p99".into(),
                format!("≤ {:.0} ms", self.latency_p99_ms),
                "≤ 20 ms",
            ),
            (
                "latency p99.9".into(),
                format!("≤ {:.0} ms", self.latency_p999_ms),
                "",
            ),
        ]
    }
}

/// The upper bound of the bucket holding quantile `q` of a cumulative
/// Prometheus histogram given as (upper bound, cumulative count) pairs.
///
/// | buckets (le → cumulative) | q    | result |
/// |---------------------------|------|--------|
/// | 1→50, 2→100               | 0.5  | 1      |
/// | 1→50, 2→100               | 0.51 | 2      |
/// | 1→0, 2→0                  | 0.5  | NaN    |
pub fn quantile_upper_bound(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= rank)
        .map_or(f64::INFINITY, |(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_single_latency_figures_are_the_half_rate_level_or_the_only_one() {
        let level =
            |share: Option<f64>, rate: f64, p99_ms: f64| super::super::latency::LatencyLevel {
                share_of_maximum: share,
                rate_per_second: rate,
                p99_ms,
                ..Default::default()
            };
        let mut report = BenchReport::default();
        report.set_latency(vec![
            level(Some(0.25), 10.0, 30.0),
            level(Some(0.5), 20.0, 50.0),
            level(Some(0.75), 30.0, 500.0),
        ]);
        assert_eq!(
            (report.latency_rate_per_second, report.latency_p99_ms),
            (20.0, 50.0)
        );
        let table = report.latency_markdown();
        assert_eq!(
            table.matches("\n| ").count(),
            4,
            "a header and three levels: {table}"
        );
        assert!(table.contains("| 75% | 30 |"), "{table}");
        report.set_latency(vec![level(None, 5.0, 20.0)]);
        assert_eq!(
            (report.latency_rate_per_second, report.latency_p99_ms),
            (5.0, 20.0)
        );
        assert!(report.latency_markdown().contains("| (asked) | 5 |"));
    }

    #[test]
    fn quantiles_by_table() {
        let b = [(1.0, 50.0), (2.0, 100.0)];
        assert_eq!(quantile_upper_bound(&b, 0.5), 1.0);
        assert_eq!(quantile_upper_bound(&b, 0.51), 2.0);
        assert!(quantile_upper_bound(&[(1.0, 0.0), (2.0, 0.0)], 0.5).is_nan());
        let b = [(1.0, 10.0), (5.0, 990.0), (f64::INFINITY, 1000.0)];
        assert_eq!(quantile_upper_bound(&b, 0.99), 5.0);
        assert_eq!(quantile_upper_bound(&b, 0.999), f64::INFINITY);
    }
}
