//! The command line as an operator meets it: the real binary, its exit
//! codes and what it prints on stderr.

mod common;

use common::*;

/// A start-up failure is printed once, as plain text when stderr is not a
/// terminal (no ANSI colours), and the exit code says which kind it is.
fn assert_one_plain_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escape on a pipe: {stderr}"
    );
    assert_eq!(
        stderr.matches(needle).count(),
        1,
        "the error should be printed exactly once: {stderr}"
    );
}

#[test]
fn a_broker_address_with_a_scheme_is_refused_naming_the_key() {
    let out = idem_tool(
        &["run"],
        "cli-brokers",
        &[("IDEM__KAFKA__BROKERS", "kafka://127.0.0.1:9092")],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_one_plain_error(&out, "config key `kafka.brokers`");
    assert!(String::from_utf8_lossy(&out.stderr).contains("host:port"));
}

#[test]
fn a_failure_after_start_is_printed_once_without_colour() {
    // Take a port, then ask idem to serve its metrics on it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = idem_tool(
        &["run"],
        "cli-port",
        &[
            ("IDEM__KAFKA__TOPICS", "cli-port"),
            ("IDEM__METRICS__LISTEN", &listen),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_one_plain_error(&out, "cannot listen on metrics.listen");
}

#[test]
fn config_show_names_the_layer_of_every_key_and_redacts_secrets() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("config-show"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("idem.toml");
    std::fs::write(
        &file,
        "[kafka]\ngroup_id = \"from-file\"\nsasl_password = \"file-secret\"\n",
    )
    .unwrap();
    let out = idem_tool(
        &[
            "--config",
            file.to_str().unwrap(),
            "config",
            "show",
            "--json",
        ],
        "cli-show",
        &[
            ("IDEM__DEDUPE__WINDOWS", "orders-v2=72h"),
            (
                "IDEM__REDIS__URL",
                "redis://user:redis-secret@127.0.0.1:6379",
            ),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("file-secret") && !stdout.contains("redis-secret"),
        "{stdout}"
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let row = |key: &str| {
        rows.iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("{key} missing: {stdout}"))
            .clone()
    };
    let expect = [
        ("kafka.group_id", "from-file", "file"),
        ("kafka.sasl_password", "***", "file"),
        ("dedupe.windows", "orders-v2=72h", "env"),
        ("redis.url", "redis://user:***@127.0.0.1:6379", "env"),
        ("dedupe.window", "24h", "default"),
    ];
    for (key, value, layer) in expect {
        assert_eq!(row(key)["value"], value, "{key}");
        assert_eq!(row(key)["layer"], layer, "{key}");
    }
}
