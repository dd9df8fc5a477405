//! CPU readings from `/proc`: a process's CPU seconds, the machine's busy
//! seconds, and the local Kafka broker's process, so that a run can say
//! which resource bound it (Redis, idem, the broker, or the machine's cores).

use std::process::Command;
use std::sync::OnceLock;

use serde::Serialize;

/// The fields of `/proc/PID/stat` after the command name.
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; it ends at the last ')'.
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process so far (0 when it is gone).
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15 of /proc/PID/stat; 12 and 13 after the name.
    proc_stat_fields(pid)
        .and_then(|f| Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?))
        .map_or(0.0, |ticks| ticks / clock_ticks_per_second())
}

/// The machine's busy CPU seconds so far, summed over its cores (every
/// state of `/proc/stat`'s `cpu` line but idle and iowait), and its cores.
fn machine_busy_seconds() -> Option<(f64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let total = stat.lines().next()?;
    let ticks: Vec<f64> = total
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    Some((busy / clock_ticks_per_second(), cores))
}

/// The pid of the local Kafka broker (a JVM running `kafka.Kafka`), if any.
fn broker_pid() -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.iter().any(|a| *a == b"kafka.Kafka").then_some(pid)
    })
}

/// A reading at the start of a measured span.
pub(super) struct Start {
    machine: Option<(f64, usize)>,
    broker: Option<(u32, f64)>,
}

pub(super) fn start() -> Start {
    Start {
        machine: machine_busy_seconds(),
        broker: broker_pid().map(|pid| (pid, cpu_seconds(pid))),
    }
}

/// Where the cores went over a span, in cores busy on average (1.0 is one
/// core all the time).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Busy {
    /// The machine's cores.
    pub cores: usize,
    /// The whole machine, every process.
    pub machine_cores_busy: Option<f64>,
    /// The local Kafka broker, when one runs here.
    pub broker_cores_busy: Option<f64>,
    /// Redis (`INFO cpu`, standalone only).
    pub redis_cores_busy: Option<f64>,
    /// Every idem instance.
    pub idem_cores_busy: f64,
}

impl Start {
    /// The span from the start to now, `seconds` long, with idem's and
    /// Redis's CPU seconds over it (measured by the caller).
    pub(super) fn busy(&self, seconds: f64, idem_cpu: f64, redis_cpu: Option<f64>) -> Busy {
        let per_second = |cpu: f64| cpu / seconds.max(1e-9);
        let machine = match (self.machine, machine_busy_seconds()) {
            (Some((before, cores)), Some((after, _))) => Some((per_second(after - before), cores)),
            _ => None,
        };
        Busy {
            cores: machine.map_or(0, |(_, cores)| cores),
            machine_cores_busy: machine.map(|(busy, _)| busy),
            broker_cores_busy: self
                .broker
                .map(|(pid, before)| per_second(cpu_seconds(pid) - before)),
            redis_cores_busy: redis_cpu.map(per_second),
            idem_cores_busy: per_second(idem_cpu),
        }
    }
}

impl Busy {
    /// One line: each part's cores, and what the machine had.
    pub fn summary(&self) -> String {
        let cores = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.2}"));
        format!(
            "Redis {}, idem {:.2}, broker {}; machine {} of {} cores",
            cores(self.redis_cores_busy),
            self.idem_cores_busy,
            cores(self.broker_cores_busy),
            cores(self.machine_cores_busy),
            self.cores
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_and_the_machine_have_used_cpu() {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed().as_millis() < 50 {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(cpu_seconds(std::process::id()) > 0.0);
        let (busy, cores) = machine_busy_seconds().expect("/proc/stat is readable");
        assert!(busy > 0.0 && cores >= 1, "busy {busy}, cores {cores}");
    }

    #[test]
    fn busy_divides_cpu_seconds_by_the_span() {
        let start = Start {
            machine: None,
            broker: None,
        };
        let busy = start.busy(2.0, 1.0, Some(1.5));
        assert_eq!(busy.idem_cores_busy, 0.5);
        assert_eq!(busy.redis_cores_busy, Some(0.75));
        assert_eq!(busy.machine_cores_busy, None);
        assert!(busy
            .summary()
            .starts_with("Redis 0.75, idem 0.50, broker ?"));
    }
}
