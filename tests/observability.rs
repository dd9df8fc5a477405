//! Metrics an operator can trust: exact counts for a scripted scenario, alert
//! rules that pass promtool and fire in a real Prometheus, and a dashboard
//! that only queries metrics idem exposes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use idem::model::Outcome;

const CATCH_UP: Duration = Duration::from_secs(120);
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn event(id: &str, entity: &str, seq: u64, v: &str) -> Vec<u8> {
    format!(r#"{{"id":"{id}","entity":"{entity}","seq":{seq},"data":{{"v":"{v}"}}}}"#).into_bytes()
}

/// A scenario with known counts, on one key so that its order is fixed.
fn scenario(tag: &str) -> (Vec<Vec<u8>>, [u64; 5]) {
    let (applied, dups, stale, conflicts, invalid) = (40u64, 15u64, 7u64, 3u64, 5u64);
    let mut values = Vec::new();
    for i in 0..applied {
        values.push(event(
            &format!("{tag}-a{i}"),
            &format!("{tag}:e{}", i % 4),
            100 + i,
            "x",
        ));
    }
    for i in 0..dups {
        values.push(values[i as usize].clone()); // redelivered copies
    }
    for i in 0..stale {
        values.push(event(
            &format!("{tag}-s{i}"),
            &format!("{tag}:e{}", i % 4),
            i,
            "old",
        )); // lower seq
    }
    for i in 0..conflicts {
        values.push(event(
            &format!("{tag}-a{i}"),
            &format!("{tag}:e{}", i % 4),
            999,
            "other",
        )); // id reused
    }
    for i in 0..invalid {
        values.push(format!("{{\"broken\":{i}").into_bytes());
    }
    (values, [applied, dups, stale, conflicts, invalid])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_scenario_exactly() {
    let topic = unique("metrics");
    create_topic(&topic, 1).await;
    let (values, [applied, dups, stale, conflicts, invalid]) = scenario(&topic);
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|v| (Some(&b"k"[..]), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;

    let text = idem.metrics().await.unwrap();
    let count = |outcome: &str| {
        sum_metric(
            &text,
            "idem_events_total",
            &[("topic", &topic), ("outcome", outcome)],
        )
    };
    assert_eq!(
        [
            count("applied"),
            count("duplicate"),
            count("stale"),
            count("conflict"),
            count("invalid")
        ],
        [applied, dups, stale, conflicts, invalid]
    );
    assert_eq!(
        sum_metric(&text, "idem_dead_letters_total", &[("reason", "conflict")]),
        conflicts
    );
    assert_eq!(
        sum_metric(&text, "idem_dead_letters_total", &[("topic", &topic)]),
        conflicts + invalid
    );
    assert_eq!(
        sum_metric(&text, "idem_duplicate_age_seconds_count", &[]),
        dups
    );
    assert_eq!(
        sum_metric(
            &text,
            "idem_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1
    );
    let build = text
        .lines()
        .find(|l| l.starts_with("idem_build_info{"))
        .unwrap_or_default();
    assert!(
        build.contains("commit=\"") && !build.contains("commit=\"\""),
        "{build}"
    );
    for line in text.lines().filter(|l| l.starts_with("idem_")) {
        assert!(
            !line.contains(":e0") && !line.contains("-a0"),
            "a label carries an entity or an id: {line}"
        );
    }
    idem.terminate().await;
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("idem_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        i = end;
    }
    names
}

/// One row of the metrics table of docs/metrics.md.
struct Documented {
    kind: String,
    /// Each closed label with its values (labels listed without values are open).
    values: BTreeMap<String, BTreeSet<String>>,
    exported: String,
    meaning: String,
}

/// The metrics table of docs/metrics.md, by name.
fn documented_metrics() -> BTreeMap<String, Documented> {
    let doc = std::fs::read_to_string(format!("{ROOT}/docs/metrics.md")).unwrap();
    doc.lines()
        .filter(|l| l.starts_with("| `idem_"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let name = cells[0].trim_matches('`').to_string();
            let values = cells[2]
                .split(';')
                .filter_map(|label| label.split_once(':'))
                .map(|(label, values)| {
                    let values = values.split(',').map(|v| v.trim().to_string()).collect();
                    (label.trim().to_string(), values)
                })
                .collect();
            let row = Documented {
                kind: cells[1].to_string(),
                values,
                exported: cells[3].to_string(),
                meaning: cells[4].to_string(),
            };
            (name, row)
        })
        .collect()
}

/// `# HELP` lines of an exposition: name → text.
fn exposed_help(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, help)| (name.to_string(), help.to_string()))
        .collect()
}

/// Every value each label of `name` takes in an exposition.
fn exposed_values(text: &str, name: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sample in idem_testbench::exposition::parse(text) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| sample.name.strip_suffix(s))
            .unwrap_or(&sample.name);
        if base == name {
            for (k, v) in sample.labels {
                values.entry(k).or_default().insert(v);
            }
        }
    }
    values
}

/// Every closed label's values of `documented` against `text`: each
/// exposed value is listed, and with `all_listed` each listed value is exposed.
fn assert_label_values(documented: &BTreeMap<String, Documented>, text: &str, all_listed: bool) {
    for (name, row) in documented {
        let exposed = exposed_values(text, name);
        for (label, listed) in &row.values {
            let seen = exposed.get(label).cloned().unwrap_or_default();
            assert!(
                seen.is_subset(listed),
                "{name}{{{label}}}: exposed {seen:?}, docs/metrics.md lists {listed:?}"
            );
            if all_listed {
                assert_eq!(&seen, listed, "{name}{{{label}}} from start");
            }
        }
    }
}

/// `# TYPE` lines of an exposition: name → type.
fn exposed_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

/// The contract between idem's exposition, docs/metrics.md, the dashboard
/// and the alert rules: the documented type and HELP of every metric, the
/// series that exist before the first event, the group and key-prefix
/// labels, and only exposed metrics queried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_matches_docs_dashboard_and_alerts() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/grafana/dashboards/idem.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains(r#"group=~"$group""#), "{expr}");
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(
        variables,
        BTreeSet::from(["datasource", "job", "group", "topic"])
    );
    exprs.push_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yml")).unwrap(),
    );
    let wanted = metric_names(&exprs);
    assert!(wanted.len() >= 10, "{wanted:?}");
    let documented = documented_metrics();

    // Before the first event: the series documented "from start".
    let topic = unique("exposition");
    create_topic(&topic, 1).await;
    create_topic_without_dlq(&format!("{topic}.changes"), 1).await;
    // With the changelog on, so that the relay's series exist too.
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM__KAFKA__LIBRDKAFKA__STATISTICS.INTERVAL.MS", "500")
            .with("IDEM__CHANGELOG__TOPICS", &topic),
    );
    wait_until("idem is ready", CATCH_UP, || async {
        http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    let start_text = idem.metrics().await.unwrap();
    let at_start = exposed_types(&start_text);
    let from_start: BTreeMap<String, Documented> = documented_metrics()
        .into_iter()
        .filter(|(_, row)| row.exported.starts_with("from start"))
        .collect();
    for (name, row) in &from_start {
        assert_eq!(at_start.get(name), Some(&row.kind), "{name} at start");
    }
    assert_label_values(&from_start, &start_text, true);

    // Some traffic of every kind, so every histogram and labelled series exists.
    let (values, _) = scenario(&topic);
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|v| (Some(&b"k"[..]), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    wait_until(
        "every documented and queried metric is exposed",
        Duration::from_secs(30),
        || async {
            let exposed = metric_names(&idem.metrics().await.unwrap_or_default());
            wanted.is_subset(&exposed) && documented.keys().all(|n| exposed.contains(n))
        },
    )
    .await;
    let text = idem.metrics().await.unwrap();
    let types = exposed_types(&text);
    let documented_types: BTreeMap<String, String> = documented
        .iter()
        .map(|(name, row)| (name.clone(), row.kind.clone()))
        .collect();
    assert_eq!(types, documented_types, "exposed vs documented types");
    let help = exposed_help(&text);
    for (name, row) in &documented {
        let help = help
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no HELP text"));
        assert!(
            row.meaning.starts_with(help.as_str()),
            "docs/metrics.md's {name} should start with its HELP text {help:?}: {:?}",
            row.meaning
        );
    }
    assert_label_values(&documented, &text, false);
    for sample in idem_testbench::exposition::parse(&text) {
        assert_eq!(sample.label("group"), Some(topic.as_str()), "{sample:?}");
        assert_eq!(
            sample.label("key_prefix"),
            Some(topic.as_str()),
            "{sample:?}"
        );
    }
    idem.terminate().await;
}

/// The partitions whose per-partition series an instance exports.
fn exported_partitions(text: &str) -> BTreeSet<(String, String)> {
    idem_testbench::exposition::parse(text)
        .into_iter()
        .filter(|s| {
            [
                "idem_partition_blocked",
                "idem_committed_offset",
                "idem_consumer_lag",
            ]
            .contains(&s.name.as_str())
        })
        .filter_map(|s| {
            Some((
                s.label("topic")?.to_string(),
                s.label("partition")?.to_string(),
            ))
        })
        .collect()
}

/// Two instances share two partitions, then a third joins as an idle
/// standby: no partition is exported by two instances (the old owner drops
/// a revoked partition's series), and the standby is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_leave_the_exposition_and_a_standby_is_ready() {
    revoked_partitions_and_a_standby("classic").await;
}

/// The same with Kafka 4's consumer group protocol: the broker's assignor
/// moves the partitions, the exposition and readiness follow alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_leave_the_exposition_and_a_standby_is_ready_under_the_consumer_protocol(
) {
    revoked_partitions_and_a_standby("consumer").await;
}

async fn revoked_partitions_and_a_standby(protocol: &str) {
    let topic = unique(&format!("owned-series-{protocol}"));
    create_topic(&topic, 2).await;
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__KAFKA__LIBRDKAFKA__STATISTICS.INTERVAL.MS", "500")
        .with("IDEM__KAFKA__GROUP_PROTOCOL", protocol);
    let first = Idem::spawn(&opts);
    let produce_round = |round: u32| {
        let topic = topic.clone();
        async move {
            let values: Vec<Vec<u8>> = (0..40)
                .map(|i| {
                    event(
                        &format!("{topic}-{round}-{i}"),
                        &format!("e{i}"),
                        1 + u64::from(round),
                        "x",
                    )
                })
                .collect();
            let keys: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
            let raw: Vec<RawRecord<'_>> = values
                .iter()
                .zip(&keys)
                .map(|(v, k)| (Some(k.as_bytes()), Some(v.as_slice())))
                .collect();
            produce_raw(&topic, &raw).await;
        }
    };
    produce_round(0).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    let all = BTreeSet::from([
        (topic.clone(), "0".to_string()),
        (topic.clone(), "1".to_string()),
    ]);
    assert_eq!(exported_partitions(&first.metrics().await.unwrap()), all);

    let second = Idem::spawn(&opts);
    wait_until("each instance owns one partition", CATCH_UP, || async {
        first.counter("idem_assigned_partitions", &[]).await == Some(1)
            && second.counter("idem_assigned_partitions", &[]).await == Some(1)
    })
    .await;
    produce_round(1).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    wait_until(
        "the two expositions split the partitions",
        CATCH_UP,
        || async {
            let a = exported_partitions(&first.metrics().await.unwrap_or_default());
            let b = exported_partitions(&second.metrics().await.unwrap_or_default());
            a.len() == 1 && b.len() == 1 && a.union(&b).cloned().collect::<BTreeSet<_>>() == all
        },
    )
    .await;

    // A third instance: one of the three (the newcomer, with a sticky
    // assignor) holds nothing, and every one of them is ready.
    let third = Idem::spawn(&opts);
    let members = [&first, &second, &third];
    wait_until(
        "all three are ready, one holding nothing",
        CATCH_UP,
        || async {
            let mut holding = Vec::new();
            for m in members {
                if http_get(m.metrics_port, "/readyz").await.as_deref() != Some("ready\n") {
                    return false;
                }
                holding.push(
                    m.counter("idem_assigned_partitions", &[])
                        .await
                        .unwrap_or(9),
                );
            }
            holding.iter().sum::<u64>() == 2 && holding.contains(&0)
        },
    )
    .await;
    for idem in [first, second, third] {
        idem.terminate().await;
    }
}

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_pass_promtool_and_fire_on_a_duplicate_flood() {
    let rules = format!("{ROOT}/deploy/prometheus/alerts.yml");
    assert_promtool_passes(&rules);

    let topic = unique("flood");
    create_topic(&topic, 1).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));

    // The shipped rules, with their `for:` holds shortened so the test need not wait 10 minutes.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let fast_rules: String = std::fs::read_to_string(&rules)
        .unwrap()
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                "        for: 0s".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("alerts.yml"), fast_rules).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: idem\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            dir.join("alerts.yml").display(),
            idem.metrics_port
        ),
    )
    .unwrap();
    let port = free_port();
    let prometheus = Prometheus {
        child: Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
        port,
    };

    // A duplicate flood: every event delivered five times, each round seen
    // by a scrape of its own. rate() needs samples that differ: a series
    // Prometheus first sees at its final value has a rate of zero, which is
    // what a flood produced before idem joined its group used to give.
    for round in 0..6u64 {
        let mut values = Vec::new();
        for i in 0..100 {
            let v = event(
                &format!("{topic}-{round}-{i}"),
                &format!("{topic}:{i}"),
                1 + round,
                "x",
            );
            for _ in 0..5 {
                values.push(v.clone());
            }
        }
        let raw: Vec<RawRecord<'_>> = values
            .iter()
            .map(|v| (Some(&b"k"[..]), Some(v.as_slice())))
            .collect();
        produce_raw(&topic, &raw).await;
        let seen = 500 * (round + 1);
        wait_until(
            &format!("Prometheus scrapes {seen} events of {topic}"),
            Duration::from_secs(60),
            || async { scraped_events(prometheus.port, &topic).await >= seen },
        )
        .await;
    }
    wait_until(
        "Prometheus fires IdemDuplicateRatioSpike",
        Duration::from_secs(90),
        || firing(prometheus.port, "IdemDuplicateRatioSpike", Some(&topic)),
    )
    .await;
    assert!(idem.outcome(&topic, Outcome::Duplicate).await >= 2000);

    // With the only instance gone, nothing else can fire: IdemDown must.
    idem.terminate().await;
    wait_until("Prometheus fires IdemDown", Duration::from_secs(90), || {
        firing(prometheus.port, "IdemDown", None)
    })
    .await;
}

/// `idem_events_total` of `topic`, over every outcome, as the Prometheus on
/// `port` last scraped it (0 before its first scrape of the series).
async fn scraped_events(port: u16, topic: &str) -> u64 {
    let Some(body) = http_get(port, "/api/v1/query?query=idem_events_total").await else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"].as_array().map_or(0, |series| {
        series
            .iter()
            .filter(|s| s["metric"]["topic"] == topic)
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    })
}

/// Whether the Prometheus on `port` has `alert` firing (for `topic`, if given).
async fn firing(port: u16, alert: &str, topic: Option<&str>) -> bool {
    let Some(body) = http_get(port, "/api/v1/alerts").await else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["alerts"].as_array().is_some_and(|alerts| {
        alerts.iter().any(|a| {
            a["labels"]["alertname"] == alert
                && topic.is_none_or(|t| a["labels"]["topic"] == t)
                && a["state"] == "firing"
        })
    })
}

/// Every alert rule links a runbook section that exists.
#[test]
fn every_alert_has_a_runbook_section() {
    let rules = std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yml")).unwrap();
    let runbook = std::fs::read_to_string(format!("{ROOT}/docs/runbook.md")).unwrap();
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .map(|l| l.trim_matches('"'))
        .collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    assert_eq!(alerts.len(), links.len(), "one runbook_url per rule");
    for (alert, link) in alerts.iter().zip(&links) {
        let anchor = alert.to_lowercase();
        assert_eq!(*link, format!("docs/runbook.md#{anchor}"), "{alert}");
        assert!(
            anchors.contains(&anchor),
            "docs/runbook.md has no `## {alert}`"
        );
    }
}

/// `/readyz` names what is wrong, each cause with its own instance: the
/// brokers unreachable, a consumed topic missing (until it is created),
/// Redis unreachable. Before, all three said "waiting to join the consumer
/// group, or for Redis".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_cause_it_knows() {
    async fn readyz_says(idem: &Idem, what: &str, needle: &str) {
        wait_until(what, CATCH_UP, || async {
            http_get(idem.metrics_port, "/readyz")
                .await
                .is_some_and(|body| body.starts_with("not ready: ") && body.contains(needle))
        })
        .await;
    }
    let closed = format!("127.0.0.1:{}", free_port());

    let topic = unique("ready-kafka");
    let no_kafka =
        Idem::spawn(&IdemOpts::new(&topic, &topic, &topic).with("IDEM__KAFKA__BROKERS", &closed));
    let missing = unique("ready-topic");
    let no_topic = Idem::spawn(&IdemOpts::new(&missing, &missing, &missing));
    let topic = unique("ready-redis");
    create_topic(&topic, 1).await;
    let no_redis = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM__REDIS__URL", &format!("redis://{closed}"))
            .with("IDEM__REDIS__MODE", "standalone"),
    );

    readyz_says(&no_kafka, "brokers unreachable", "Kafka unreachable").await;
    readyz_says(
        &no_topic,
        "topic missing",
        &format!("topic {missing} does not exist"),
    )
    .await;
    readyz_says(&no_redis, "Redis unreachable", "does not answer").await;
    no_kafka.kill();
    no_redis.kill();

    // Created, the topic is consumed and the instance becomes ready.
    create_topic(&missing, 1).await;
    wait_until("ready once the topic exists", CATCH_UP, || async {
        http_get(no_topic.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    no_topic.terminate().await;
}

/// `idem top` on a running group of two instances, from Redis alone: its
/// totals equal the instances' own `idem_events_total`, it has rates and a
/// duplicate ratio, and each member's registration names its release and
/// commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_a_running_groups_rates_and_totals_from_redis_alone() {
    let topic = unique("top");
    create_topic(&topic, 4).await;
    let records = idem::tools::sample::generate(&idem::tools::sample::SampleSpec {
        events: 1_500,
        entities: 60,
        duplicate_ratio: 0.2,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.0,
        data_bytes: 8,
        seed: 7,
        prefix: topic.clone(),
        zipf: None,
    });
    produce(&topic, &records).await;
    let opts = IdemOpts::new(&topic, &topic, &topic);
    let members = [Idem::spawn(&opts), Idem::spawn(&opts)];
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    let own = |texts: &[String]| -> BTreeMap<String, u64> {
        Outcome::ALL
            .iter()
            .map(|o| {
                let n = texts
                    .iter()
                    .map(|t| {
                        sum_metric(
                            t,
                            "idem_events_total",
                            &[("topic", &topic), ("outcome", o.as_str())],
                        )
                    })
                    .sum();
                (o.as_str().to_string(), n)
            })
            .collect()
    };
    let top = || {
        let out = idem_tool(
            &["top", "--json"],
            &topic,
            &[("IDEM__KAFKA__GROUP_ID", topic.as_str())],
        );
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // Registrations are written every 5 s: wait for the one after the last batch.
    let mut last = serde_json::Value::Null;
    let produced = records.len();
    wait_until(
        "idem top's totals equal the instances' counters",
        CATCH_UP,
        || {
            let report = top();
            last = report.clone();
            let (members, topic, own) = (&members, topic.clone(), &own);
            async move {
                let mut texts = Vec::new();
                for m in members {
                    texts.push(m.metrics().await.unwrap_or_default());
                }
                let counted = own(&texts);
                let totals: BTreeMap<String, u64> = report["topics"]
                    .as_array()
                    .and_then(|ts| ts.iter().find(|t| t["topic"] == topic.as_str()))
                    .and_then(|t| t["totals"].as_object().cloned())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.as_u64().unwrap_or(0)))
                    .collect();
                counted.values().sum::<u64>() as usize >= produced && totals == counted
            }
        },
    )
    .await;
    let members_seen = last["members"].as_array().unwrap();
    assert_eq!(members_seen.len(), 2, "{last}");
    let (_, version, _) = idem_tool_output(&["--version"], "v");
    for m in members_seen {
        let registered = format!(
            "idem {} (commit {})",
            m["version"].as_str().unwrap(),
            m["commit"].as_str().unwrap()
        );
        assert_eq!(registered, version.trim(), "{m}");
    }
    let row = &last["topics"][0];
    assert!(row["events_per_second"].as_f64().unwrap() > 0.0, "{row}");
    let ratio = row["duplicate_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "{row}");
    let (code, table, _) = {
        let out = idem_tool(
            &["top", "--once"],
            &topic,
            &[("IDEM__KAFKA__GROUP_ID", topic.as_str())],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            (),
        )
    };
    assert_eq!(code, Some(0));
    assert!(
        table.contains("2 live instance(s)") && table.contains("DUP%") && table.contains(&topic),
        "{table}"
    );
    for m in members {
        m.terminate().await;
    }
}

/// `idem check` compares the releases the group's members registered with
/// the settings the config turns on: a member that registered `0.2.0` (a
/// build before the first release) is older than every release, and fails
/// the check once the config turns on a setting of 0.3.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_member_too_old_for_a_setting_the_config_turns_on() {
    use idem::relay::members;
    let topic = unique("old-member");
    create_topic(&topic, 1).await;
    let mut conn = redis_conn(&redis_url()).await;
    let key = idem::store::KeyLayout::new(&topic).members_key(&topic);
    let now = members::redis_now_ms(&mut conn).await.unwrap();
    // As a build before 0.3.0 writes it: no commit, no counts.
    let old = format!(
        r#"{{"version":"0.2.0","expires_ms":{},"changelog":[],"owns":{{"{topic}":[0]}}}}"#,
        now + 120_000
    );
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("old-host")
        .arg(old)
        .query_async(&mut conn)
        .await
        .unwrap();
    let check = |extra: &[(&str, &str)]| {
        let mut env = vec![
            ("IDEM__KAFKA__TOPICS", topic.as_str()),
            ("IDEM__KAFKA__GROUP_ID", topic.as_str()),
        ];
        env.extend_from_slice(extra);
        let out = idem_tool(&["check", "--timeout", "5s"], &topic, &env);
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("group versions"))
            .unwrap_or_default()
            .to_string();
        (out.status.code(), line)
    };
    let (code, line) = check(&[]);
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with("ok") && line.contains("1 on 0.2.0 (an unknown build older than 0.3.0)"),
        "{line}"
    );
    let (code, line) = check(&[("IDEM__DEDUPE__DENSE_SEQ_TOPICS", topic.as_str())]);
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with("FAIL")
            && line.contains("member old-host runs an unknown build older than 0.3.0")
            && line.contains("dedupe.dense_seq_topics"),
        "{line}"
    );
}
