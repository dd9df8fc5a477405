//! Secrets: passwords come from files or the environment and never appear in
//! logs, errors, `--help` or metrics; a wrong password fails clearly.

mod common;

use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::sample::{generate, SampleSpec};

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
    assert!(c.metrics_listen.ip().is_loopback());
}

/// Runs idem with `opts`, its password (given by `key`) replaced by `wrong`,
/// until it reports that Redis refused it; returns its log.
async fn log_of_refused_run(opts: &IdemOpts, key: &str, wrong: &str) -> String {
    let mut wrong_opts = opts.clone();
    wrong_opts.env.retain(|(k, _)| k != key);
    wrong_opts
        .env
        .push(("IDEM__REDIS__PASSWORD".into(), wrong.into()));
    let idem = Idem::spawn(&wrong_opts);
    let log = idem.log.clone();
    wait_until(
        "idem reports the refused authentication",
        Duration::from_secs(30),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("cannot reach Redis")
            }
        },
    )
    .await;
    idem.kill();
    std::fs::read_to_string(&log).unwrap()
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with openssl.
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
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_over_tls_authenticates_and_a_wrong_password_fails() {
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
        .args(["--tls-auth-clients", "no"])
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
        .with("IDEM__REDIS__USERNAME", "idem")
        .with("IDEM__REDIS__PASSWORD", PASSWORD);
    opts.redis_url = format!("rediss://127.0.0.1:{port}");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, Duration::from_secs(120)).await;
    assert!(
        idem.outcome(&topic, Outcome::Applied).await > 0,
        "applied over TLS as the ACL user"
    );
    let log = idem.log.clone();
    idem.terminate().await;
    assert!(!std::fs::read_to_string(&log).unwrap().contains(PASSWORD));

    let logged = log_of_refused_run(&opts, "IDEM__REDIS__PASSWORD", "wrong-password-77").await;
    assert!(!logged.contains("wrong-password-77"));
    let _ = redis.kill();
    let _ = redis.wait();
}
