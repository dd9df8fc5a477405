//! Filtering of the rendered exposition. metrics-exporter-prometheus cannot
//! delete one series, and a revoked partition's last values would otherwise
//! be exported forever, adding stale lag and offsets to the new owner's in
//! every `sum by (topic, partition)`. So the endpoint drops, at render
//! time, every series labelled with a topic and a partition that this
//! instance does not own. Unlike the exporter's idle timeout this is
//! immediate and needs no refresher for idle-but-owned partitions.

use std::collections::HashSet;

use crate::offsets::TopicPartition;

/// `text` without the samples whose `topic` and `partition` labels name a
/// partition outside `owned`. Comments and series without both labels stay.
pub fn keep_owned(text: &str, owned: &HashSet<TopicPartition>) -> String {
    let mut kept = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let stale = partition_of(line).is_some_and(|(topic, partition)| {
            !owned.contains(&TopicPartition::new(topic, partition))
        });
        if !stale {
            kept.push_str(line);
        }
    }
    kept
}

/// The `topic` and `partition` labels of a sample line, if it has both.
fn partition_of(line: &str) -> Option<(String, i32)> {
    if line.starts_with('#') {
        return None;
    }
    let (_, rest) = line.split_once('{')?;
    let (mut topic, mut partition) = (None, None);
    for (name, value) in labels(rest) {
        match name {
            "topic" => topic = Some(value),
            "partition" => partition = value.parse().ok(),
            _ => {}
        }
    }
    Some((topic?, partition?))
}

/// The `name="value"` pairs of a label block (`rest` starts just after its
/// `{`), values unescaped; stops at the closing `}`.
fn labels(rest: &str) -> Vec<(&str, String)> {
    let mut pairs = Vec::new();
    let mut rest = rest;
    while let Some((name, after)) = rest.split_once("=\"") {
        let name = name.trim_start_matches(',');
        if name.contains('}') {
            break;
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        pairs.push((name, value));
        rest = &after[end..];
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP idem_consumer_lag Records between the committed offset and the end.
# TYPE idem_consumer_lag gauge
idem_consumer_lag{group=\"g\",topic=\"orders\",partition=\"0\"} 5
idem_consumer_lag{group=\"g\",topic=\"orders\",partition=\"1\"} 7
idem_consumer_lag{group=\"a,\\\"b\",topic=\"orders.v2\",partition=\"1\"} 9
# TYPE idem_events_total counter
idem_events_total{group=\"g\",topic=\"orders\",outcome=\"applied\"} 3
idem_paused{group=\"g\"} 0
idem_up 1
";

    fn owned(tps: &[(&str, i32)]) -> HashSet<TopicPartition> {
        tps.iter()
            .map(|(t, p)| TopicPartition::new(*t, *p))
            .collect()
    }

    #[test]
    fn only_owned_partitions_keep_their_series() {
        let kept = keep_owned(TEXT, &owned(&[("orders", 1)]));
        let expected: String = TEXT
            .lines()
            .filter(|l| !l.contains("partition=\"0\"") && !l.contains("orders.v2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn nothing_owned_keeps_everything_without_a_partition() {
        let kept = keep_owned(TEXT, &HashSet::new());
        assert!(!kept.contains("partition="), "{kept}");
        assert!(kept.contains("idem_events_total{"), "{kept}");
        assert!(kept.contains("idem_up 1"), "{kept}");
        assert!(kept.contains("# HELP idem_consumer_lag"), "{kept}");
    }

    #[test]
    fn escaped_label_values_do_not_confuse_the_parser() {
        let line = "m{group=\"a,\\\"b\",topic=\"orders.v2\",partition=\"1\"} 9\n";
        assert_eq!(partition_of(line), Some(("orders.v2".to_string(), 1)));
        let kept = keep_owned(line, &owned(&[("orders.v2", 1)]));
        assert_eq!(kept, line);
    }
}
