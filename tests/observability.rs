//! Metrics an operator can trust: exact counts for a scripted scenario, alert
//! rules that pass promtool and fire in a real Prometheus, and a dashboard
//! that only queries metrics idem exposes.

mod common;

use std::collections::BTreeSet;
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
    assert_eq!(sum_metric(&text, "idem_build_info", &[]), 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_metrics_idem_exposes() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/grafana/dashboards/idem.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push_str(target["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    exprs.push_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yml")).unwrap(),
    );
    let wanted = metric_names(&exprs);
    assert!(wanted.len() >= 10, "{wanted:?}");

    // Some traffic of every kind, so every histogram and labelled series exists.
    let topic = unique("exposition");
    create_topic(&topic, 1).await;
    let (values, _) = scenario(&topic);
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|v| (Some(&b"k"[..]), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM__KAFKA__LIBRDKAFKA__STATISTICS.INTERVAL.MS", "500"),
    );
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    wait_until(
        "every queried metric is exposed",
        Duration::from_secs(30),
        || async {
            let exposed = metric_names(&idem.metrics().await.unwrap_or_default());
            wanted.is_subset(&exposed)
        },
    )
    .await;
    idem.terminate().await;
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
    let check = Command::new("promtool")
        .args(["check", "rules", &rules])
        .output()
        .expect("promtool (apt-get install prometheus, or make services)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

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

    // A duplicate flood: every event delivered five times, over several scrapes.
    for round in 0..6 {
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
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    wait_until(
        "Prometheus fires IdemDuplicateRatioSpike",
        Duration::from_secs(90),
        || async {
            http_get(prometheus.port, "/api/v1/alerts")
                .await
                .is_some_and(|body| {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    v["data"]["alerts"].as_array().is_some_and(|alerts| {
                        alerts.iter().any(|a| {
                            a["labels"]["alertname"] == "IdemDuplicateRatioSpike"
                                && a["labels"]["topic"] == topic.as_str()
                                && a["state"] == "firing"
                        })
                    })
                })
        },
    )
    .await;
    assert!(idem.outcome(&topic, Outcome::Duplicate).await >= 2000);
    idem.terminate().await;
}
