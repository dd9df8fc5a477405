//! A smoke run of `idem-testbench bench` with a tiny backlog: every phase runs and the
//! report holds sane figures. The real benchmark is `make bench` (not a test).

// The binary runs the `idem` built beside it (`cargo test --workspace` builds both).
use idem_testbench::services::{brokers, redis_env, redis_url, unique};

#[test]
fn bench_runs_every_phase_and_writes_its_report() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("bench"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_idem-testbench"))
        .args([
            "bench",
            "--events",
            "2000",
            "--entities",
            "100",
            "--naive-records",
            "200",
        ])
        .args(["--latency-seconds", "1", "--partitions", "2", "--out"])
        .arg(&out)
        .env("IDEM__KAFKA__BROKERS", brokers())
        .envs(redis_env(&redis_url()))
        .env("RUST_LOG", "warn")
        .status()
        .expect("run idem-testbench bench");
    assert!(status.success(), "idem-testbench bench failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let records = report["records"].as_u64().unwrap();
    assert!(records >= 2000);
    let outcomes: u64 = report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o[1].as_u64().unwrap())
        .sum();
    assert_eq!(
        outcomes, records,
        "every backlog record has exactly one outcome"
    );
    assert!(report["idem_records_per_second"].as_f64().unwrap() > 0.0);
    if redis_url().contains(',') {
        // With a cluster, `idem-testbench bench` measures throughput only (docs/capacity.md).
        return;
    }
    for key in [
        "naive_records_per_second",
        "ceiling_records_per_second",
        "redis_bytes_per_id_dedupe",
    ] {
        assert!(
            report[key].as_f64().unwrap() > 0.0,
            "{key} = {}",
            report[key]
        );
    }
    let guard_alone = &report["guard_alone"];
    assert_eq!(
        guard_alone["records"].as_u64(),
        report["ceiling_records"].as_u64()
    );
    assert!(guard_alone["records_per_second"].as_f64().unwrap() > 0.0);
    // Redis's share per record, over the backlog and with the guard alone:
    // the script's time splits into its commands and the rest.
    for redis in [&report["redis"], &guard_alone["redis"]] {
        for key in ["cpu_us", "script_us", "commands_us", "commands"] {
            assert!(redis[key].as_f64().unwrap() > 0.0, "{key}: {redis}");
        }
        let (script, commands, outside) = (
            redis["script_us"].as_f64().unwrap(),
            redis["commands_us"].as_f64().unwrap(),
            redis["outside_us"].as_f64().unwrap(),
        );
        assert!((commands + outside - script).abs() < 1e-6, "{redis}");
        assert!(commands < script, "{redis}");
    }
    let effects = report["effects"].as_array().unwrap();
    assert_eq!(effects.len(), 7, "one row per effects variant: {effects:?}");
    for row in effects {
        assert!(row["records_per_second"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["redis_us_per_record"].as_f64().unwrap() > 0.0, "{row}");
    }
    let changelog = report["changelog"].as_array().unwrap();
    assert_eq!(
        changelog.len(),
        4,
        "off, on, held, off again: {changelog:?}"
    );
    assert!(
        changelog[1]["to_changelog_records_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        changelog[2]["outbox_bytes_per_entry"].as_f64().unwrap() > 0.0,
        "the held outbox keeps its entries: {}",
        changelog[2]
    );
    // CPU is counted in 10 ms ticks: a tiny backlog may take less than one.
    assert!(report["idem_cpu_seconds_per_million"].as_f64().unwrap() >= 0.0);
    assert!(report["latency_records"].as_u64().unwrap() > 0);
    let levels = report["latency_levels"].as_array().unwrap();
    let shares: Vec<_> = levels
        .iter()
        .map(|l| l["share_of_maximum"].as_f64())
        .collect();
    assert_eq!(shares, [Some(0.25), Some(0.5), Some(0.75)], "{levels:?}");
    for level in levels {
        assert!(level["records"].as_u64().unwrap() > 0, "{level}");
        assert!(
            level["generator_cores_busy"].as_f64().unwrap() >= 0.0,
            "{level}"
        );
    }
    assert!(report["idem_peak_rss_bytes"].as_u64().unwrap() > 1_000_000);
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("idem ÷ (a)"));
}
