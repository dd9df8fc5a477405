//! The conformance suite's short profile: every scenario of it must pass
//! (no lost, no doubled effect, no seq decrease, no commit ahead of an
//! effect, recovery within the bound). `make conformance` runs the full one.

// The binary runs the `idem` built beside it (`cargo test --workspace` builds both).
use idem_testbench::services::{brokers, redis_env, redis_url, unique};

#[test]
fn short_conformance_profile_passes() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("conformance"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_idem-testbench"))
        .args(["conformance", "--profile", "short", "--out"])
        .arg(&out)
        .env("IDEM__KAFKA__BROKERS", brokers())
        .envs(redis_env(&redis_url()))
        .env("RUST_LOG", "warn")
        .status()
        .expect("run idem-testbench conformance");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("conformance.json")).unwrap())
            .unwrap();
    let results = report["results"].as_array().unwrap();
    assert!(results.len() >= 8, "{report}");
    for r in results {
        assert_eq!(r["verdict"], "pass", "{r}");
        assert_eq!(r["lost"], 0);
        assert_eq!(r["doubled"], 0);
    }
    assert!(report["sigkills"].as_u64().unwrap() >= 3);
    assert!(status.success());
}
