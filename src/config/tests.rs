//! The config's tables: defaults, layering, and every key's rejection.

use std::collections::BTreeMap;

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_are_valid() {
    let c = Config::defaults();
    assert_eq!(c.kafka.topics, vec!["events"]);
    assert_eq!(c.dedupe.window, Duration::from_secs(86_400));
    assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9464");
}

#[test]
fn environment_overrides_defaults() {
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__GROUP_ID", "orders-view"),
            ("IDEM__KAFKA__TOPICS", "orders,payments"),
            ("IDEM__DEDUPE__WINDOW", "72h"),
            ("IDEM__PIPELINE__EVENTS_PER_SCRIPT", "16"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(c.kafka.group_id, "orders-view");
    assert_eq!(c.kafka.topics, vec!["orders", "payments"]);
    assert_eq!(c.dedupe.window, Duration::from_secs(72 * 3600));
    assert_eq!(c.pipeline.events_per_script.get(), 16);
}

#[test]
fn file_layer_sits_between_defaults_and_env() {
    let dir = ScratchDir::new("config");
    let path = dir.0.join("c.toml");
    std::fs::write(
        &path,
        "[kafka]\ngroup_id = \"from-file\"\n[dedupe.topic_windows]\npayments = \"72h\"\n",
    )
    .unwrap();
    let c = Config::load(Some(&path), &HashMap::new()).unwrap();
    assert_eq!(c.kafka.group_id, "from-file");
    assert_eq!(
        c.dedupe.window_for("payments"),
        Duration::from_secs(72 * 3600)
    );
    assert_eq!(c.dedupe.window_for("other"), Duration::from_secs(24 * 3600));
    let c = Config::load(Some(&path), &env(&[("IDEM__KAFKA__GROUP_ID", "env")])).unwrap();
    assert_eq!(c.kafka.group_id, "env");
}

/// Each bad value names exactly its key.
#[test]
fn invalid_values_name_their_key() {
    let table: &[(&str, &str, &str)] = &[
        ("IDEM__KAFKA__GROUP_ID", " ", "kafka.group_id"),
        ("IDEM__KAFKA__BROKERS", "", "kafka.brokers"),
        ("IDEM__KAFKA__TOPICS", "bad topic", "kafka.topics"),
        (
            "IDEM__KAFKA__AUTO_OFFSET_RESET",
            "smallest",
            "kafka.auto_offset_reset",
        ),
        ("IDEM__KAFKA__COMMIT_INTERVAL", "1", "kafka.commit_interval"),
        (
            "IDEM__KAFKA__SESSION_TIMEOUT",
            "0s",
            "kafka.session_timeout",
        ),
        (
            "IDEM__KAFKA__LIBRDKAFKA__ENABLE.AUTO.OFFSET.STORE",
            "true",
            "kafka.librdkafka.enable.auto.offset.store",
        ),
        ("IDEM__REDIS__URL", "http://x", "redis.url"),
        (
            "IDEM__REDIS__TLS_CA_FILE",
            "/nonexistent/ca.pem",
            "redis.tls_ca_file",
        ),
        (
            "IDEM__REDIS__TLS_KEY_FILE",
            "Cargo.toml",
            "redis.tls_cert_file",
        ),
        (
            "IDEM__KAFKA__SSL_CA_LOCATION",
            "/nonexistent/ca.pem",
            "kafka.ssl_ca_location",
        ),
        (
            "IDEM__KAFKA__SSL_CERTIFICATE_LOCATION",
            "Cargo.toml",
            "kafka.ssl_key_location",
        ),
        (
            "IDEM__KAFKA__SECURITY_PROTOCOL",
            "sasl_ssl",
            "kafka.sasl_username",
        ),
        (
            "IDEM__KAFKA__LIBRDKAFKA__SSL.KEY.PASSWORD",
            "pw",
            "kafka.librdkafka.ssl.key.password",
        ),
        ("IDEM__REDIS__KEY_PREFIX", "a{b", "redis.key_prefix"),
        (
            "IDEM__REDIS__RESPONSE_TIMEOUT",
            "soon",
            "redis.response_timeout",
        ),
        (
            "IDEM__REDIS__PROGRESS_CHECK_INTERVAL",
            "0s",
            "redis.progress_check_interval",
        ),
        ("IDEM__DEDUPE__WINDOW", "-5s", "dedupe.window"),
        ("IDEM__DEDUPE__WINDOW", "0ms", "dedupe.window"),
        (
            "IDEM__DEDUPE__TOPIC_WINDOWS__PAYMENTS",
            "3 weeks",
            "dedupe.topic_windows.payments",
        ),
        ("IDEM__EVENT__ID", "id", "event.id"),
        ("IDEM__EVENT__MAX_BYTES", "0", "event.max_bytes"),
        (
            "IDEM__PIPELINE__BATCH_MAX_EVENTS",
            "-1",
            "pipeline.batch_max_events",
        ),
        (
            "IDEM__PIPELINE__EVENTS_PER_SCRIPT",
            "0",
            "pipeline.events_per_script",
        ),
        (
            "IDEM__PIPELINE__BATCH_LINGER",
            "5 parsecs",
            "pipeline.batch_linger",
        ),
        ("IDEM__METRICS__LISTEN", "localhost", "metrics.listen"),
        ("IDEM__LOG__FORMAT", "xml", "log.format"),
        (
            "IDEM__SHUTDOWN__DRAIN_TIMEOUT",
            "never",
            "shutdown.drain_timeout",
        ),
        ("IDEM__KAFKA__REVOKE_TIMEOUT", "0s", "kafka.revoke_timeout"),
    ];
    for (var, value, key) in table {
        let err = Config::load(None, &env(&[(var, value)])).unwrap_err();
        assert_eq!(err.key(), Some(*key), "{var}={value:?} gave {err}");
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn unknown_keys_are_rejected() {
    let err = Config::load(None, &env(&[("IDEM__KAFKA__GROUPID", "x")])).unwrap_err();
    assert!(err.to_string().contains("groupid"), "{err}");
    let err = Config::load(None, &env(&[("IDEM__NOPE__X", "1")])).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn durations_parse_by_table() {
    let table: &[(&str, Option<u64>)] = &[
        ("250ms", Some(250)),
        ("5s", Some(5_000)),
        ("2m", Some(120_000)),
        ("24h", Some(86_400_000)),
        ("7d", Some(604_800_000)),
        ("0s", Some(0)),
        ("5", None),
        ("s", None),
        ("-1s", None),
        ("1.5s", None),
        ("1w", None),
    ];
    for (text, millis) in table {
        assert_eq!(
            parse_duration(text),
            millis.map(Duration::from_millis),
            "{text}"
        );
    }
}

#[test]
fn secrets_come_from_files_and_never_print() {
    let dir = ScratchDir::new("secret");
    let path = dir.0.join("password");
    std::fs::write(&path, "s3cret-value\n").unwrap();
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__REDIS__PASSWORD_FILE", path.to_str().unwrap()),
            ("IDEM__KAFKA__SASL_PASSWORD", "kafka-pw"),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("s3cret-value")
    );
    assert_eq!(
        c.kafka.sasl_password.as_ref().map(Secret::expose),
        Some("kafka-pw")
    );
    let printed = format!("{c:?}");
    assert!(
        !printed.contains("s3cret-value") && !printed.contains("kafka-pw"),
        "{printed}"
    );
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact_url("redis://u:secret@h:6379"),
        "redis://u:***@h:6379"
    );
    assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    // An `@` before the scheme is not user information.
    assert_eq!(redact_url("x@redis://h:6379"), "x@redis://h:6379");
    assert_eq!(redact_url("redis://:pw@h:1"), "redis://:***@h:1");
    // A cluster's seed list: every node's password, not only the last.
    assert_eq!(
        redact_url("redis://u:a@h1:7000,redis://u:b@h2:7001"),
        "redis://u:***@h1:7000,redis://u:***@h2:7001"
    );
}

/// Values at and around each numeric bound: accepted or refused by key.
#[test]
fn bounds_by_table() {
    let table: &[(&str, &str, bool)] = &[
        ("IDEM__DLQ__MAX_RATIO", "1.0", true),
        ("IDEM__DLQ__MAX_RATIO", "0.0001", true),
        ("IDEM__DLQ__MAX_RATIO", "1.0001", false),
        ("IDEM__DLQ__MAX_RATIO", "0", false),
        ("IDEM__DLQ__MAX_RATIO", "-0.5", false),
        ("IDEM__EVENT__MAX_BYTES", "1", true),
        ("IDEM__EVENT__MAX_BYTES", "0", false),
        ("IDEM__EVENT__MAX_BYTES", "-1", false),
        ("IDEM__DLQ__RATIO_WINDOW", "1", true),
        ("IDEM__DLQ__RATIO_WINDOW", "0", false),
        ("IDEM__PIPELINE__BATCH_LINGER", "0ms", true),
        ("IDEM__PIPELINE__STALL_TIMEOUT", "0ms", false),
        ("IDEM__REDIS__DURABILITY", "replicas:1", true),
        ("IDEM__REDIS__DURABILITY", "replicas:0", false),
        ("IDEM__REDIS__DURABILITY", "replicas:", false),
        ("IDEM__REDIS__DURABILITY", "replicas:-1", false),
        ("IDEM__REDIS__DURABILITY", "fsync", true),
        ("IDEM__REDIS__DURABILITY", "always", false),
    ];
    for (var, value, ok) in table {
        let got = Config::load(None, &env(&[(var, value)]));
        assert_eq!(got.is_ok(), *ok, "{var}={value}: {got:?}");
    }
    let c = Config::load(None, &env(&[("IDEM__DLQ__MAX_RATIO", "0.25")])).unwrap();
    assert_eq!(c.dlq.max_ratio, 0.25);
    let c = Config::load(None, &env(&[("IDEM__EVENT__MAX_BYTES", "512")])).unwrap();
    assert_eq!(c.event.max_bytes, 512);
}

#[test]
fn durability_parses_by_table() {
    let table: &[(&str, Option<Durability>)] = &[
        ("ack", Some(Durability::Ack)),
        ("fsync", Some(Durability::Fsync)),
        ("replicas:1", Some(Durability::Replicas(1))),
        ("replicas:3", Some(Durability::Replicas(3))),
        ("replicas:0", None),
        ("replicas:x", None),
        ("replicas", None),
        ("ACK", None),
        ("", None),
    ];
    for (text, want) in table {
        assert_eq!(parse_durability(text), *want, "{text}");
    }
}

/// Every enum key takes exactly the documented names; a wrong one is
/// refused with the accepted names in the message.
#[test]
fn choices_decode_by_name() {
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__AUTO_OFFSET_RESET", "latest"),
            ("IDEM__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("IDEM__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("IDEM__KAFKA__SASL_USERNAME", "idem"),
            ("IDEM__REDIS__MODE", "cluster"),
            (
                "IDEM__REDIS__URL",
                "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
            ),
            ("IDEM__EVENT__FORMAT", "cloudevents"),
            ("IDEM__EVENT__DUPLICATE_KEYS", "reject"),
            ("IDEM__EVENT__KEY_MISMATCH", "dead_letter"),
            ("IDEM__LOG__FORMAT", "json"),
        ]),
    )
    .unwrap();
    assert_eq!(c.kafka.auto_offset_reset, OffsetReset::Latest);
    assert_eq!(c.kafka.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(c.kafka.sasl_mechanism, SaslMechanism::ScramSha512);
    assert_eq!(c.redis.mode, RedisMode::Cluster);
    assert_eq!(c.event.format, EventFormat::CloudEvents);
    assert!(c.event.reject_duplicate_keys);
    assert!(c.event.dead_letter_key_mismatch);
    assert_eq!(c.log.format, LogFormat::Json);

    let d = Config::defaults();
    assert_eq!(d.kafka.auto_offset_reset, OffsetReset::Earliest);
    assert_eq!(d.kafka.security_protocol, SecurityProtocol::Plaintext);
    assert_eq!(d.redis.mode, RedisMode::Standalone);
    assert_eq!(d.event.format, EventFormat::Auto);
    assert!(!d.event.reject_duplicate_keys);
    assert!(!d.event.dead_letter_key_mismatch);
    assert_eq!(d.log.format, LogFormat::Text);

    let err = Config::load(None, &env(&[("IDEM__KAFKA__SECURITY_PROTOCOL", "tls")])).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.key(), Some("kafka.security_protocol"));
    for name in ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] {
        assert!(text.contains(&format!("`{name}`")), "{text}");
    }
    assert!(!text.contains("unknown variant"), "{text}");
    let err = Config::load(None, &env(&[("IDEM__LOG__FORMAT", "xml")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config key `log.format`: got \"xml\", expected `text` or `json` (set in IDEM__LOG__FORMAT)"
    );
    let err = Config::load(None, &env(&[("IDEM__EVENT__KEY_MISMATCH", "ignore")])).unwrap_err();
    assert_eq!(err.key(), Some("event.key_mismatch"));
    let err = Config::load(None, &env(&[("IDEM__EVENT__DUPLICATE_KEYS", "first")])).unwrap_err();
    assert_eq!(err.key(), Some("event.duplicate_keys"));
    let err = Config::load(None, &env(&[("IDEM__KAFKA__SASL_MECHANISM", "plain")])).unwrap_err();
    assert_eq!(err.key(), Some("kafka.sasl_mechanism"));
    let err = Config::load(None, &env(&[("IDEM__REDIS__MODE", "sentinel")])).unwrap_err();
    assert_eq!(err.key(), Some("redis.mode"));
    let err = Config::load(None, &env(&[("IDEM__EVENT__FORMAT", "avro")])).unwrap_err();
    assert_eq!(err.key(), Some("event.format"));
}

#[test]
fn protocol_names_and_properties_by_table() {
    use SecurityProtocol::*;
    let table = [
        (Plaintext, "plaintext", false, false),
        (Ssl, "ssl", true, false),
        (SaslPlaintext, "sasl_plaintext", false, true),
        (SaslSsl, "sasl_ssl", true, true),
    ];
    for (p, name, tls, sasl) in table {
        assert_eq!((p.as_str(), p.uses_tls(), p.uses_sasl()), (name, tls, sasl));
    }
    assert_eq!(SaslMechanism::Plain.as_str(), "PLAIN");
    assert_eq!(SaslMechanism::ScramSha256.as_str(), "SCRAM-SHA-256");
    assert_eq!(SaslMechanism::ScramSha512.as_str(), "SCRAM-SHA-512");
    assert_eq!(OffsetReset::Earliest.as_str(), "earliest");
    assert_eq!(OffsetReset::Latest.as_str(), "latest");
}

#[test]
fn secret_debug_is_redacted() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(s.expose(), "hunter2");
}

#[test]
fn urls_and_topic_names_by_table() {
    let ok = |pairs: &[(&str, &str)]| Config::load(None, &env(pairs));
    assert!(ok(&[("IDEM__REDIS__URL", "rediss://u:p@h:6380")]).is_ok());
    let err = ok(&[("IDEM__REDIS__URL", "redis://a:1,redis://b:2")]).unwrap_err();
    assert_eq!(
        err.key(),
        Some("redis.url"),
        "several seeds need cluster mode"
    );
    let err = ok(&[
        ("IDEM__REDIS__MODE", "cluster"),
        ("IDEM__REDIS__URL", "redis://a:1, http://b:2"),
    ])
    .unwrap_err();
    assert_eq!(err.key(), Some("redis.url"));
    assert!(!err.to_string().contains("p@"), "{err}");
    let err = ok(&[("IDEM__REDIS__URL", "http://u:pw@h:1")]).unwrap_err();
    assert!(
        !err.to_string().contains("pw"),
        "passwords never in errors: {err}"
    );

    for (template, valid) in [
        ("{topic}.dlq", true),
        ("dead-letters", true),
        ("{topic}/dlq", false),
        ("bad topic", false),
        ("", false),
    ] {
        let got = ok(&[("IDEM__DLQ__TOPIC", template)]);
        assert_eq!(got.is_ok(), valid, "{template:?}: {got:?}");
    }
    let c = ok(&[("IDEM__DLQ__TOPIC", "{topic}-dead")]).unwrap();
    assert_eq!(c.dlq.topic_for("orders"), "orders-dead");

    let long = "a".repeat(249);
    for (name, valid) in [
        (long.as_str(), true),
        (&*format!("{long}a"), false),
        (".", false),
        ("..", false),
        ("a.b_c-D9", true),
        ("", false),
        ("é", false),
    ] {
        assert_eq!(is_valid_topic_name(name), valid, "{name:?}");
    }
    let err = ok(&[("IDEM__REDIS__KEY_PREFIX", "a}b")]).unwrap_err();
    assert_eq!(err.key(), Some("redis.key_prefix"));
}

#[test]
fn librdkafka_passthrough_flattens_and_refuses_fixed_keys() {
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__LIBRDKAFKA__FETCH.MAX.BYTES", "1000"),
            ("IDEM__KAFKA__LIBRDKAFKA__CHECK.CRCS", "true"),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.kafka
            .librdkafka
            .get("fetch.max.bytes")
            .map(String::as_str),
        Some("1000")
    );
    assert_eq!(
        c.kafka.librdkafka.get("check.crcs").map(String::as_str),
        Some("true")
    );
    for key in FIXED_KEYS_SAMPLE {
        let var = format!("IDEM__KAFKA__LIBRDKAFKA__{}", key.to_uppercase());
        let err = Config::load(None, &env(&[(&var, "x")])).unwrap_err();
        assert_eq!(err.key(), Some(&*format!("kafka.librdkafka.{key}")));
    }
}

const FIXED_KEYS_SAMPLE: [&str; 3] = ["enable.auto.commit", "group.id", "sasl.password"];

#[test]
fn group_instance_id_is_trimmed_and_optional() {
    let c = Config::load(
        None,
        &env(&[("IDEM__KAFKA__GROUP_INSTANCE_ID", "  pod-1 ")]),
    )
    .unwrap();
    assert_eq!(c.kafka.group_instance_id.as_deref(), Some("pod-1"));
    let c = Config::load(None, &env(&[("IDEM__KAFKA__GROUP_INSTANCE_ID", "  ")])).unwrap();
    assert_eq!(c.kafka.group_instance_id, None);
    assert_eq!(Config::defaults().kafka.group_instance_id, None);
}

#[test]
fn ca_location_takes_probe_a_directory_or_a_file() {
    let dir = std::env::temp_dir();
    for value in ["probe", dir.to_str().unwrap(), "Cargo.toml"] {
        let c = Config::load(None, &env(&[("IDEM__KAFKA__SSL_CA_LOCATION", value)])).unwrap();
        assert_eq!(c.kafka.ssl_ca_location, value);
    }
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__SSL_CERTIFICATE_LOCATION", "Cargo.toml"),
            ("IDEM__KAFKA__SSL_KEY_LOCATION", "Cargo.lock"),
        ]),
    )
    .unwrap();
    assert_eq!(
        (
            c.kafka.ssl_certificate_location.as_str(),
            c.kafka.ssl_key_location.as_str()
        ),
        ("Cargo.toml", "Cargo.lock")
    );
}

#[test]
fn for_brokers_and_for_url_point_the_defaults_elsewhere() {
    let defaults = Config::defaults();
    let k = KafkaConfig::for_brokers("10.0.0.1:9093");
    assert_eq!(k.brokers, "10.0.0.1:9093");
    assert_eq!(k.group_id, defaults.kafka.group_id);
    let r = RedisConfig::for_url("redis://10.0.0.2:7000", RedisMode::Cluster);
    assert_eq!(
        (r.url.as_str(), r.mode),
        ("redis://10.0.0.2:7000", RedisMode::Cluster)
    );
    assert_eq!(r.key_prefix, defaults.redis.key_prefix);
    let r = RedisConfig::for_url("redis://h:1", RedisMode::Standalone);
    assert_eq!(r.mode, RedisMode::Standalone);
}

/// A private directory under the system temp dir, removed when the test ends
/// (passing or not), so repeated runs leave nothing behind.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(purpose: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("idem-{purpose}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn broker_lists_by_table() {
    for (brokers, ok) in [
        ("127.0.0.1:9092", true),
        ("kafka-1:9092, kafka-2.prod.svc:9093", true),
        ("[::1]:9092", true),
        ("kafka://127.0.0.1:9092", false),
        ("127.0.0.1", false),
        ("127.0.0.1:0", false),
        ("127.0.0.1:70000", false),
        (":9092", false),
        ("a:9092,,b:9092", false),
        ("[::1:9092", false),
    ] {
        let result = Config::load(None, &env(&[("IDEM__KAFKA__BROKERS", brokers)]));
        match result {
            Ok(_) => assert!(ok, "{brokers} accepted"),
            Err(e) => {
                assert!(!ok, "{brokers} refused: {e}");
                let text = e.to_string();
                assert!(
                    text.contains("kafka.brokers") && text.contains("host:port"),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn topic_windows_from_one_environment_string() {
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__TOPICS", "orders-v2,payments,ux.clicks"),
            ("IDEM__DEDUPE__WINDOWS", "orders-v2=72h, ux.clicks=1h"),
            ("IDEM__DEDUPE__TOPIC_WINDOWS__PAYMENTS", "48h"),
        ]),
    )
    .unwrap();
    let hours = |t: &str| c.dedupe.window_for(t).as_secs() / 3600;
    assert_eq!(
        [
            hours("orders-v2"),
            hours("payments"),
            hours("ux.clicks"),
            hours("other")
        ],
        [72, 48, 1, 24]
    );
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    for (bad, names) in [
        ("orders-v2", "orders-v2"),
        ("orders-v2=", "(orders-v2)"),
        ("orders v2=1h", "orders v2"),
        ("orders-v2=3 weeks", "(orders-v2)"),
    ] {
        let e = Config::load(None, &env(&[("IDEM__DEDUPE__WINDOWS", bad)])).unwrap_err();
        assert_eq!(e.key(), Some("dedupe.windows"), "{bad}: {e}");
        assert!(e.to_string().contains(names), "{bad}: {e}");
    }
}

#[test]
fn windows_for_unconsumed_topics_are_warned_about() {
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__TOPICS", "ux-orders"),
            ("IDEM__DEDUPE__TOPIC_WINDOWS__UX_ORDERS", "1h"),
            ("IDEM__DEDUPE__WINDOWS", "payments=2h"),
        ]),
    )
    .unwrap();
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].contains("`payments`") && warnings[0].contains("kafka.topics: ux-orders"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].contains("`ux_orders`")
            && warnings[1].contains("did you mean `ux-orders`")
            && warnings[1].contains("IDEM__DEDUPE__WINDOWS=ux-orders="),
        "{}",
        warnings[1]
    );
}

#[test]
fn durations_format_back_to_themselves() {
    for (text, formatted) in [
        ("24h", "24h"),
        ("72h", "72h"),
        ("7d", "168h"),
        ("90s", "90s"),
        ("120s", "2m"),
        ("250ms", "250ms"),
        ("1500ms", "1500ms"),
        ("0s", "0ms"),
    ] {
        let d = parse_duration(text).unwrap();
        assert_eq!(format_duration(d), formatted, "{text}");
        assert_eq!(parse_duration(formatted), Some(d), "{formatted}");
    }
    let c = Config::load(
        None,
        &env(&[
            ("IDEM__KAFKA__TOPICS", "a,b"),
            ("IDEM__DEDUPE__WINDOWS", "b=36h"),
        ]),
    )
    .unwrap();
    assert_eq!(c.effective_windows(), "a=24h,b=36h");
}

/// `(section, key)` → its doc, as build.rs wrote it from
/// config/default.toml (one file per key).
fn key_docs() -> BTreeMap<(String, String), String> {
    let dir = concat!(env!("OUT_DIR"), "/config-docs");
    std::fs::read_dir(dir)
        .expect("build.rs wrote the keys' docs")
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let (section, key) = name.split_once('.').unwrap();
            let doc = std::fs::read_to_string(&path).unwrap();
            ((section.to_string(), key.to_string()), doc)
        })
        .collect()
}

/// `(section, key)` → the key its field's doc names (`key_doc!`), read
/// from the sources of the structs serde decodes the sections into.
fn field_docs() -> BTreeMap<(String, String), (String, String)> {
    let sections = [
        ("KafkaConfig", "kafka"),
        ("RedisConfig", "redis"),
        ("DedupeConfig", "dedupe"),
        ("EventSection", "event"),
        ("StateSection", "state"),
        ("DlqConfig", "dlq"),
        ("PipelineConfig", "pipeline"),
        ("MetricsConfig", "metrics"),
        ("ShutdownConfig", "shutdown"),
        ("LogConfig", "log"),
        ("ChangelogConfig", "changelog"),
        ("GatewayConfig", "gateway"),
    ];
    let mut out = BTreeMap::new();
    for source in [
        include_str!("kafka.rs"),
        include_str!("redis.rs"),
        include_str!("sections.rs"),
        include_str!("mod.rs"),
    ] {
        let mut section: Option<&str> = None;
        let (mut named, mut rename) = (None, None);
        for line in source.lines().map(str::trim) {
            if let Some((_, s)) = sections.iter().find(|(name, _)| {
                [format!("struct {name} {{"), format!("pub struct {name} {{")]
                    .iter()
                    .any(|head| line.ends_with(head.as_str()))
            }) {
                section = Some(s);
                continue;
            }
            let Some(sec) = section else { continue };
            if line == "}" {
                section = None;
            } else if let Some(args) = line.strip_prefix("#[doc = key_doc!(") {
                let args: Vec<String> = args
                    .trim_end_matches(")]")
                    .split(", ")
                    .map(|a| a.trim_matches('"').to_string())
                    .collect();
                named = Some((args[0].clone(), args[1].clone()));
            } else if line.starts_with("#[") {
                rename = line
                    .split_once("rename = \"")
                    .and_then(|(_, r)| r.split_once('"'))
                    .map(|(r, _)| r.to_string());
            } else if let Some((field, _)) = line.trim_start_matches("pub ").split_once(':') {
                let key = rename.take().unwrap_or_else(|| field.to_string());
                let doc = named.take().unwrap_or_default();
                out.insert((sec.to_string(), key), doc);
            }
        }
    }
    out
}

/// Every key of config/default.toml is a field of the struct its section
/// is decoded into (serde refuses unknown keys, and a field without a
/// default fails the load), and the field's doc is the key's comment,
/// included from it (written once: build.rs copies each comment), naming
/// the field's own section and key.
#[test]
fn every_key_is_documented_once_in_default_toml_and_its_field_includes_it() {
    let comments = key_docs();
    let docs = field_docs();
    assert_eq!(
        comments.keys().collect::<Vec<_>>(),
        docs.keys().collect::<Vec<_>>(),
        "the keys of config/default.toml and the decoded structs' fields"
    );
    for (key, named) in &docs {
        assert_eq!(
            (&key.0, &key.1),
            (&named.0, &named.1),
            "{}.{}: its field must include its own key's doc",
            key.0,
            key.1
        );
    }
    for (key, doc) in &comments {
        assert!(
            !doc.trim().is_empty(),
            "{}.{} has an empty doc",
            key.0,
            key.1
        );
    }
}

#[test]
fn settings_that_change_what_events_do_refuse_an_unconsumed_topic() {
    let dir = std::env::temp_dir().join(format!("idem-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("effects.toml");
    std::fs::write(
        &file,
        r#"
[kafka]
topics = ["nc-orders"]
[dedupe]
dense_seq_topics = ["payments"]
[[effects]]
topic = "nc-ordres"
types = ["deposit"]
counters = [{ field = "balance", from = "/amount" }]
"#,
    )
    .unwrap();
    let c = Config::load(Some(&file), &HashMap::new()).unwrap();
    let refusals = c.refusals();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        refusals[0]
            .starts_with("effects[0].topic = `nc-ordres` names a topic idem does not consume")
            && refusals[0]
                .contains("(kafka.topics: nc-orders): did you mean `nc-orders`? its events"),
        "{}",
        refusals[0]
    );
    assert!(
        refusals[1].starts_with("dedupe.dense_seq_topics = `payments`")
            && refusals[1].contains("(kafka.topics: nc-orders): its events")
            && !refusals[1].contains("did you mean"),
        "{}",
        refusals[1]
    );
    assert!(Config::defaults().refusals().is_empty());
}

#[test]
fn a_changelog_names_consumed_topics_and_never_one_idem_reads() {
    let load = |vars: &[(&str, &str)]| Config::load(None, &env(vars)).unwrap();
    let c = load(&[
        ("IDEM__KAFKA__TOPICS", "orders,payments"),
        ("IDEM__CHANGELOG__TOPICS", "orders"),
    ]);
    assert!(c.refusals().is_empty(), "{:?}", c.refusals());
    assert_eq!(c.changelog.topic_for("orders"), "orders.changes");
    // The rolling-upgrade rule, which `idem run` logs and `idem check` prints.
    let said = c.changelog.describe("orders-view").unwrap();
    assert!(
        said.starts_with("changelog on (orders -> orders.changes): every instance of group orders-view must run 0.3.0 or later;"),
        "{said}"
    );
    assert_eq!(Config::defaults().changelog.describe("g"), None);
    assert!(c.policy("orders").changelog);
    assert!(!c.policy("payments").changelog);
    let refusals = load(&[
        ("IDEM__KAFKA__TOPICS", "orders,orders.changes"),
        ("IDEM__CHANGELOG__TOPICS", "ordres,orders"),
    ])
    .refusals();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        refusals[0].starts_with("changelog.topics = `ordres` names a topic idem does not consume"),
        "{}",
        refusals[0]
    );
    assert!(
        refusals[1].contains("makes `orders.changes` the changelog of `orders`"),
        "{}",
        refusals[1]
    );
    let bad = Config::load(None, &env(&[("IDEM__CHANGELOG__TOPIC", "a b")])).unwrap_err();
    assert_eq!(bad.key(), Some("changelog.topic"), "{bad}");
    assert!(bad.to_string().contains("{topic}.changes"), "{bad}");
}

#[test]
fn the_nearest_topic_is_a_typo_away_or_none() {
    let topics: Vec<String> = ["nc-orders", "payments", "ux"].map(String::from).to_vec();
    assert_eq!(forms::nearest("nc-ordres", &topics), Some("nc-orders"));
    assert_eq!(forms::nearest("payment", &topics), Some("payments"));
    assert_eq!(forms::nearest("PAYMENTS", &topics), None);
    assert_eq!(forms::nearest("ledger", &topics), None);
    assert_eq!(forms::nearest("ub", &topics), Some("ux"));
}

/// Every mistake of the layers at once, each where it was set (the file's
/// line, the environment variable), an unknown key with the nearest known
/// one, and today's message for a bad value. Before, serde's first error
/// only: ``unknown field `topic`, expected one of … for key `kafka` ``.
#[test]
fn every_config_mistake_is_reported_at_once_with_its_place_and_the_nearest_key() {
    let dir = std::env::temp_dir().join(format!("idem-mistakes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("idem.toml");
    std::fs::write(
        &file,
        "[kafka]\ngroup_id = \"orders\"\ntopic = [\"orders\"]\n\n[redis]\nmode = \"clustered\"\n\n[[effects]]\ntopic = \"orders\"\ntypes = [\"deposit\"]\ncountrs = []\n",
    )
    .unwrap();
    let env = HashMap::from([
        ("IDEM__DEDUPE__WINDOW".to_string(), "forever".to_string()),
        ("IDEM__PIPELINE__BATCHSIZE".to_string(), "10".to_string()),
    ]);
    let err = Config::load(Some(&file), &env).unwrap_err();
    let ConfigError::Mistakes(mistakes) = &err else {
        panic!("several mistakes expected: {err}");
    };
    let path = file.display().to_string();
    let found: Vec<(Option<&str>, Option<&str>)> = mistakes
        .iter()
        .map(|m| (m.error.key(), m.place.as_deref()))
        .collect();
    assert_eq!(
        found,
        vec![
            (Some("dedupe.window"), Some("IDEM__DEDUPE__WINDOW")),
            (Some("effects[0].countrs"), Some(&*format!("{path}:11"))),
            (Some("kafka.topic"), Some(&*format!("{path}:3"))),
            (
                Some("pipeline.batchsize"),
                Some("IDEM__PIPELINE__BATCHSIZE")
            ),
            (Some("redis.mode"), Some(&*format!("{path}:6"))),
        ],
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("5 mistakes in the configuration:"),
        "{text}"
    );
    assert!(text.contains("did you mean `kafka.topics`?"), "{text}");
    assert!(
        text.contains("did you mean `effects[0].counters`?"),
        "{text}"
    );
    assert!(
        text.contains("config key `redis.mode`: got \"clustered\", expected"),
        "a bad value keeps its message: {text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The group protocol has its own key: its passthrough is refused under
/// either protocol; under `consumer` the librdkafka keys it moves to the
/// broker are refused, each naming what replaces it, and idem's own
/// session timeout warns, but only when a file or the environment set it.
#[test]
fn group_protocol_keys_are_refused_or_warned_by_name() {
    for protocol in ["classic", "consumer"] {
        let err = Config::load(
            None,
            &env(&[
                ("IDEM__KAFKA__GROUP_PROTOCOL", protocol),
                ("IDEM__KAFKA__LIBRDKAFKA__GROUP.PROTOCOL", "consumer"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.key(), Some("kafka.librdkafka.group.protocol"));
        assert!(err.to_string().contains("kafka.group_protocol"), "{err}");
    }
    let moved = [
        ("SESSION.TIMEOUT.MS", "group.consumer.session.timeout.ms"),
        (
            "HEARTBEAT.INTERVAL.MS",
            "group.consumer.heartbeat.interval.ms",
        ),
        ("PARTITION.ASSIGNMENT.STRATEGY", "group.remote.assignor"),
    ];
    for (key, instead) in moved {
        let var = format!("IDEM__KAFKA__LIBRDKAFKA__{key}");
        let err = Config::load(
            None,
            &env(&[("IDEM__KAFKA__GROUP_PROTOCOL", "consumer"), (&var, "3000")]),
        )
        .unwrap_err();
        let named = format!("kafka.librdkafka.{}", key.to_lowercase());
        assert_eq!(err.key(), Some(named.as_str()), "{err}");
        assert!(err.to_string().contains(instead), "{err}");
        // Under the classic protocol they are librdkafka's own.
        Config::load(None, &env(&[(&var, "3000")])).unwrap();
    }
    let consumer = |extra: &[(&str, &str)]| {
        let mut pairs = vec![("IDEM__KAFKA__GROUP_PROTOCOL", "consumer")];
        pairs.extend_from_slice(extra);
        Config::load(None, &env(&pairs)).unwrap().warnings()
    };
    assert_eq!(
        consumer(&[]),
        Vec::<String>::new(),
        "the default is no choice"
    );
    let warned = consumer(&[("IDEM__KAFKA__SESSION_TIMEOUT", "6s")]);
    assert!(
        warned.len() == 1
            && warned[0].contains("kafka.session_timeout")
            && warned[0].contains("group.consumer.session.timeout.ms"),
        "{warned:?}"
    );
    let classic = Config::load(None, &env(&[("IDEM__KAFKA__SESSION_TIMEOUT", "6s")])).unwrap();
    assert!(classic.warnings().is_empty(), "{:?}", classic.warnings());
    let err = Config::load(None, &env(&[("IDEM__KAFKA__GROUP_PROTOCOL", "kip848")])).unwrap_err();
    assert_eq!(err.key(), Some("kafka.group_protocol"));
    assert!(err.to_string().contains("consumer"), "{err}");
}

/// `idem config show` prints TOML values: lists and numbers bare, strings
/// quoted, secrets redacted inside their quotes.
#[test]
fn effective_values_are_toml() {
    let settings = effective(
        None,
        &env(&[
            ("IDEM__KAFKA__TOPICS", "orders,payments"),
            ("IDEM__KAFKA__SASL_PASSWORD", "hunter2"),
            ("IDEM__REDIS__URL", "redis://:pw@127.0.0.1:6379"),
        ]),
    )
    .unwrap();
    let value = |key: &str| {
        settings
            .iter()
            .find(|s| s.key == key)
            .map(|s| s.value.clone())
            .unwrap_or_else(|| panic!("no {key}"))
    };
    assert_eq!(value("kafka.topics"), r#"["orders", "payments"]"#);
    assert_eq!(value("dlq.max_ratio"), "0.5");
    assert_eq!(value("dlq.ratio_window"), "1000");
    assert_eq!(value("kafka.group_id"), r#""idem""#);
    assert_eq!(value("dedupe.dense_seq_topics"), "[]");
    assert_eq!(value("kafka.sasl_password"), r#""***""#);
    assert!(!value("redis.url").contains("pw"), "{}", value("redis.url"));
    // The lines (dotted keys) read back as a TOML file.
    let text: Vec<String> = settings
        .iter()
        .filter(|s| !s.key.contains('['))
        .map(|s| format!("{} = {}", s.key, s.value))
        .collect();
    let text = text.join("\n");
    let read = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build();
    assert!(read.is_ok(), "not TOML: {read:?}\n{text}");
}

/// A topic whose events count (counters, ledgers, sets) without a dense
/// seq is warned about once, with its window, what a dense seq would
/// change and when it is right; `dedupe.late_copies_accepted` silences it.
#[test]
fn counting_effects_without_dense_seqs_are_warned_once_per_topic_unless_accepted() {
    let dir = std::env::temp_dir().join(format!("idem-late-copies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("effects.toml");
    std::fs::write(
        &file,
        "[dedupe.topic_windows]\ndeposits = \"2m\"\n\
         [[effects]]\ntopic = \"deposits\"\ntypes = [\"deposit\"]\ncounters = [{ field = \"balance\", from = \"/amount\" }]\n\
         [[effects]]\ntopic = \"deposits\"\ntypes = [\"fee\"]\nledger = { stream = \"fees\", max_len = 100 }\n\
         [[effects]]\ntopic = \"orders\"\ntypes = [\"paid\"]\nstate = \"merge\"\n",
    )
    .unwrap();
    let load = |extra: &[(&str, &str)]| {
        let mut vars = vec![("IDEM__KAFKA__TOPICS", "deposits,orders")];
        vars.extend_from_slice(extra);
        Config::load(Some(&file), &env(&vars)).unwrap().warnings()
    };
    let warned: Vec<String> = load(&[])
        .into_iter()
        .filter(|w| w.contains("dense_seq_topics"))
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    let w = &warned[0];
    for needed in [
        "topic deposits",
        "(2m)",
        "counts again",
        "1, 2, 3",
        "seq_gap_closed",
        "dedupe.late_copies_accepted = [\"deposits\"]",
    ] {
        assert!(w.contains(needed), "{needed}: {w}");
    }
    let accepted = load(&[("IDEM__DEDUPE__LATE_COPIES_ACCEPTED", "deposits")]);
    assert!(
        !accepted.iter().any(|w| w.contains("dense_seq_topics")),
        "{accepted:?}"
    );
    let dense = load(&[("IDEM__DEDUPE__DENSE_SEQ_TOPICS", "deposits")]);
    assert!(
        !dense.iter().any(|w| w.contains("counts again")),
        "{dense:?}"
    );
}
