//! Running as a consumer group: rebalance storms, clean handover, backpressure,
//! topics as code and the docker-compose file.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use idem::event::{decode, FieldMap};
use idem::model::Outcome;
use idem::tools::sample::{Rng, SampleRecord};

const CATCH_UP: Duration = Duration::from_secs(180);

/// Where each produced record landed, and the (entity, seq) it carries.
type Positions = HashMap<(i32, i64), (String, u64)>;

fn remember_positions(
    positions: &mut Positions,
    records: &[SampleRecord],
    delivered: &[(i32, i64)],
) {
    for (r, pos) in records.iter().zip(delivered) {
        let e = decode(Some(&r.value), &FieldMap::default(), 1 << 20).unwrap();
        positions.insert(*pos, (e.entity, e.seq));
    }
}

/// With every idem process frozen, no committed offset may be ahead of an
/// effect: every record below a partition's committed offset must have its
/// entity's recorded seq at or above the record's seq.
async fn assert_commits_behind_effects(
    group: &str,
    topic: &str,
    partitions: i32,
    positions: &Positions,
) -> usize {
    // Let commit requests sent just before the freeze land, then read until stable.
    let mut committed_now = committed(group, topic, partitions).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = committed(group, topic, partitions).await;
        if again == committed_now {
            break;
        }
        committed_now = again;
    }
    let entities: Vec<String> = {
        let mut v: Vec<String> = positions.values().map(|(e, _)| e.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let views = read_entities(&redis_url(), topic, entities.iter()).await;
    let mut checked = 0;
    for ((p, offset), (entity, seq)) in positions {
        if *offset < committed_now[*p as usize] {
            let recorded = views[entity].seq.unwrap_or(0);
            assert!(
                recorded >= *seq,
                "partition {p} committed {} but the record at offset {offset} ({entity} seq {seq}) has no effect (recorded seq {recorded})",
                committed_now[*p as usize]
            );
            checked += 1;
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_storm_keeps_every_invariant() {
    rebalance_storm("classic").await;
}

/// The storm under Kafka 4's consumer group protocol (KIP-848), at the
/// same session timeout (the local broker's group.consumer.* settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_storm_keeps_every_invariant_under_the_consumer_protocol() {
    rebalance_storm("consumer").await;
}

/// At least this many leaves of each kind, SIGTERM then SIGKILL.
const STORM_LEAVES: u32 = 5;

async fn rebalance_storm(protocol: &str) {
    let topic = unique(&format!("storm-{protocol}"));
    let partitions = 12;
    create_topic(&topic, partitions).await;
    let records = unique_stream(&topic, 60_000, 600, 77);
    let (model, _) = oracle(&records);
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__KAFKA__SESSION_TIMEOUT", "6s")
        .with("IDEM__KAFKA__GROUP_PROTOCOL", protocol);

    // A continuous stream over the whole storm.
    let positions = std::sync::Arc::new(std::sync::Mutex::new(Positions::new()));
    let producing = {
        let (topic, records, positions) = (topic.clone(), records.clone(), positions.clone());
        tokio::spawn(async move {
            for slice in records.chunks(records.len() / 60 + 1) {
                let delivered = produce(&topic, slice).await;
                remember_positions(&mut positions.lock().unwrap(), slice, &delivered);
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        })
    };
    let mut checked = 0;

    let mut members: Vec<Idem> = (0..3).map(|_| Idem::spawn(&opts)).collect();
    let mut rng = Rng::new(0x5707);
    let started = Instant::now();
    // Two halves, so that each kind of leave owns the redeliveries it causes:
    // first only SIGTERM leaves, then only SIGKILL leaves.
    let mut dead_duplicates = 0u64;
    let mut leaves: HashMap<&str, u32> = HashMap::new();
    let mut duplicates_after: HashMap<&str, u64> = HashMap::new();
    let mut before = 0u64;
    for kind in ["sigterm", "sigkill"] {
        let half = Instant::now();
        // A half lasts 33 s and holds STORM_LEAVES leaves, however slow a
        // SIGTERM leave is on a loaded machine.
        while half.elapsed() < Duration::from_secs(33)
            || leaves.get(kind).copied().unwrap_or(0) < STORM_LEAVES
        {
            tokio::time::sleep(Duration::from_millis(2500 + rng.below(2500))).await;
            let leaving = members.remove(rng.below(members.len() as u64) as usize);
            dead_duplicates += leaving.outcome(&topic, Outcome::Duplicate).await;
            if kind == "sigterm" {
                leaving.terminate().await;
            } else {
                leaving.kill();
            }
            *leaves.entry(kind).or_default() += 1;
            members.push(Idem::spawn(&opts));
        }
        if kind == "sigkill" {
            // Let the last killed member's partitions move and be redelivered.
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        let mut total = dead_duplicates;
        for m in &members {
            total += m.outcome(&topic, Outcome::Duplicate).await;
        }
        duplicates_after.insert(kind, total - before);
        before = total;
        // Freeze everyone mid-stream and check that no commit is ahead of its effect.
        for m in &members {
            m.stop_process();
        }
        let known = positions.lock().unwrap().clone();
        checked += assert_commits_behind_effects(&topic, &topic, partitions, &known).await;
        for m in &members {
            m.continue_process();
        }
    }
    let (terms, kills) = (leaves["sigterm"], leaves["sigkill"]);
    producing.await.unwrap();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    eprintln!(
        "storm ({protocol}): {:.0}s, {terms} SIGTERM and {kills} SIGKILL leaves, {} records; redelivered duplicates after SIGTERM leaves: {}, after SIGKILL leaves: {}; {checked} committed records checked against Redis while frozen",
        started.elapsed().as_secs_f64(),
        records.len(),
        duplicates_after["sigterm"],
        duplicates_after["sigkill"],
    );
    for m in members {
        m.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_without_redelivery() {
    sigterm_hand_over("classic").await;
}

/// The same hand-over with Kafka 4's consumer group protocol (KIP-848):
/// the broker assigns, and the revoke still drains and commits first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_without_redelivery_under_the_consumer_protocol() {
    sigterm_hand_over("consumer").await;
}

/// Three members share a stream; one leaves with SIGTERM while records
/// keep coming: nobody redelivers what it applied.
async fn sigterm_hand_over(protocol: &str) {
    let topic = unique(&format!("handover-{protocol}"));
    let partitions = 6;
    create_topic(&topic, partitions).await;
    let records = unique_stream(&topic, 12_000, 300, 88);
    let (model, _) = oracle(&records);
    let (first, rest) = records.split_at(4_000);
    produce(&topic, first).await;
    let opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__KAFKA__GROUP_PROTOCOL", protocol);
    let mut members: Vec<Idem> = (0..3).map(|_| Idem::spawn(&opts)).collect();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    wait_all_hold_partitions(&members, "before the hand-over").await;

    // Keep producing while one member leaves with SIGTERM.
    let producing = {
        let (topic, rest) = (topic.clone(), rest.to_vec());
        tokio::spawn(async move {
            for slice in rest.chunks(500) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let leaving = members.remove(0);
    let left_duplicates = leaving.outcome(&topic, Outcome::Duplicate).await;
    leaving.terminate().await;
    producing.await.unwrap();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;

    let mut survivors_duplicates = 0;
    for m in &members {
        survivors_duplicates += m.outcome(&topic, Outcome::Duplicate).await;
    }
    assert_eq!(left_duplicates, 0);
    assert_eq!(
        survivors_duplicates, 0,
        "the survivors redelivered events the stopped member had already applied"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    for m in members {
        m.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_pauses_fetching_with_flat_memory() {
    const RSS_BOUND: u64 = 100 * 1024 * 1024;
    let topic = unique("stall");
    create_topic(&topic, 4).await;
    let redis = private_redis(None).await;
    let records = unique_stream(&topic, 200_000, 2_000, 99);
    let (model, _) = oracle(&records);
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = redis.url();
    let idem = Idem::spawn(&opts);
    produce(&topic, &records[..1_000]).await;
    wait_until("idem applies the first records", CATCH_UP, || async {
        idem.outcome(&topic, Outcome::Applied).await > 0
    })
    .await;

    redis.pause();
    produce(&topic, &records[1_000..]).await;
    wait_until(
        "fetching paused while Redis is stalled",
        CATCH_UP,
        || async { idem.counter("idem_paused", &[]).await.unwrap_or(0) == 1 },
    )
    .await;
    let mut peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        peak = peak.max(idem.rss_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peak > 0 && peak < RSS_BOUND,
        "resident memory {peak} bytes while stalled with a 199,000-record backlog"
    );

    redis.resume();
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_eq!(idem.counter("idem_paused", &[]).await, Some(0));
    assert_matches_oracle(&redis.url(), &topic, &model).await;
    eprintln!(
        "backpressure: peak RSS {:.1} MB while Redis was stalled",
        peak as f64 / 1e6
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_is_idempotent_and_check_detects_drift() {
    let topic = unique("declared");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("topics"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("t.toml"),
        format!("[[topic]]\nname = \"{topic}\"\npartitions = 2\nretention = \"1d\"\ndead_letter = \"{topic}.dlq\"\n"),
    )
    .unwrap();
    let idem = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .env("IDEM__KAFKA__BROKERS", brokers())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = idem(&["topics", "apply"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("+ {topic}: create"))
            && out.contains(&format!("+ {topic}.dlq: create")),
        "{out}"
    );
    let (code, out) = idem(&["topics", "apply"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("= {topic}: up to date")), "{out}");
    let (code, out) = idem(&["topics", "check"]);
    assert_eq!(code, Some(0), "{out}");

    // Someone sets an undeclared setting by hand; then the declared
    // retention changes. The plan shows the change and changes nothing;
    // apply sets it and keeps the undeclared setting (a whole-config alter
    // would have reset it to the broker default).
    set_topic_configs(
        &topic,
        &[("retention.ms", "86400000"), ("segment.ms", "3600000")],
    )
    .await;
    std::fs::write(
        dir.join("t.toml"),
        format!("[[topic]]\nname = \"{topic}\"\npartitions = 2\nretention = \"2d\"\ndead_letter = \"{topic}.dlq\"\n"),
    )
    .unwrap();
    let (code, out) = idem(&["topics", "apply", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "~ {topic}: retention.ms \"86400000\" -> \"172800000\""
        )),
        "{out}"
    );
    assert_eq!(
        topic_config(&topic, "retention.ms").await,
        "86400000",
        "a dry run changed the topic"
    );
    let (code, out) = idem(&["topics", "check"]);
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = idem(&["topics", "apply"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(topic_config(&topic, "retention.ms").await, "172800000");
    assert_eq!(
        topic_config(&topic, "segment.ms").await,
        "3600000",
        "the undeclared setting survived"
    );
    let (code, out) = idem(&["topics", "check"]);
    assert_eq!(code, Some(0), "{out}");

    // Someone adds partitions by hand: check reports the drift, and apply
    // says plainly that it cannot shrink the topic.
    let mut spec = idem::tools::topics::TopicSpec::new(&topic, 4);
    spec.retention = Some("2d".into());
    idem::tools::topics::apply(&common::kafka(), &[spec], true)
        .await
        .unwrap();
    let (code, out) = idem(&["topics", "check"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("{topic}: 4 partitions, declared 2")),
        "{out}"
    );
    let (code, out) = idem(&["topics", "apply"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "! {topic}: has 4 partitions, declared 2: Kafka cannot remove partitions"
        )),
        "{out}"
    );
}

fn admin() -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    idem::kafka::base_config(&common::kafka()).create().unwrap()
}

/// Sets exactly `configs` on `topic` (Kafka's whole-config alter: every
/// other setting goes back to the broker default).
async fn set_topic_configs(topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (k, v) in configs {
        alter = alter.set(k, v);
    }
    for r in admin()
        .alter_configs([&alter], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

async fn topic_config(topic: &str, key: &str) -> String {
    use rdkafka::admin::{AdminOptions, ResourceSpecifier};
    let described = admin()
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    described
        .into_iter()
        .flatten()
        .find_map(|r| r.get(key)?.value.clone())
        .unwrap_or_default()
}

#[test]
fn docker_compose_uses_only_known_config_keys_and_ports() {
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    let mut env = HashMap::new();
    for line in compose.lines() {
        let line = line.trim();
        if let Some((k, v)) = line.split_once(':') {
            if k.starts_with("IDEM__") {
                env.insert(k.to_string(), v.trim().to_string());
            }
        }
    }
    assert!(
        env.len() >= 5,
        "compose sets idem's config through IDEM__ variables: {env:?}"
    );
    let config = idem::config::Config::load(None, &env)
        .expect("every IDEM__ key of docker-compose.yml is a valid config key");
    for service in [
        "kafka:",
        "redis:",
        "topics:",
        "idem:",
        "producer:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "service {service} missing"
        );
    }
    assert!(config.kafka.brokers.contains("kafka:9092"));
    assert!(
        compose.contains("PLAINTEXT://kafka:9092"),
        "the broker advertises the address idem uses"
    );
    assert!(
        compose.contains("EXTERNAL://127.0.0.1:9094")
            && compose.contains("\"127.0.0.1:9094:9094\""),
        "host tools reach the broker on 127.0.0.1:9094"
    );
    let prometheus = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/prometheus.yml"
    ))
    .unwrap();
    assert!(
        prometheus.contains(&format!("port: {}", config.metrics.listen.port())),
        "Prometheus scrapes idem's metrics port"
    );
    let topics = idem::tools::topics::load_dir(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topics"
    )))
    .unwrap();
    assert!(
        config
            .kafka
            .topics
            .iter()
            .all(|t| topics.iter().any(|s| &s.name == t)),
        "idem's topics are declared in topics/"
    );
}
