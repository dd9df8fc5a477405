//! Secrets: passwords come from files or the environment and never appear in
//! logs, errors, `--help` or metrics; a wrong password fails clearly.

mod common;

use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::tools::sample::{generate, SampleSpec};

const PASSWORD: &str = "pa55-Zebra-Quartz-0917";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_a_file_authenticates_and_never_leaks() {
    let redis = private_redis(Some(PASSWORD)).await;
    let topic = unique("secret");
    create_topic(&topic, 1).await;
    let records = generate(&SampleSpec {
        events: 300,
        entities: 10,
        prefix: topic.clone(),
        ..SampleSpec::default()
    });
    produce(&topic, &records).await;
    let secret_file =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{topic}.password"));
    std::fs::write(&secret_file, format!("{PASSWORD}\n")).unwrap();

    let mut opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__REDIS__PASSWORD_FILE", secret_file.to_str().unwrap())
        .with("IDEM__KAFKA__SASL_PASSWORD", PASSWORD)
        .with("RUST_LOG", "debug,librdkafka=warn");
    opts.redis_url = redis.url();
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, Duration::from_secs(120)).await;
    assert!(
        idem.outcome(&topic, Outcome::Applied).await > 0,
        "authenticated with the password from the file"
    );
    let metrics = idem.metrics().await.unwrap();
    let log = idem.log.clone();
    idem.terminate().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains(PASSWORD),
        "the password is in the log {}",
        log.display()
    );
    assert!(!metrics.contains(PASSWORD));

    // A wrong password: a clear error that names the problem, not the password.
    let logged =
        log_of_refused_run(&opts, "IDEM__REDIS__PASSWORD_FILE", "not-the-password-4242").await;
    assert!(
        logged.contains("WRONGPASS")
            || logged.contains("Authentication")
            || logged.contains("auth"),
        "{logged}"
    );
    assert!(!logged.contains("not-the-password-4242") && !logged.contains(PASSWORD));

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["run", "--help"])
        .env("IDEM__REDIS__PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains(PASSWORD));
}

#[test]
fn metrics_endpoint_binds_to_loopback_by_default() {
    let c = idem::config::Config::defaults();
    assert!(c.metrics.listen.ip().is_loopback());
}

/// Runs idem with `opts`, its password (given by `key`) replaced by `wrong`:
/// it must exit 2 saying that Redis refused the credentials (not that Redis
/// cannot be reached); returns its log.
async fn log_of_refused_run(opts: &IdemOpts, key: &str, wrong: &str) -> String {
    let mut wrong_opts = opts.clone();
    wrong_opts.env.retain(|(k, _)| k != key);
    wrong_opts
        .env
        .push(("IDEM__REDIS__PASSWORD".into(), wrong.into()));
    let idem = Idem::spawn(&wrong_opts);
    let log = idem.log.clone();
    let status = idem.wait_exit(Duration::from_secs(30)).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{logged}");
    assert!(
        logged.contains("refused the credentials") && !logged.contains("cannot reach Redis"),
        "{logged}"
    );
    logged
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client
/// certificate, made with openssl.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (make services installs it)");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=idem-test-ca",
    ]);
    // `<name>.key` and `<name>.crt` signed by the CA. The extensions make it
    // an X.509 v3 certificate: rustls refuses v1.
    let signed = |name: &str, subject: &str, extensions: &str| {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.cnf"),
        );
        std::fs::write(dir.join(&ext), extensions).unwrap();
        run(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    };
    signed(
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    );
    signed("client", "/CN=idem-client", "extendedKeyUsage=clientAuth\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_over_mutual_tls_authenticates_and_a_wrong_password_fails() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let port = free_port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
        ])
        // Mutual TLS: the server asks for a certificate signed by its CA.
        .args(["--tls-auth-clients", "yes"])
        // Only the ACL user may do anything: the default user is off.
        .args(["--user", "default", "off"])
        .args([
            "--user",
            "idem",
            "on",
            &format!(">{PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");

    let topic = unique("tls");
    create_topic(&topic, 1).await;
    let records = generate(&SampleSpec {
        events: 200,
        entities: 10,
        prefix: topic.clone(),
        ..SampleSpec::default()
    });
    produce(&topic, &records).await;
    let ca = dir.join("ca.crt");
    let mut opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__REDIS__TLS_CA_FILE", ca.to_str().unwrap())
        .with(
            "IDEM__REDIS__TLS_CERT_FILE",
            dir.join("client.crt").to_str().unwrap(),
        )
        .with(
            "IDEM__REDIS__TLS_KEY_FILE",
            dir.join("client.key").to_str().unwrap(),
        )
        .with("IDEM__REDIS__USERNAME", "idem")
        .with("IDEM__REDIS__PASSWORD", PASSWORD);
    opts.redis_url = format!("rediss://127.0.0.1:{port}");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, Duration::from_secs(120)).await;
    assert!(
        idem.outcome(&topic, Outcome::Applied).await > 0,
        "applied over mutual TLS as the ACL user"
    );
    let log = idem.log.clone();
    idem.terminate().await;
    assert!(!std::fs::read_to_string(&log).unwrap().contains(PASSWORD));

    let logged = log_of_refused_run(&opts, "IDEM__REDIS__PASSWORD", "wrong-password-77").await;
    assert!(!logged.contains("wrong-password-77"));
    let _ = redis.kill();
    let _ = redis.wait();
}

// Kafka security against the local broker's SASL_SSL (9094) and mutual-TLS
// SSL (9095) listeners; `make services` makes their throwaway CA,
// certificates and users (scripts/services.sh).

fn kafka_tls_file(name: &str) -> String {
    let dir = std::env::var("IDEM_KAFKA_TLS_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/kafka/tls").into());
    let path = std::path::Path::new(&dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `make services` (it makes the broker's test CA and \
         listeners; a broker it did not start has neither: `make services-down` first)",
        path.display()
    );
    path.to_str().unwrap().to_string()
}

fn sasl_ssl_brokers() -> String {
    std::env::var("IDEM_KAFKA_SASL_SSL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9094".into())
}

fn mtls_brokers() -> String {
    std::env::var("IDEM_KAFKA_SSL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9095".into())
}

/// A topic with `good` events and one malformed record (so the dead-letter
/// producer must work over the secured connection too).
async fn secured_topic(
    name: &str,
    good: usize,
) -> (String, Vec<idem::tools::sample::SampleRecord>) {
    let topic = unique(name);
    create_topic(&topic, 1).await;
    let records = generate(&SampleSpec {
        events: good,
        entities: 10,
        prefix: topic.clone(),
        ..SampleSpec::default()
    });
    produce(&topic, &records).await;
    produce_raw(
        &topic,
        &[(Some(b"k".as_slice()), Some(b"{not json".as_slice()))],
    )
    .await;
    (topic, records)
}

/// Runs idem with `security` until it caught up; asserts the oracle's
/// applied count, the dead letter, and that `secret` never reached the log.
async fn consumes_over(
    topic: &str,
    records: &[idem::tools::sample::SampleRecord],
    security: &[(&str, String)],
    secret: &str,
) {
    let mut opts = IdemOpts::new(topic, topic, topic);
    for (k, v) in security {
        opts = opts.with(k, v);
    }
    let opts = opts.with("RUST_LOG", "debug,librdkafka=info");
    let idem = Idem::spawn(&opts);
    wait_caught_up(topic, topic, 1, Duration::from_secs(120)).await;
    let (_, counts) = oracle(records);
    assert_eq!(
        idem.outcome(topic, Outcome::Applied).await,
        counts[&Outcome::Applied],
        "every effect applied over the secured connection"
    );
    assert_eq!(
        dead_letters(topic).await.len(),
        1,
        "dead-lettered through the secured producer"
    );
    let log = idem.log.clone();
    idem.terminate().await;
    assert!(
        !std::fs::read_to_string(&log).unwrap().contains(secret),
        "the secret is in {}",
        log.display()
    );
}

/// Runs idem with `security`; it must exit by itself with an error that
/// contains every one of `expected` and not `secret`.
async fn refused_at_start(
    topic: &str,
    security: &[(&str, String)],
    expected: &[&str],
    secret: &str,
) {
    let mut opts = IdemOpts::new(topic, &unique("refused"), topic);
    for (k, v) in security {
        opts = opts.with(k, v);
    }
    let idem = Idem::spawn(&opts);
    let log = idem.log.clone();
    let status = idem.wait_exit(Duration::from_secs(60)).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "idem must fail, not run; log:\n{logged}");
    for want in expected {
        assert!(
            logged.contains(want),
            "the error names {want:?}; log:\n{logged}"
        );
    }
    assert!(
        !logged.contains(secret),
        "the secret is in the log:\n{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_ssl_scram_and_plain_consume_and_a_wrong_password_fails_clearly() {
    let ca = kafka_tls_file("ca.crt");
    for (mechanism, user, password) in [
        ("SCRAM-SHA-512", "idem-scram", "idem-scram-secret"),
        ("PLAIN", "idem-plain", "idem-plain-secret"),
    ] {
        let (topic, records) = secured_topic("sasl", 200).await;
        let password_file =
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{topic}.pw"));
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let security = [
            ("IDEM__KAFKA__BROKERS", sasl_ssl_brokers()),
            ("IDEM__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("IDEM__KAFKA__SASL_MECHANISM", mechanism.into()),
            ("IDEM__KAFKA__SASL_USERNAME", user.into()),
            (
                "IDEM__KAFKA__SASL_PASSWORD_FILE",
                password_file.to_str().unwrap().into(),
            ),
            ("IDEM__KAFKA__SSL_CA_LOCATION", ca.clone()),
        ];
        consumes_over(&topic, &records, &security, password).await;

        let wrong = "not-the-kafka-password-5150";
        let mut refused = security.to_vec();
        refused.retain(|(k, _)| *k != "IDEM__KAFKA__SASL_PASSWORD_FILE");
        refused.push(("IDEM__KAFKA__SASL_PASSWORD", wrong.into()));
        refused_at_start(
            &topic,
            &refused,
            &[
                "Kafka refused idem's SASL credentials",
                "kafka.sasl_password",
                mechanism,
            ],
            wrong,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_mutual_tls_consumes_and_a_missing_certificate_or_wrong_ca_fails_clearly() {
    let (topic, records) = secured_topic("mtls", 200).await;
    let security = [
        ("IDEM__KAFKA__BROKERS", mtls_brokers()),
        ("IDEM__KAFKA__SECURITY_PROTOCOL", "ssl".into()),
        ("IDEM__KAFKA__SSL_CA_LOCATION", kafka_tls_file("ca.crt")),
        (
            "IDEM__KAFKA__SSL_CERTIFICATE_LOCATION",
            kafka_tls_file("client.crt"),
        ),
        (
            "IDEM__KAFKA__SSL_KEY_LOCATION",
            kafka_tls_file("client.key"),
        ),
    ];
    consumes_over(&topic, &records, &security, "PRIVATE KEY").await;

    // The same client key, encrypted: its password comes from a file.
    let (topic2, records2) = secured_topic("mtls-encrypted", 100).await;
    let key_password = "idem-client-key-secret";
    let password_file =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{topic2}.keypw"));
    std::fs::write(&password_file, format!("{key_password}\n")).unwrap();
    let mut encrypted = security.to_vec();
    encrypted.retain(|(k, _)| *k != "IDEM__KAFKA__SSL_KEY_LOCATION");
    encrypted.push((
        "IDEM__KAFKA__SSL_KEY_LOCATION",
        kafka_tls_file("client-encrypted.key"),
    ));
    encrypted.push((
        "IDEM__KAFKA__SSL_KEY_PASSWORD_FILE",
        password_file.to_str().unwrap().into(),
    ));
    consumes_over(&topic2, &records2, &encrypted, key_password).await;
    let mut wrong_key_password = encrypted.clone();
    wrong_key_password.retain(|(k, _)| *k != "IDEM__KAFKA__SSL_KEY_PASSWORD_FILE");
    wrong_key_password.push((
        "IDEM__KAFKA__SSL_KEY_PASSWORD",
        "not-the-key-password".into(),
    ));
    refused_at_start(
        &topic2,
        &wrong_key_password,
        &["could not load the TLS files", "kafka.ssl_key_password"],
        "not-the-key-password",
    )
    .await;

    // No client certificate: the broker refuses the connection.
    let mut no_cert = security.to_vec();
    no_cert.retain(|(k, _)| {
        !k.starts_with("IDEM__KAFKA__SSL_CERTIFICATE") && !k.starts_with("IDEM__KAFKA__SSL_KEY")
    });
    refused_at_start(
        &topic,
        &no_cert,
        &[
            "TLS handshake with the Kafka brokers failed",
            "kafka.ssl_certificate_location",
        ],
        "PRIVATE KEY",
    )
    .await;

    // A CA that did not sign the broker's certificate: the handshake fails.
    let mut wrong_ca = security.to_vec();
    wrong_ca.retain(|(k, _)| *k != "IDEM__KAFKA__SSL_CA_LOCATION");
    wrong_ca.push(("IDEM__KAFKA__SSL_CA_LOCATION", kafka_tls_file("client.crt")));
    refused_at_start(
        &topic,
        &wrong_ca,
        &[
            "TLS handshake with the Kafka brokers failed",
            "kafka.ssl_ca_location",
        ],
        "PRIVATE KEY",
    )
    .await;
}
