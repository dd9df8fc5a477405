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

/// An `[[effects]]` rule on a topic idem does not consume (a typo) would
/// merge deposits into the state instead of counting them: `idem check`
/// fails naming the rule and the nearest consumed topic, and `idem run`
/// refuses to start with the same words.
#[test]
fn an_effects_rule_on_a_topic_not_consumed_fails_check_and_refuses_run() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("typo"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("effects.toml");
    std::fs::write(
        &file,
        "[[effects]]\ntopic = \"nc-ordres\"\ntypes = [\"deposit\"]\ncounters = [{ field = \"balance\", from = \"/amount\" }]\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let env = [
        ("IDEM_CONFIG", config),
        ("IDEM__KAFKA__TOPICS", "nc-orders"),
    ];
    let check = idem_tool(&["check", "--timeout", "2s"], "cli-typo", &env);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL config") && !stdout.contains("ok   config valid"),
        "{stdout}"
    );
    let want = "effects[0].topic = `nc-ordres` names a topic idem does not consume (kafka.topics: nc-orders): did you mean `nc-orders`?";
    assert!(stdout.contains(want), "{stdout}");
    let run = idem_tool(&["run"], "cli-typo", &env);
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert_one_plain_error(&run, want);
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
    assert_eq!(out.status.code(), Some(2), "{out:?}");
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
            "--timeout",
            "3s",
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
        ("kafka.request_timeout", "3s", "flag"),
    ];
    for (key, value, layer) in expect {
        assert_eq!(row(key)["value"], value, "{key}");
        assert_eq!(row(key)["layer"], layer, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_ready_services_and_names_what_is_missing() {
    let topic = unique("check");
    create_topic(&topic, 2).await;
    let out = idem_tool(&["check"], &topic, &[("IDEM__KAFKA__TOPICS", &topic)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
    for expected in [
        "ok   config".to_string(),
        "ok   kafka".to_string(),
        "ok   kafka group protocol".to_string(),
        format!("ok   topic {topic} "),
        format!("ok   topic {topic} log"),
        format!("ok   dead-letter topic {topic}.dlq"),
        "ok   redis ".to_string(),
        "ok   redis eviction".to_string(),
        "ok   redis durability".to_string(),
        "ok   redis progress".to_string(),
    ] {
        assert!(stdout.contains(&expected), "no `{expected}` in:\n{stdout}");
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok   redis eviction")
                && l.contains("maxmemory-policy noeviction")),
        "the eviction line names the policy: {stdout}"
    );
    assert!(
        stdout.contains("no epoch marker"),
        "a fresh prefix: {stdout}"
    );
    assert!(
        stdout.contains("records read again are recognised by their offset"),
        "{stdout}"
    );

    assert!(
        stdout.lines().any(|l| l.starts_with("ok   kafka group protocol")
            && l.ends_with("classic; the brokers also serve consumer (KIP-848: kafka.group_protocol = \"consumer\", docs/configuration.md)")),
        "{stdout}"
    );
    // The consumer protocol: the brokers of `make services` (Kafka 4) serve it.
    let out = idem_tool(
        &["check"],
        &topic,
        &[
            ("IDEM__KAFKA__TOPICS", &topic),
            ("IDEM__KAFKA__GROUP_PROTOCOL", "consumer"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok   kafka group protocol")
                && l.contains("every broker lists it in group.coordinator.rebalance.protocols")),
        "{stdout}"
    );

    // A topic whose offsets an unclean election could reuse: a warning.
    let unclean = unique("check-unclean");
    let mut spec = idem::tools::topics::TopicSpec::new(&unclean, 1);
    spec.dead_letter = Some(format!("{unclean}.dlq"));
    spec.configs
        .insert("unclean.leader.election.enable".into(), "true".into());
    idem::tools::topics::apply(&kafka(), &spec.with_companions(), true)
        .await
        .unwrap();
    let out = idem_tool(&["check"], &unclean, &[("IDEM__KAFKA__TOPICS", &unclean)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("warn topic {unclean} log"))
                && l.contains("unclean.leader.election.enable=true")),
        "{stdout}"
    );

    // A topic that does not exist, with no dead-letter topic either: exit 1,
    // one FAIL line for each, and the JSON form says the same.
    let missing = unique("check-missing");
    let out = idem_tool(
        &["check", "--json"],
        &topic,
        &[("IDEM__KAFKA__TOPICS", &missing)],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c["status"] == "fail")
        .filter_map(|c| c["what"].as_str())
        .collect();
    assert_eq!(
        failed,
        vec![
            format!("topic {missing}"),
            format!("dead-letter topic {missing}.dlq")
        ]
    );
}

#[test]
fn check_names_unreachable_brokers_within_its_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let started = std::time::Instant::now();
    let out = idem_tool(
        &["check", "--timeout", "2s"],
        "cli-unreachable",
        &[("IDEM__KAFKA__BROKERS", &address)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL kafka") && stdout.contains(&address),
        "{stdout}"
    );
    // Bounded by --timeout, not by librdkafka's own retries (generous slack
    // for a loaded machine; the point is not waiting 15-30 s).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
}

/// A listener that answers but is not a broker's (the KRaft controller of
/// `make services`): librdkafka refuses every request at once, and `idem
/// check` used to ask again at once until its timeout, burning a core
/// (3.6 s of CPU in 5 s). It now says what the address is, early, at a
/// small cost (CPU measured by bash's `time` for the child alone).
#[test]
fn check_against_a_controller_port_says_what_it_is_without_spinning() {
    let port = std::env::var("IDEM_KAFKA_CONTROLLER_PORT").unwrap_or_else(|_| "9093".into());
    let address = format!("127.0.0.1:{port}");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#"TIMEFORMAT='%U %S'; time "$0" check --timeout 5s"#)
        .arg(env!("CARGO_BIN_EXE_idem"))
        .env("IDEM__KAFKA__BROKERS", &address)
        .envs(redis_env(&redis_url()))
        .output()
        .expect("bash runs idem check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL kafka")
            && stdout.contains("is not a Kafka broker listener (a KRaft controller port?)"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cpu: f64 = stderr
        .lines()
        .last()
        .expect("bash's time line")
        .split_whitespace()
        .map(|s| s.parse::<f64>().expect("seconds"))
        .sum();
    assert!(
        cpu < 1.5,
        "user + sys {cpu} s of CPU for a 5 s timeout: {stderr}"
    );
}

/// With the brokers unreachable, idem's log stays readable: librdkafka's
/// repeated connection failures are held back (one line per kind per 30 s)
/// and no statistics are dumped at INFO.
#[test]
fn an_unreachable_broker_does_not_flood_the_log() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("flood.log"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("run")
        .env("IDEM__KAFKA__BROKERS", &address)
        .env("IDEM__KAFKA__TOPICS", "cli-flood")
        .env("IDEM__REDIS__URL", redis_url())
        .env("IDEM__METRICS__LISTEN", "127.0.0.1:0")
        .env("IDEM__KAFKA__LIBRDKAFKA__STATISTICS.INTERVAL.MS", "500")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The measurement is a rate: watch the log for a fixed 20 s (the
    // start-up check's 10 s, then the consumer's own retries, which used to
    // log about 45 lines a second).
    std::thread::sleep(std::time::Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let loud = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    assert!(loud <= 20, "{loud} WARN/ERROR lines in 20 s:\n{text}");
    assert!(
        text.contains("consuming"),
        "the consumer never started: {text}"
    );
    assert!(!text.contains("Client stats"), "{text}");
    assert!(text.contains("Kafka is not reachable yet"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_group_names_members_as_objects_and_refuses_an_unknown_group() {
    let topic = unique("inspect-group");
    create_topic(&topic, 2).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_until(
        "idem holds both partitions",
        std::time::Duration::from_secs(60),
        || async { idem.counter("idem_assigned_partitions", &[]).await == Some(2) },
    )
    .await;
    let out = idem_tool(
        &["inspect", "group", &topic, "--topic", &topic, "--json"],
        &topic,
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let member = &status["members"][0];
    assert!(
        member["client_id"].as_str().unwrap().starts_with("idem"),
        "client.id names idem: {member}"
    );
    assert_eq!(member["assignment"][0]["topic"], topic.as_str(), "{member}");
    let mut partitions: Vec<i64> = member["assignment"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect();
    partitions.sort();
    assert_eq!(partitions, vec![0, 1]);
    idem.terminate().await;

    let nobody = unique("no-such-group");
    let out = idem_tool(
        &["inspect", "group", &nobody, "--topic", &topic],
        &topic,
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no such group"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_checks_its_report_path_first_and_writes_to_stdout_on_dash() {
    let topic = unique("reconcile-report");
    create_topic(&topic, 1).await;
    let bad = "/nonexistent-dir/report.json";
    let out = idem_tool(
        &["reconcile", "--topic", &topic, "--report", bad],
        &topic,
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(bad) && stderr.contains("--report -"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("reconcile: "),
        "the topic was read first: {stderr}"
    );

    let out = idem_tool(
        &["reconcile", "--topic", &topic, "--report", "-"],
        &topic,
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["topic"], topic.as_str());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 divergences"));
}

#[test]
fn tools_name_unreachable_brokers_within_the_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    for args in [
        &["inspect", "group", "some-group", "--timeout", "2s"][..],
        &["topics", "check", "--timeout", "2s"][..],
    ] {
        let started = std::time::Instant::now();
        let out = idem_tool(args, "cli-timeout", &[("IDEM__KAFKA__BROKERS", &address)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&address)
                && stderr.contains("within 2s")
                && stderr.contains("--timeout"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("librdkafka"),
            "{args:?}: raw client text: {stderr}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(12),
            "{args:?}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_redrive_plans_come_as_json() {
    let topic = unique("json-plans");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("json-topics"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("t.toml"),
        format!("[[topic]]\nname = \"{topic}\"\npartitions = 2\ndead_letter = \"{topic}.dlq\"\n"),
    )
    .unwrap();
    let dir_arg = dir.to_str().unwrap();
    let out = idem_tool(
        &["topics", "apply", "--dry-run", "--json", "--dir", dir_arg],
        &topic,
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["state"] == "created"), "{rows:?}");
    assert_eq!(rows[0]["topic"], topic.as_str());

    // The dry run created nothing: check reports both missing, exit 1.
    let out = idem_tool(
        &["topics", "check", "--json", "--dir", dir_arg],
        &topic,
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.iter().all(|r| r["state"] == "missing"), "{rows:?}");

    let out = idem_tool(&["topics", "apply", "--dir", dir_arg], &topic, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = idem_tool(
        &[
            "dlq",
            "redrive",
            "--topic",
            &format!("{topic}.dlq"),
            "--json",
        ],
        &topic,
        &[("IDEM__KAFKA__TOPICS", &topic)],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["read"], 0, "{report}");
}

/// The README's `idem inspect group orders-view` with no topics configured:
/// the group's topics come from its committed offsets (the default topic
/// `events` does not exist here), and a dead-letter tool with no topic to
/// go on names the flag and the key that give one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_configured_topics_inspect_group_finds_them_and_dlq_names_the_flag() {
    let topic = unique("group-topics");
    create_topic(&topic, 2).await;
    let records = idem::tools::sample::generate(&idem::tools::sample::SampleSpec {
        events: 40,
        entities: 4,
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.0,
        delete_ratio: 0.0,
        data_bytes: 8,
        seed: 3,
        prefix: topic.clone(),
        zipf: None,
    });
    produce(&topic, &records).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 2, std::time::Duration::from_secs(60)).await;
    idem.terminate().await;

    let out = idem_tool(&["inspect", "group", &topic, "--json"], &topic, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = status["partitions"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        2,
        "both partitions of the group's topic: {status}"
    );
    assert!(
        rows.iter().all(|r| r["topic"] == topic.as_str()),
        "{status}"
    );
    assert_eq!(status["total_lag"], 0, "{status}");

    let out = idem_tool(&["dlq", "inspect"], &topic, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("events.dlq does not exist")
            && stderr.contains("--topic")
            && stderr.contains("kafka.topics"),
        "names the topic it chose, the flag and the key: {stderr}"
    );
}

/// An empty --dir is almost always the wrong folder: said, not "nothing changed".
#[test]
fn topics_apply_on_a_folder_without_toml_files_says_so() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("no-topics"));
    std::fs::create_dir_all(&dir).unwrap();
    let out = idem_tool(
        &["topics", "apply", "--dir", dir.to_str().unwrap()],
        "no-topics",
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no *.toml topic files in"), "{stderr}");
}

/// `idem run` as a child, killed if it has not exited within `within`
/// (a start that should refuse must not hang the suite).
fn run_expecting_exit(env: &[(&str, &str)], within: std::time::Duration) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("run")
        .env("IDEM__KAFKA__BROKERS", brokers())
        .env(
            "IDEM__METRICS__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn idem run");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "idem run did not exit within {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// `redis.mode = "standalone"` pointed at a Redis Cluster node: `idem
/// check` fails saying so (it said `ok redis standalone`), and `idem run`
/// refuses to start with the same words (it retried `Moved` for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_mode_pointed_at_a_cluster_node_fails_check_and_refuses_run() {
    let topic = unique("cluster-node");
    create_topic(&topic, 1).await;
    let node = redis_cluster_url().split(',').next().unwrap().to_string();
    let env = [
        ("IDEM__KAFKA__TOPICS", topic.as_str()),
        ("IDEM__KAFKA__GROUP_ID", topic.as_str()),
        ("IDEM__REDIS__URL", node.as_str()),
        ("IDEM__REDIS__MODE", "standalone"),
        ("IDEM__REDIS__KEY_PREFIX", topic.as_str()),
    ];
    let says = "this is a Redis Cluster node: set redis.mode = \"cluster\"";
    let check = idem_tool(&["check", "--timeout", "5s"], &topic, &env);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(says), "{stdout}");
    assert!(!stdout.contains("ok   redis "), "{stdout}");
    let run = run_expecting_exit(&env, std::time::Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
}

/// The changelog on and its topic missing: `idem check` fails naming the
/// topic and the fix, `/readyz` names it while it lasts, and is ready once
/// the topic exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_changelog_topic_fails_check_and_is_named_by_readyz_while_it_lasts() {
    let topic = unique("chg-missing");
    create_topic(&topic, 1).await;
    let changelog = format!("{topic}.changes");
    let env = [
        ("IDEM__KAFKA__TOPICS", topic.as_str()),
        ("IDEM__CHANGELOG__TOPICS", topic.as_str()),
    ];
    let check = idem_tool(&["check", "--timeout", "5s"], &topic, &env);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        failed.len() == 1
            && failed[0].contains(&format!("changelog topic {changelog} does not exist"))
            && failed[0].contains("idem topics apply"),
        "{stdout}"
    );
    let idem =
        Idem::spawn(&IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic));
    wait_until(
        "/readyz names the missing changelog topic",
        std::time::Duration::from_secs(60),
        || async {
            http_get(idem.metrics_port, "/readyz")
                .await
                .is_some_and(|r| r.contains(&format!("changelog topic {changelog} does not exist")))
        },
    )
    .await;
    create_topic_without_dlq(&changelog, 1).await;
    wait_until(
        "/readyz is ready once the topic exists",
        std::time::Duration::from_secs(60),
        || async { http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n") },
    )
    .await;
    idem.terminate().await;
}

/// `--help` says what a replay's records come back as: `replayed`.
#[test]
fn replay_help_says_records_read_again_come_back_replayed() {
    let (code, help, _) = idem_tool_output(&["replay", "--help"], "help");
    assert_eq!(code, 0);
    assert!(
        help.contains("come back\n`replayed`") || help.contains("`replayed`"),
        "{help}"
    );
    assert!(
        !help.contains("come back as\nduplicates") && !help.contains("come back as duplicates"),
        "{help}"
    );
}

/// `--version` names the release and the commit the build came from.
#[test]
fn version_names_the_release_and_the_commit() {
    let (code, out, _) = idem_tool_output(&["--version"], "version");
    assert_eq!(code, 0);
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".to_string(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    assert_eq!(
        out.trim(),
        format!("idem {} (commit {head})", env!("CARGO_PKG_VERSION"))
    );
    assert_ne!(
        env!("CARGO_PKG_VERSION"),
        "0.2.0",
        "a release, not the pre-release number"
    );
}

/// `idem config show` prints values as TOML (lists and numbers bare), and
/// `idem config defaults` prints the commented defaults the image lacks as
/// a file.
#[test]
fn config_show_prints_toml_and_defaults_print_the_commented_file() {
    let out = idem_tool(
        &["config", "show"],
        "config-show",
        &[("IDEM__KAFKA__TOPICS", "orders,payments")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    assert!(
        line("kafka.topics").contains(r#"= ["orders", "payments"]  # env"#),
        "{text}"
    );
    assert!(line("dlq.max_ratio").contains("= 0.5  # default"), "{text}");
    assert!(!text.contains("config/default.toml"), "{text}");
    let (code, defaults, _) = idem_tool_output(&["config", "defaults"], "config-defaults");
    assert_eq!(code, 0);
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
        .unwrap();
    assert_eq!(defaults.trim_end(), file.trim_end());
}

/// `idem sample` refuses a fraction out of range, and a topic that does
/// not exist at once, naming it (it waited 30 s for a flush timeout).
#[test]
fn sample_refuses_a_fraction_out_of_range_and_a_missing_topic_at_once() {
    for bad in ["--duplicates=1.5", "--duplicates=-0.5", "--out-of-order=2"] {
        let out = idem_tool(&["sample", "--topic", "x", bad], "sample", &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("is not a fraction"), "{bad}: {stderr}");
    }
    let missing = unique("no-such-topic");
    let started = std::time::Instant::now();
    let out = idem_tool(
        &["sample", "--topic", &missing, "--events", "10"],
        "sample",
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("topic {missing} does not exist")),
        "{stderr}"
    );
    assert!(!stderr.contains("OperationTimedOut"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}

/// Adding partitions says what it does to the entities' order.
#[test]
fn topics_apply_says_what_adding_partitions_does() {
    let topic = unique("grow");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("grow-topics"));
    std::fs::create_dir_all(&dir).unwrap();
    let declare = |partitions: u32| {
        std::fs::write(
            dir.join("t.toml"),
            format!("[[topic]]\nname = \"{topic}\"\npartitions = {partitions}\n"),
        )
        .unwrap()
    };
    let dir_arg = dir.to_str().unwrap();
    declare(1);
    let out = idem_tool(&["topics", "apply", "--dir", dir_arg], &topic, &[]);
    assert!(out.status.success(), "{out:?}");
    declare(3);
    let out = idem_tool(
        &["topics", "apply", "--dry-run", "--dir", dir_arg],
        &topic,
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("partitions 1 -> 3"), "{text}");
    assert!(
        text.contains("keys then map to other partitions") && text.contains("per_field"),
        "{text}"
    );
}
