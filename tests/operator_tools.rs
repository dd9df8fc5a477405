//! The operator's tools and commits written by other Kafka clients, held to
//! the same promise as the data path: after any of them, a Redis that loses
//! its state is still noticed and repaired from the log, and a start that
//! cannot be tied to Redis is refused with both readings.
//!
//! "Redis loses its state" is every key of the test's prefix deleted (the
//! epoch markers, the records, the entities): what FLUSHALL does to one
//! deployment, without touching the other tests' keys on the shared Redis
//! or Redis Cluster.

mod common;

use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::tools::sample::{generate, SampleRecord, SampleSpec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

const CATCH_UP: Duration = Duration::from_secs(120);

fn stream(prefix: &str, events: usize, seed: u64) -> Vec<SampleRecord> {
    generate(&SampleSpec {
        events,
        entities: 30,
        duplicate_ratio: 0.1,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.0,
        data_bytes: 8,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    })
}

/// Deletes every key of `prefix` on every master: the deployment's Redis
/// lost its state (markers, records and entities).
async fn lose_state(prefix: &str) {
    let url = redis_url();
    let mut conn = redis_conn(&url).await;
    for key in conn.scan_keys(&format!("{prefix}:*")).await.unwrap() {
        let mut del = redis::cmd("DEL");
        del.arg(&key);
        let _: redis::Value = del.query_async(&mut conn).await.unwrap();
    }
}

/// The metadata of each partition's commit.
async fn commit_metadata(group: &str, topic: &str, partitions: i32) -> Vec<String> {
    let (group, topic) = (group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        committed
            .elements()
            .iter()
            .map(|e| e.metadata().to_string())
            .collect()
    })
    .await
    .unwrap()
}

/// Applies `records` with one idem, to lag 0, and stops it.
async fn applied_and_stopped(topic: &str, partitions: i32, records: &[SampleRecord]) {
    create_topic(topic, partitions).await;
    produce(topic, records).await;
    let idem = Idem::spawn(&IdemOpts::new(topic, topic, topic));
    wait_caught_up(topic, topic, partitions, CATCH_UP).await;
    idem.terminate().await;
}

/// Starts idem and waits until it holds every partition.
async fn started(topic: &str, when: &str) -> Idem {
    let idem = Idem::spawn(&IdemOpts::new(topic, topic, topic));
    wait_all_hold_partitions(std::slice::from_ref(&idem), when).await;
    idem
}

/// Loses Redis's state under a running `idem` and waits until every entity
/// of `records` is back; stops it. The process is paused while the keys go
/// (a cluster has a marker per slot: thousands of DELs), so that the loss
/// is one event to it, as a FLUSHALL is, and not a stream of deletions
/// racing its repair.
async fn a_loss_under_idem_is_repaired(idem: Idem, topic: &str, records: &[SampleRecord]) {
    idem.stop_process();
    lose_state(topic).await;
    idem.continue_process();
    let (model, _) = oracle(records);
    wait_matches_oracle(&redis_url(), topic, &model, CATCH_UP).await;
    let rewinds = idem
        .counter("idem_redis_rewinds_total", &[("cause", "lost")])
        .await
        .unwrap_or(0);
    assert!(rewinds >= 1, "the loss was repaired by a rewind: {rewinds}");
    idem.terminate().await;
}

/// The newcomer's case: a replay that moves nothing, then Redis loses its
/// state under the next run. Before the fix the replay rewrote every
/// commit without idem's metadata, and the loss was never repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_op_replay_then_a_loss_is_repaired() {
    let topic = unique("tools-noop-replay");
    let records = stream(&topic, 300, 81);
    applied_and_stopped(&topic, 3, &records).await;
    let before = commit_metadata(&topic, &topic, 3).await;

    let now = idem::pipeline::unix_millis().to_string();
    let (code, out, err) = tool(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &topic,
            "--to-timestamp",
            &now,
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 records will be read again"), "{out}");
    assert!(err.contains("nothing to move"), "{err}");
    assert_eq!(
        commit_metadata(&topic, &topic, 3).await,
        before,
        "a replay that moves nothing writes no commit"
    );
    let idem = started(&topic, "after the replay").await;
    a_loss_under_idem_is_repaired(idem, &topic, &records).await;
}

/// A forward skip with --allow-skip, then a loss: the skip is kept while
/// Redis keeps its state, and after the loss the rewind to the log's start
/// applies every record, the skipped ones included (docs/guarantees.md:
/// a skip is a decision about the state Redis held, lost with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_skip_then_a_loss_applies_the_skipped_records_too() {
    let topic = unique("tools-skip-loss");
    let first = stream(&format!("{topic}-a"), 200, 82);
    applied_and_stopped(&topic, 1, &first).await;
    let skipped = stream(&format!("{topic}-skipped"), 100, 83);
    produce(&topic, &skipped).await;
    let end = end_offsets(&topic, 1).await[0];
    let to = format!("0:{end}");
    let (code, _, err) = tool(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &topic,
            "--to-offset",
            &to,
            "--allow-skip",
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        commit_metadata(&topic, &topic, 1).await[0].starts_with("idem.v1 epoch="),
        "the skip is committed with idem's metadata"
    );
    let idem = started(&topic, "after the skip").await;
    assert_eq!(
        idem.counter("idem_rewound_records_total", &[]).await,
        Some(0),
        "the skip is not undone while Redis keeps its state"
    );
    let names: Vec<String> = oracle(&skipped).0.entities.keys().cloned().collect();
    for (name, view) in read_entities(&redis_url(), &topic, names.iter()).await {
        assert!(!view.exists, "{name} was skipped, yet applied");
    }
    let all: Vec<SampleRecord> = first.iter().chain(&skipped).cloned().collect();
    a_loss_under_idem_is_repaired(idem, &topic, &all).await;
}

/// A commit written by a plain Kafka client while the group is stopped is
/// taken as it is (Redis holds the state), tied to Redis's epoch at once,
/// and a loss right after is repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_clients_commit_is_tied_at_once_and_a_loss_after_it_repaired() {
    let topic = unique("tools-plain-commit");
    let records = stream(&topic, 300, 84);
    applied_and_stopped(&topic, 2, &records).await;
    commit_as_a_plain_client(&topic, &topic, &end_offsets(&topic, 2).await);
    assert_eq!(
        commit_metadata(&topic, &topic, 2).await,
        vec![String::new(), String::new()]
    );

    let idem = started(&topic, "after the plain commit").await;
    let (t, g) = (topic.clone(), topic.clone());
    wait_until(
        "the bootstrap is committed with idem's metadata",
        CATCH_UP,
        || {
            let (t, g) = (t.clone(), g.clone());
            async move {
                commit_metadata(&g, &t, 2)
                    .await
                    .iter()
                    .all(|m| m.starts_with("idem.v1 epoch="))
            }
        },
    )
    .await;
    a_loss_under_idem_is_repaired(idem, &topic, &records).await;
}

/// The ambiguous start: Redis holds nothing of idem's and the group's
/// commits were written by a plain client. Two instances started at once
/// both refuse (exit 2) with both readings; each reading then has its way:
/// `idem replay --to-earliest --execute` re-applies the log, and
/// `--accept-commits` starts at the commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_start_is_refused_alike_and_each_reading_has_its_way() {
    let topic = unique("tools-ambiguous");
    let records = stream(&topic, 300, 85);
    applied_and_stopped(&topic, 2, &records).await;
    let ends = end_offsets(&topic, 2).await;
    commit_as_a_plain_client(&topic, &topic, &ends);
    lose_state(&topic).await;

    let opts = IdemOpts::new(&topic, &topic, &topic);
    let (a, b) = (Idem::spawn(&opts), Idem::spawn(&opts));
    let (log_a, log_b) = (a.log.clone(), b.log.clone());
    for (idem, log) in [(a, log_a), (b, log_b)] {
        assert_eq!(idem.wait_exit(CATCH_UP).await.code(), Some(2), "refused");
        let log = std::fs::read_to_string(&log).unwrap();
        for wanted in [
            "--accept-commits",
            "idem replay",
            "--to-earliest",
            "two ways",
        ] {
            assert!(log.contains(wanted), "the refusal names {wanted:?}");
        }
    }
    let names: Vec<String> = oracle(&records).0.entities.keys().cloned().collect();
    for (name, view) in read_entities(&redis_url(), &topic, names.iter()).await {
        assert!(!view.exists, "{name}: nothing applied before the refusal");
    }

    // Reading 1: Redis is new and starts at the commits.
    let idem = Idem::spawn(&opts.clone().with("IDEM_ACCEPT_COMMITS", "true"));
    wait_all_hold_partitions(std::slice::from_ref(&idem), "accepting the commits").await;
    let later = stream(&format!("{topic}-later"), 60, 86);
    produce(&topic, &later).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        oracle(&later)
            .0
            .entities
            .values()
            .map(|e| e.applied)
            .sum::<u64>(),
        "only what came after the commits"
    );
    idem.terminate().await;

    // Reading 2: Redis lost its state; the log is applied again.
    lose_state(&topic).await;
    let (code, _, err) = tool(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &topic,
            "--to-earliest",
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    let all: Vec<SampleRecord> = records.iter().chain(&later).cloned().collect();
    wait_matches_oracle(&redis_url(), &topic, &oracle(&all).0, CATCH_UP).await;
    idem.terminate().await;
}

/// `idem <args>` with the test's prefix: (exit code, stdout, stderr).
fn tool(prefix: &str, args: &[&str]) -> (i32, String, String) {
    idem_tool_output(args, prefix)
}

/// Runs `idem <args>` with the test's prefix and `IDEM__KAFKA__TOPICS`.
fn tool_with_topics(prefix: &str, topics: &str, args: &[&str]) -> (i32, String, String) {
    let out = idem_tool(args, prefix, &[("IDEM__KAFKA__TOPICS", topics)]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether Redis still holds every entity of `records`.
async fn all_exist(prefix: &str, records: &[SampleRecord]) -> bool {
    let names: Vec<String> = oracle(records).0.entities.keys().cloned().collect();
    read_entities(&redis_url(), prefix, names.iter())
        .await
        .into_iter()
        .all(|(_, view)| view.exists)
}

/// Two topics write one key prefix (the layout config/example.toml ships).
/// A plain reconcile of that config reads both and finds nothing; one
/// narrowed to a topic neither reports nor deletes the other's entities,
/// and `--delete-extra` refuses while a topic that writes the prefix is
/// not read (named by kafka.topics, or by another deployment's members);
/// with every topic read it deletes only what no topic names. Before: every
/// entity of B was `entity_not_in_log`, and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reads_every_topic_that_writes_the_prefix() {
    let prefix = unique("tools-two-topics");
    let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let (on_a, on_b) = (stream(&a, 300, 87), stream(&b, 300, 88));
    create_topic(&a, 2).await;
    create_topic(&b, 1).await;
    produce(&a, &on_a).await;
    produce(&b, &on_b).await;
    let mut opts = IdemOpts::new(&a, &prefix, &prefix);
    opts.topics = vec![a.clone(), b.clone()];
    let idem = Idem::spawn(&opts);
    wait_caught_up(&prefix, &a, 2, CATCH_UP).await;
    wait_caught_up(&prefix, &b, 1, CATCH_UP).await;
    idem.terminate().await;
    let both = format!("{a},{b}");
    let report =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}.json"));
    let report = report.to_str().unwrap();

    let (code, out, err) = tool_with_topics(&prefix, &both, &["reconcile", "--report", report]);
    assert_eq!(code, 0, "a plain reconcile reads both topics: {out}{err}");
    assert!(out.contains(" 0 divergences"), "{out}");

    let (code, out, err) = tool_with_topics(
        &prefix,
        &both,
        &["reconcile", "--topic", &a, "--report", report],
    );
    assert_eq!(code, 0, "B's entities are not divergences: {out}{err}");
    assert!(err.contains("not judged"), "{err}");

    let (code, _, err) = tool_with_topics(
        &prefix,
        &both,
        &[
            "reconcile",
            "--topic",
            &a,
            "--repair",
            "--delete-extra",
            "--report",
            report,
        ],
    );
    assert_eq!(code, 2, "refused: {err}");
    assert!(
        err.contains("--repair refused") && err.contains(&b),
        "{err}"
    );
    assert!(
        all_exist(&prefix, &on_b).await,
        "B's entities are untouched"
    );

    // Another deployment on the prefix: named by the members registry.
    let other = IdemOpts::new(&b, &format!("{prefix}-other"), &prefix);
    let member = Idem::spawn(&other);
    wait_all_hold_partitions(std::slice::from_ref(&member), "holding B").await;
    let key = idem::store::KeyLayout::new(&prefix).members_key(&format!("{prefix}-other"));
    wait_until("the member registers B as held", CATCH_UP, || {
        let (key, b) = (key.clone(), b.clone());
        async move {
            let mut conn = redis_conn(&redis_url()).await;
            // Its partitions, not only its counts (which name B from start).
            idem::relay::members::registrations(&mut conn, &key)
                .await
                .unwrap()
                .values()
                .any(|r| r.owns.contains_key(&b))
        }
    })
    .await;
    let (code, _, err) = tool_with_topics(
        &prefix,
        &a,
        &[
            "reconcile",
            "--repair",
            "--delete-extra",
            "--report",
            report,
        ],
    );
    assert_eq!(code, 2, "refused: {err}");
    assert!(err.contains(&format!("group {prefix}-other")), "{err}");
    member.terminate().await;
    assert!(
        all_exist(&prefix, &on_b).await,
        "B's entities are untouched"
    );

    // Every topic read: only an entity no topic names is extra.
    let ghost = idem::store::KeyLayout::new(&prefix).meta_key("ghost");
    let mut conn = redis_conn(&redis_url()).await;
    let _: redis::Value = redis::cmd("HSET")
        .arg(&ghost)
        .arg("seq")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, out, err) = tool_with_topics(
        &prefix,
        &both,
        &[
            "reconcile",
            "--repair",
            "--delete-extra",
            "--report",
            report,
        ],
    );
    assert_eq!(code, 1, "the ghost was a divergence: {out}{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    let extras: Vec<&serde_json::Value> = json["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"] == "entity_not_in_log")
        .collect();
    assert_eq!(extras.len(), 1, "{json}");
    assert_eq!(extras[0]["entity"], "ghost");
    assert!(all_exist(&prefix, &on_a).await && all_exist(&prefix, &on_b).await);
}

/// Redis lost its state while idem was stopped, and the operator replays
/// before starting it: a move that would hide the loss (the next start
/// would take the new commits as tied to the new epoch) is refused, naming
/// what to do; a replay from the log's start is the loss accepted and the
/// log re-applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cannot_hide_a_loss_that_happened_while_idem_was_stopped() {
    let topic = unique("tools-hidden-loss");
    let records = stream(&topic, 300, 89);
    applied_and_stopped(&topic, 2, &records).await;
    lose_state(&topic).await;
    let group = ["--topic", topic.as_str(), "--group", topic.as_str()];
    let (code, _, err) = tool(
        &topic,
        &[&["replay"][..], &group, &["--shift-by", "-10", "--execute"]].concat(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("would hide it") && err.contains("--to-earliest"),
        "{err}"
    );
    let before = commit_metadata(&topic, &topic, 2).await;
    let (code, _, err) = tool(
        &topic,
        &[&["replay"][..], &group, &["--to-earliest", "--execute"]].concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert_ne!(commit_metadata(&topic, &topic, 2).await, before);
    let idem = started(&topic, "after the replay").await;
    let (model, _) = oracle(&records);
    wait_matches_oracle(&redis_url(), &topic, &model, CATCH_UP).await;
    idem.terminate().await;
}
