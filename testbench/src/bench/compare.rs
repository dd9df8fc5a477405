//! `--compare-idem`: other idem builds, or this one with other settings,
//! on the same backlog as this build, alternated within one run so that
//! every figure is a ratio measured under the same load
//! (docs/performance.md, "Comparing builds").
//!
//! Each run consumes the whole backlog with a group and a key prefix of its
//! own; the order rotates every round so that no build always goes first.

use std::path::PathBuf;

use serde::Serialize;

use super::backlog::{run_on_backlog, Backlog};
use super::io::{cleanup, progress, standalone_redis};
use super::BenchSpec;

/// One build to measure beside this one: a name, a binary and the
/// variables it gets (an older binary refuses keys it does not know, so
/// each gets only its own).
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub exe: PathBuf,
    /// `{topic}` in a value stands for the benchmark topic.
    pub env: Vec<(String, String)>,
}

impl Variant {
    /// `NAME=PATH [KEY=VALUE ...]`, e.g.
    /// `per-field=target/release/idem IDEM__STATE__ORDER=per_field`.
    pub fn parse(text: &str) -> Result<Variant, String> {
        let mut words = text.split_whitespace();
        let head = words.next().unwrap_or("");
        let (name, exe) = head
            .split_once('=')
            .filter(|(n, e)| !n.is_empty() && !e.is_empty())
            .ok_or_else(|| format!("{text:?}: expected NAME=PATH [KEY=VALUE ...]"))?;
        let env = words
            .map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("{w:?} in {text:?}: expected KEY=VALUE"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Variant {
            name: name.to_string(),
            exe: PathBuf::from(exe),
            env,
        })
    }
}

/// What one build did, run by run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompareRow {
    pub name: String,
    pub exe: String,
    pub env: Vec<String>,
    pub records_per_second: Vec<f64>,
    pub idem_cpu_seconds_per_million: Vec<f64>,
    /// Redis's own CPU (`INFO cpu`, user + sys) per record, µs.
    pub redis_cpu_us_per_record: Vec<f64>,
    /// Time Redis spent in the guard script (`INFO commandstats`) per record, µs.
    pub script_us_per_record: Vec<f64>,
    /// Of it, the commands the script ran, µs per record.
    pub commands_us_per_record: Vec<f64>,
    /// Of it, the script's own time outside its commands, µs per record.
    pub outside_us_per_record: Vec<f64>,
    /// Commands the script ran per record.
    pub commands_per_record: Vec<f64>,
    /// Redis's cores busy over the backlog (standalone only; issue #27, target 4).
    pub redis_cores_busy: Vec<f64>,
}

/// This build first, then each variant, for `spec.compare_rounds` rounds.
pub async fn run(spec: &BenchSpec, backlog: &Backlog) -> anyhow::Result<Vec<CompareRow>> {
    let this = Variant {
        name: "this build".into(),
        exe: spec.idem_exe.clone(),
        env: Vec::new(),
    };
    let variants: Vec<&Variant> = std::iter::once(&this).chain(&spec.compare).collect();
    let mut rows: Vec<CompareRow> = variants
        .iter()
        .map(|v| CompareRow {
            name: v.name.clone(),
            exe: v.exe.display().to_string(),
            env: v.env.iter().map(|(k, val)| format!("{k}={val}")).collect(),
            ..CompareRow::default()
        })
        .collect();
    let mut redis = standalone_redis(spec).await?;
    for round in 0..spec.compare_rounds.max(1) {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let v = variants[i];
            let name = format!("{}-{i}-{round}", backlog.topic);
            progress(&format!(
                "round {}: {} ({})",
                round + 1,
                v.name,
                v.exe.display()
            ));
            let env: Vec<(String, String)> = v
                .env
                .iter()
                .map(|(k, val)| (k.clone(), val.replace("{topic}", &backlog.topic)))
                .collect();
            let measured =
                run_on_backlog(spec, backlog, &v.exe, &env, &name, redis.as_mut()).await?;
            let row = &mut rows[i];
            row.records_per_second.push(measured.records_per_second);
            row.idem_cpu_seconds_per_million
                .push(measured.idem_cpu_seconds_per_million);
            if let Some(r) = measured.redis {
                row.redis_cpu_us_per_record.push(r.cpu_us);
                row.script_us_per_record.push(r.script_us);
                row.commands_us_per_record.push(r.commands_us);
                row.outside_us_per_record.push(r.outside_us);
                row.commands_per_record.push(r.commands);
            }
            row.redis_cores_busy.extend(measured.busy.redis_cores_busy);
            measured.stop();
            if let Some(r) = redis.as_mut() {
                cleanup(r, &name).await;
            }
        }
    }
    Ok(rows)
}

/// The median of `v` (the mean of the middle two for an even count): one
/// run disturbed by the shared machine moves it less than a mean.
fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The comparison as Markdown: every run, then each median's ratio to
/// this build's median.
pub fn to_markdown(rows: &[CompareRow]) -> String {
    type Column = (&'static str, usize, fn(&CompareRow) -> &[f64]);
    let columns: [Column; 8] = [
        ("records/s", 0, |r| &r.records_per_second),
        ("idem CPU s per million", 2, |r| {
            &r.idem_cpu_seconds_per_million
        }),
        ("Redis CPU µs per record", 2, |r| {
            &r.redis_cpu_us_per_record
        }),
        ("guard script µs per record", 2, |r| {
            &r.script_us_per_record
        }),
        ("of it commands µs", 2, |r| &r.commands_us_per_record),
        ("of it outside commands µs", 2, |r| {
            &r.outside_us_per_record
        }),
        ("commands per record", 2, |r| &r.commands_per_record),
        ("Redis cores busy", 2, |r| &r.redis_cores_busy),
    ];
    let mut s = String::from("| build |");
    for (name, _, _) in &columns {
        s.push_str(&format!(" {name} (runs) | ÷ this (medians) |"));
    }
    s.push_str(&format!("\n|---|{}\n", "---|---|".repeat(columns.len())));
    let Some(base) = rows.first() else {
        return s;
    };
    let runs = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // "—" where a figure is not known (Redis's, on a cluster).
    let ratio = |v: &[f64], b: &[f64]| match median(v) / median(b) {
        r if r.is_nan() => "—".to_string(),
        r => format!("{r:.2}"),
    };
    for r in rows {
        let label = if r.env.is_empty() {
            r.name.clone()
        } else {
            format!("{} ({})", r.name, r.env.join(" "))
        };
        s.push_str(&format!("| {label} |"));
        for (_, digits, field) in &columns {
            s.push_str(&format!(
                " {} | {} |",
                runs(field(r), *digits),
                ratio(field(r), field(base))
            ));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_is_a_name_a_binary_and_its_own_variables() {
        let v =
            Variant::parse("per-field=target/release/idem IDEM__STATE__ORDER=per_field").unwrap();
        assert_eq!(v.name, "per-field");
        assert_eq!(v.exe, PathBuf::from("target/release/idem"));
        assert_eq!(
            v.env,
            [("IDEM__STATE__ORDER".to_string(), "per_field".to_string())]
        );
        assert_eq!(Variant::parse("old=/tmp/idem").unwrap().env, []);
        for bad in ["", "old", "=x", "old=", "old=/tmp/idem NOVALUE"] {
            let e = Variant::parse(bad).unwrap_err();
            assert!(e.contains("expected"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ratios_are_to_this_builds_median() {
        let row = |name: &str, rps: Vec<f64>| CompareRow {
            name: name.into(),
            records_per_second: rps,
            idem_cpu_seconds_per_million: vec![2.0],
            redis_cpu_us_per_record: vec![4.0],
            script_us_per_record: vec![3.0],
            ..CompareRow::default()
        };
        let md = to_markdown(&[
            row("this build", vec![100.0, 200.0, 900.0]),
            row("old", vec![100.0, 600.0]),
        ]);
        // Medians: 200 and 350.
        assert!(md.contains("| this build | 100, 200, 900 | 1.00 |"), "{md}");
        assert!(md.contains("| old | 100, 600 | 1.75 |"), "{md}");
        // Redis's cores busy is not known for either (a cluster): no ratio.
        // Nor the commands' split: no ratio either.
        assert!(
            md.ends_with("| 3.00 | 1.00 |  | — |  | — |  | — |  | — |\n"),
            "{md}"
        );
    }
}
