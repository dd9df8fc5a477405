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
    let redis = PrivateRedis::start_with_password(Some(PASSWORD)).await;
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
    let mut wrong = opts.clone();
    wrong.env.retain(|(k, _)| k != "IDEM__REDIS__PASSWORD_FILE");
    wrong.env.push((
        "IDEM__REDIS__PASSWORD".into(),
        "not-the-password-4242".into(),
    ));
    let idem = Idem::spawn(&wrong);
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
    let logged = std::fs::read_to_string(&log).unwrap();
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
