//! Reading Prometheus's text exposition format (what idem's `/metrics`
//! serves), for the tests, the conformance suite and the bench.
//!
//! Why not a crate: the parsers on crates.io split labels on `,` and `=`
//! (wrong for values holding either), drop a histogram's labels other than
//! `le`, and pull in chrono and regex; this reader is small and exact for
//! the format's sample lines.

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// Every sample of `text`; comments, blank and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The sum of `name`'s samples whose labels include all of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse(text)
        .iter()
        .filter(|s| s.name == name && s.has_labels(labels))
        .map(|s| s.value)
        .sum()
}

/// A histogram's cumulative buckets as (upper bound, count), summed over
/// its other labels, in increasing bound order.
pub fn buckets(text: &str, histogram: &str) -> Vec<(f64, f64)> {
    let name = format!("{histogram}_bucket");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in parse(text).iter().filter(|s| s.name == name) {
        let Some(le) = s.label("le").and_then(parse_value) else {
            continue;
        };
        match out.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, count)) => *count += s.value,
            None => out.push((le, s.value)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (Vec::new(), &line[name_end..])
    };
    // The value, then an optional timestamp.
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"}` → the pairs (escapes resolved) and what follows `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once('=')?;
        let mut chars = rest.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &rest[1 + end + 1..];
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP idem_events_total Events by topic and outcome.
# TYPE idem_events_total counter
idem_events_total{topic="a",outcome="applied"} 5
idem_events_total{topic="a",outcome="duplicate"} 2
idem_events_total{topic="ab",outcome="applied"} 7
idem_events_total{topic="odd,=\"x\"",outcome="applied"} 1 1700000000000
idem_up 1
idem_lat_bucket{topic="a",le="0.5"} 3
idem_lat_bucket{topic="b",le="0.5"} 1
idem_lat_bucket{topic="a",le="+Inf"} 4
idem_lat_bucket{topic="b",le="+Inf"} 2
not a sample line
"#;

    #[test]
    fn sums_match_labels_exactly() {
        assert_eq!(sum(TEXT, "idem_events_total", &[]), 15.0);
        assert_eq!(sum(TEXT, "idem_events_total", &[("topic", "a")]), 7.0);
        assert_eq!(
            sum(
                TEXT,
                "idem_events_total",
                &[("topic", "a"), ("outcome", "applied")]
            ),
            5.0
        );
        assert_eq!(
            sum(TEXT, "idem_events_total", &[("topic", "odd,=\"x\"")]),
            1.0
        );
        assert_eq!(sum(TEXT, "idem_up", &[]), 1.0);
        assert_eq!(sum(TEXT, "idem_missing", &[]), 0.0);
    }

    #[test]
    fn buckets_sum_over_other_labels_in_bound_order() {
        assert_eq!(
            buckets(TEXT, "idem_lat"),
            vec![(0.5, 4.0), (f64::INFINITY, 6.0)]
        );
    }

    #[test]
    fn lines_parse_by_table() {
        assert_eq!(parse_line("# HELP x y"), None);
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("x{a=\"1\"}"), None, "no value");
        assert_eq!(parse_line("x{a=\"1} 2"), None, "unterminated value");
        let s = parse_line("x{a=\"l\\nm\",b=\"\"} -Inf").unwrap();
        assert_eq!(
            s.labels,
            vec![("a".into(), "l\nm".into()), ("b".into(), "".into())]
        );
        assert_eq!(s.value, f64::NEG_INFINITY);
        assert!(parse_line("x NaN").unwrap().value.is_nan());
    }
}
