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
            row.redis_cpu_us_per_record
                .extend(measured.redis_cpu_us_per_record);
            row.script_us_per_record
                .extend(measured.script_us_per_record);
            row.redis_cores_busy.extend(measured.busy.redis_cores_busy);
            measured.stop();
            if let Some(r) = redis.as_mut() {
                cleanup(r, &name).await;
            }
        }
    }
    Ok(rows)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The comparison as Markdown: every run, the mean and its ratio to this build's.
pub fn to_markdown(rows: &[CompareRow]) -> String {
    let mut s = String::from(
        "| build | records/s (runs) | ÷ this build | idem CPU s per million | ÷ | Redis CPU µs per record | ÷ | guard script µs per record | ÷ | Redis cores busy | ÷ |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
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
    let ratio = |v: &[f64], b: &[f64]| match mean(v) / mean(b) {
        r if r.is_nan() => "—".to_string(),
        r => format!("{r:.2}"),
    };
    for r in rows {
        let label = if r.env.is_empty() {
            r.name.clone()
        } else {
            format!("{} ({})", r.name, r.env.join(" "))
        };
        s.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            runs(&r.records_per_second, 0),
            ratio(&r.records_per_second, &base.records_per_second),
            runs(&r.idem_cpu_seconds_per_million, 2),
            ratio(
                &r.idem_cpu_seconds_per_million,
                &base.idem_cpu_seconds_per_million
            ),
            runs(&r.redis_cpu_us_per_record, 2),
            ratio(&r.redis_cpu_us_per_record, &base.redis_cpu_us_per_record),
            runs(&r.script_us_per_record, 2),
            ratio(&r.script_us_per_record, &base.script_us_per_record),
            runs(&r.redis_cores_busy, 2),
            ratio(&r.redis_cores_busy, &base.redis_cores_busy),
        ));
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
    fn ratios_are_to_this_builds_mean() {
        let row = |name: &str, rps: Vec<f64>| CompareRow {
            name: name.into(),
            records_per_second: rps,
            idem_cpu_seconds_per_million: vec![2.0],
            redis_cpu_us_per_record: vec![4.0],
            script_us_per_record: vec![3.0],
            ..CompareRow::default()
        };
        let md = to_markdown(&[
            row("this build", vec![100.0, 300.0]),
            row("old", vec![100.0]),
        ]);
        assert!(md.contains("| this build | 100, 300 | 1.00 |"), "{md}");
        assert!(md.contains("| old | 100 | 0.50 |"), "{md}");
        // Redis's cores busy is not known for either (a cluster): no ratio.
        assert!(md.ends_with("| 1.00 |  | — |\n"), "{md}");
    }
}
