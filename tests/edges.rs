//! Nothing lost at the edges: exact numbers, records of every size, keys
//! that are not the entity, duplicate JSON keys, Redis settings that would
//! lose idem's keys, refused credentials, retried batches counted right,
//! and commands that end quietly on a closed pipe.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::tools::topics::{self, TopicSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CATCH_UP: Duration = Duration::from_secs(120);

fn idem_cli(args: &[&str], prefix: &str) -> Output {
    idem_tool(args, prefix, &[])
}

fn record(id: &str, entity: &str, seq: u64, data: &str) -> Vec<u8> {
    format!(r#"{{"id":"{id}","entity":"{entity}","seq":{seq},"data":{data}}}"#).into_bytes()
}

/// Number texts that a binary float changes, through Kafka, idem and
/// Redis, compared byte for byte; then the same records again: every one a
/// duplicate (the fingerprint did not move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_are_stored_exactly_as_the_producer_wrote_them() {
    let topic = unique("numbers");
    create_topic(&topic, 1).await;
    let table = [
        "0.42456890886584453",
        "123456789012345678901234567890",
        "12.345678901234567890",
        "1e2",
        "1E+2",
        "-0",
        "-0.0",
        "0.1",
        "100.10",
        "9007199254740993",
        "-18446744073709551617",
        "1.7976931348623157e308",
        "5e-324",
    ];
    let mut values = Vec::new();
    for (i, n) in table.iter().enumerate() {
        let data = format!(r#"{{"n":{n},"nested":{{"b":[{n}],"a":{n}}},"s":"x"}}"#);
        values.push((
            format!("num-{i}"),
            record(&format!("id-{i}"), &format!("num-{i}"), 1, &data),
        ));
    }
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|(k, v)| (Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;

    let entities: Vec<String> = values.iter().map(|(k, _)| k.clone()).collect();
    let views = read_entities(&redis_url(), &topic, entities.iter()).await;
    for (i, n) in table.iter().enumerate() {
        let state = &views[&format!("num-{i}")].state;
        assert_eq!(state["n"], *n, "number {n}");
        assert_eq!(
            state["nested"],
            format!(r#"{{"a":{n},"b":[{n}]}}"#),
            "nested {n}"
        );
        assert_eq!(state["s"], "x");
    }

    produce_raw(&topic, &raw).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Duplicate).await,
        table.len() as u64
    );
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        table.len() as u64
    );
    idem.terminate().await;
}

/// An invalid record just under `event.max_bytes` (above librdkafka's
/// default 1,000,000-byte producer limit) is dead-lettered whole; one over
/// the dead-letter topic's limit goes there as a reference. Neither blocks
/// the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_of_any_readable_size_are_dead_lettered() {
    let topic = unique("huge");
    let mut spec = TopicSpec::new(&topic, 1);
    spec.configs
        .insert("max.message.bytes".into(), "3000000".into());
    // The dead-letter topic keeps Kafka's default limit (1,048,588 bytes).
    spec.dead_letter = Some(format!("{topic}.dlq"));
    let mut specs = spec.with_companions();
    specs[1].configs.clear();
    topics::apply(&kafka(), &specs, true).await.unwrap();

    let mut almost = b"{\"not json".to_vec();
    almost.resize(1_040_000, b'x');
    let mut over = b"{\"also not json".to_vec();
    over.resize(2_000_000, b'y');
    // Within the producer's limit (event.max_bytes + 256 KiB) but above the
    // dead-letter topic's: the broker refuses it, then it goes as a reference.
    let mut broker_refuses = b"{\"still not json".to_vec();
    broker_refuses.resize(1_200_000, b'z');
    let good = record("g1", "e1", 1, r#"{"ok":"yes"}"#);
    let raw: Vec<RawRecord<'_>> = vec![
        (Some(b"k1"), Some(&almost)),
        (Some(b"k2"), Some(&over)),
        (Some(b"k3"), Some(&broker_refuses)),
        (Some(b"e1"), Some(&good)),
    ];
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;

    let letters = dead_letters(&topic).await;
    assert_eq!(letters.len(), 3, "each bad record dead-lettered once");
    assert_eq!(letters[0].reason(), "not_json");
    assert_eq!(
        letters[0].value.as_deref(),
        Some(almost.as_slice()),
        "kept whole"
    );
    assert_eq!(letters[0].header("idem.form"), None);
    assert_eq!(letters[1].reason(), "too_large");
    assert_eq!(letters[1].header("idem.form"), Some("reference"));
    assert_eq!(letters[1].header("idem.original.size"), Some("2000000"));
    assert_eq!(letters[1].header("idem.original.offset"), Some("1"));
    assert!(letters[1]
        .header("idem.original.digest")
        .is_some_and(|d| d.starts_with("fnv1a64:")));
    assert_eq!(
        letters[1].value.as_deref(),
        Some(&over[..idem::dlq::REFERENCE_PREFIX_BYTES])
    );
    assert_eq!(letters[1].key.as_deref(), Some(&b"k2"[..]));
    assert_eq!(letters[2].header("idem.form"), Some("reference"));
    assert_eq!(letters[2].header("idem.original.size"), Some("1200000"));
    assert_eq!(letters[2].header("idem.original.offset"), Some("2"));
    let views = read_entities(&redis_url(), &topic, [String::from("e1")].iter()).await;
    assert_eq!(views["e1"].state["ok"], "yes");
    let log = std::fs::read_to_string(&idem.log).unwrap();
    assert!(
        log.contains("accepts records up to 1048588 bytes"),
        "the start-up warning about the dead-letter topic's limit: {log}"
    );
    idem.terminate().await;
}

/// Records keyed by something else than their entity are counted; with
/// `event.key_mismatch = "dead_letter"` they are dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_not_keyed_by_their_entity_are_counted_or_dead_lettered() {
    for dead_letter in [false, true] {
        let topic = unique("keys");
        create_topic(&topic, 2).await;
        let ok = record("a", "acct:1", 1, r#"{"x":1}"#);
        let other_key = record("b", "acct:2", 1, r#"{"x":2}"#);
        let no_key = record("c", "acct:3", 1, r#"{"x":3}"#);
        let raw: Vec<RawRecord<'_>> = vec![
            (Some(b"acct:1"), Some(&ok)),
            (Some(b"user-7"), Some(&other_key)),
            (None, Some(&no_key)),
        ];
        produce_raw(&topic, &raw).await;
        let mut opts = IdemOpts::new(&topic, &topic, &topic);
        if dead_letter {
            opts = opts.with("IDEM__EVENT__KEY_MISMATCH", "dead_letter");
        }
        let idem = Idem::spawn(&opts);
        wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
        assert_eq!(
            idem.counter("idem_key_mismatch_total", &[("topic", &topic)])
                .await,
            Some(2)
        );
        let letters = dead_letters(&topic).await;
        let applied = idem.outcome(&topic, Outcome::Applied).await;
        if dead_letter {
            assert_eq!(applied, 1);
            assert_eq!(letters.len(), 2);
            assert!(letters.iter().all(|l| l.reason() == "key_mismatch"));
        } else {
            assert_eq!(applied, 3);
            assert!(letters.is_empty());
        }
        idem.terminate().await;
    }
}

/// `event.duplicate_keys = "reject"` dead-letters `{"amount":1,"amount":100}`;
/// the default keeps the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_keys_win_last_or_are_rejected() {
    for reject in [false, true] {
        let topic = unique("dupkeys");
        create_topic(&topic, 1).await;
        let twice = record("a", "acct:1", 1, r#"{"amount":1,"amount":100}"#);
        produce_raw(&topic, &[(Some(b"acct:1"), Some(&twice))]).await;
        let mut opts = IdemOpts::new(&topic, &topic, &topic);
        if reject {
            opts = opts.with("IDEM__EVENT__DUPLICATE_KEYS", "reject");
        }
        let idem = Idem::spawn(&opts);
        wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
        let letters = dead_letters(&topic).await;
        let views = read_entities(&redis_url(), &topic, [String::from("acct:1")].iter()).await;
        if reject {
            assert_eq!(letters.len(), 1);
            assert_eq!(letters[0].reason(), "duplicate_key");
            assert!(!views["acct:1"].exists);
        } else {
            assert!(letters.is_empty());
            assert_eq!(views["acct:1"].state["amount"], "100");
        }
        idem.terminate().await;
    }
}

/// A Redis that may evict idem's keys is refused at start, unless the
/// operator opts in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_refused_unless_allowed() {
    let redis = private_redis(None).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let topic = unique("evict");
    create_topic(&topic, 1).await;
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = redis.url();
    let idem = Idem::spawn(&opts);
    let log = idem.log.clone();
    let status = idem.wait_exit(CATCH_UP).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{logged}");
    assert!(
        logged.contains("maxmemory-policy volatile-lru") && logged.contains("noeviction"),
        "{logged}"
    );

    let allowed = Idem::spawn(&opts.clone().with("IDEM__REDIS__ALLOW_EVICTION", "true"));
    wait_until("idem runs when eviction is allowed", CATCH_UP, || async {
        http_get(allowed.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    allowed.terminate().await;
}

/// A TCP proxy in front of Redis that, when armed, forwards the next guard
/// call (EVALSHA) and cuts the connection once Redis has run it, so its
/// reply is lost: a fault a real server does not produce on demand.
async fn reply_dropping_proxy(upstream: u16) -> (u16, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let armed = Arc::new(AtomicBool::new(false));
    let arm = armed.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let armed = arm.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut from_client, mut from_server) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
                loop {
                    tokio::select! {
                        n = client.read(&mut from_client) => {
                            let Ok(n @ 1..) = n else { return };
                            let chunk = &from_client[..n];
                            let is_guard = chunk.windows(7).any(|w| w == b"EVALSHA");
                            if server.write_all(chunk).await.is_err() {
                                return;
                            }
                            if is_guard && armed.swap(false, Ordering::SeqCst) {
                                // Wait until Redis answers (it ran the call), then drop the answer.
                                let _ = server.read(&mut from_server).await;
                                return;
                            }
                        }
                        n = server.read(&mut from_server) => {
                            let Ok(n @ 1..) = n else { return };
                            if client.write_all(&from_server[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, armed)
}

/// A batch whose first attempt was applied but whose reply was lost is
/// retried; its events come back `duplicate` but were applied by this batch,
/// and are counted `applied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_counts_what_its_lost_attempt_decided() {
    let redis = private_redis(None).await;
    let (proxy_port, armed) = reply_dropping_proxy(redis.port).await;
    let topic = unique("lostreply");
    create_topic(&topic, 1).await;
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = format!("redis://127.0.0.1:{proxy_port}");
    let idem = Idem::spawn(&opts);
    wait_until("idem is ready", CATCH_UP, || async {
        http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    // An entity at seq 5 before the fault: its seq-3 event in the lost
    // attempt is stale.
    let ahead = record("ahead-5", "acct:stale", 5, r#"{"x":"5"}"#);
    produce_raw(&topic, &[(Some(b"acct:stale"), Some(&ahead))]).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    armed.store(true, Ordering::SeqCst);
    let behind = record("behind-3", "acct:stale", 3, r#"{"x":"3"}"#);
    let values: Vec<(String, Vec<u8>)> = std::iter::once(("acct:stale".to_string(), behind))
        .chain((0..50).map(|i| {
            let entity = format!("acct:{i}");
            let v = record(&format!("id-{i}"), &entity, 1, r#"{"x":"1"}"#);
            (entity, v)
        }))
        .collect();
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|(k, v)| (Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert!(!armed.load(Ordering::SeqCst), "the proxy dropped a reply");
    let retries = idem.counter("idem_retries_total", &[]).await.unwrap_or(0);
    assert!(retries >= 1, "the batch was retried");
    let views = read_entities(&redis.url(), &topic, values.iter().map(|(k, _)| k)).await;
    let applied_in_redis: u64 = views.values().map(|v| v.applied).sum();
    assert_eq!(
        applied_in_redis, 51,
        "each event applied once (50 + the one before)"
    );
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 51);
    assert_eq!(idem.outcome(&topic, Outcome::Stale).await, 1);
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 0);
    idem.terminate().await;
}

/// `idem … | head` ends quietly: exit 0, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_a_command_quietly() {
    let topic = unique("pipe");
    create_topic(&topic, 1).await;
    let dlq = format!("{topic}.dlq");
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["dlq", "inspect", "--topic", &dlq])
        .env("IDEM__KAFKA__BROKERS", brokers())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the first line, as `head` does after its last.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// `idem replay` refuses a move forward (it would skip records) unless
/// `--allow-skip`; a dry run exits 0 while the group is active and says
/// that `--execute` would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_skips_records_unless_asked() {
    let topic = unique("skip");
    create_topic(&topic, 1).await;
    let values: Vec<Vec<u8>> = (0..200)
        .map(|i| record(&format!("id-{i}"), "e", i + 1, r#"{"x":"1"}"#))
        .collect();
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|v| (Some(&b"e"[..]), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    // The group has committed offset 0: nothing applied yet.
    let group = topic.clone();
    commit_offset(&group, &topic, 0).await;

    let plan = [
        "replay",
        "--topic",
        &topic,
        "--group",
        &group,
        "--to-offset",
        "0:100",
    ];
    let out = idem_cli(&[&plan[..], &["--execute"]].concat(), &topic);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("would skip 100 records"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("100 records will be SKIPPED"));
    assert_eq!(committed(&group, &topic, 1).await, vec![0], "nothing moved");

    let out = idem_cli(&plan, &topic);
    assert_eq!(out.status.code(), Some(0), "the dry run's plan is valid");

    let out = idem_cli(
        &[&plan[..], &["--execute", "--allow-skip"]].concat(),
        &topic,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(committed(&group, &topic, 1).await, vec![100]);

    // An active group: the dry run exits 0 and says --execute would refuse.
    let idem = Idem::spawn(&IdemOpts::new(&topic, &group, &topic));
    wait_caught_up(&group, &topic, 1, CATCH_UP).await;
    let out = idem_cli(
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &group,
            "--to-earliest",
        ],
        &topic,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("--execute would refuse") && stderr.contains("active member"),
        "{stderr}"
    );
    idem.terminate().await;
}

/// Commits `offset` on partition 0 of `topic` for `group`.
async fn commit_offset(group: &str, topic: &str, offset: i64) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let (group, topic) = (group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(offset))
            .unwrap();
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
}

/// reconcile on an entity whose events span partitions: the same verdict
/// every run (exit 0, reported as spans_partitions), nothing repaired unless
/// asked; with --repair-spanning, the state of its events in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_is_deterministic_for_entities_spanning_partitions() {
    let topic = unique("spanning");
    create_topic(&topic, 6).await;
    // 30 events of one entity over 6 partitions, each setting its own field
    // (f0..f29) plus "last": the merge of all of them has 31 fields.
    let values: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            let data = format!(r#"{{"f{i}":"{i}","last":"{i}"}}"#);
            (
                format!("key-{}", i % 6),
                record(&format!("id-{i}"), "wide", i + 1, &data),
            )
        })
        .collect();
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|(k, v)| (Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 6, CATCH_UP).await;
    idem.terminate().await;
    let before = read_entities(&redis_url(), &topic, [String::from("wide")].iter()).await;

    let run = |extra: &[&str]| reconcile_report(&topic, extra, &[]);
    for _ in 0..3 {
        let (code, json) = run(&["--repair"]);
        assert_eq!(code, Some(0), "{json}");
        assert_eq!(json["divergences"][0]["kind"], "spans_partitions", "{json}");
        assert_eq!(json["divergences"][0]["repaired"], false);
    }
    let after = read_entities(&redis_url(), &topic, [String::from("wide")].iter()).await;
    assert_eq!(
        after["wide"].state, before["wide"].state,
        "--repair left it alone"
    );

    run(&["--repair", "--repair-spanning"]);
    let repaired = read_entities(&redis_url(), &topic, [String::from("wide")].iter()).await;
    let want: BTreeMap<String, String> = (0..30)
        .map(|i| (format!("f{i}"), i.to_string()))
        .chain([("last".to_string(), "29".to_string())])
        .collect();
    assert_eq!(
        repaired["wide"].state, want,
        "seq order: every field, the newest last"
    );
    assert_eq!(repaired["wide"].seq, Some(30));
}

/// An id reused after the dedupe window is decided by its seq again, as the
/// guard does: reconcile models the window and does not call it seq_ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_models_the_dedupe_window() {
    let topic = unique("window");
    create_topic(&topic, 1).await;
    let window = Duration::from_secs(1);
    let opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__DEDUPE__WINDOW", "1s");
    let first = record("reused", "w", 1, r#"{"v":"1"}"#);
    produce_raw(&topic, &[(Some(b"w"), Some(&first))]).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    wait_ids_expired(&topic).await;
    // Not synchronisation: the reuse must come more than two windows after
    // the first record (by their timestamps), where Redis has surely forgotten.
    tokio::time::sleep(2 * window).await;
    let again = record("reused", "w", 2, r#"{"v":"2"}"#);
    produce_raw(&topic, &[(Some(b"w"), Some(&again))]).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;
    let views = read_entities(&redis_url(), &topic, [String::from("w")].iter()).await;
    assert_eq!(views["w"].seq, Some(2), "the guard applied the reuse");

    let reconcile =
        |window: &str| reconcile_report(&topic, &[], &[("IDEM__DEDUPE__WINDOW", window)]);
    // With the window the guard used, the verdict is clean. With a 24 h
    // window the model still remembers the id, the reuse is a conflict
    // there, and Redis looks ahead.
    let (code, json) = reconcile("1s");
    assert_eq!(code, Some(0), "{json}");
    let (code, json) = reconcile("24h");
    assert_eq!(code, Some(1), "{json}");
    assert!(json.to_string().contains("seq_ahead"), "{json}");
}
