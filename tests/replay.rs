//! Replaying topics and reconciling Redis with the log.

mod common;

use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::store::KeyLayout;
use idem::tools::sample::{generate, SampleSpec};

const CATCH_UP: Duration = Duration::from_secs(120);

fn stream(
    prefix: &str,
    events: usize,
    dups: f64,
    seed: u64,
) -> Vec<idem::tools::sample::SampleRecord> {
    generate(&SampleSpec {
        events,
        entities: 50,
        duplicate_ratio: dups,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.02,
        data_bytes: 16,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    })
}

/// Runs the idem binary with `args` against the test services, with the
/// Redis keys under `prefix` (each test's own, named like its topic).
fn idem_cli(prefix: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("IDEM__KAFKA__BROKERS", brokers())
        .env("IDEM__REDIS__KEY_PREFIX", prefix)
        .envs(redis_env(&redis_url()))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `idem replay --execute` of `topic`'s group (named like the topic) to the
/// earliest offsets: (exit code, stdout, stderr).
fn replay_to_earliest(topic: &str) -> (i32, String, String) {
    idem_cli(
        topic,
        &[
            "replay",
            "--topic",
            topic,
            "--group",
            topic,
            "--to-earliest",
            "--execute",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_earliest_applies_nothing_and_catches_up() {
    let topic = unique("replay-earliest");
    create_topic(&topic, 3).await;
    let records = stream(&topic, 2_000, 0.2, 1);
    let (model, _) = oracle(&records);
    produce(&topic, &records).await;
    let opts = IdemOpts::new(&topic, &topic, &topic);
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;

    let (code, out, _) = idem_cli(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &topic,
            "--to-earliest",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{} records will be read again", records.len()))
            && out.contains(&format!("{} of them were decided before", records.len())),
        "{out}"
    );
    assert_eq!(
        committed(&topic, &topic, 3).await,
        end_offsets(&topic, 3).await,
        "a dry run changes nothing"
    );
    let (code, _, err) = replay_to_earliest(&topic);
    assert_eq!(code, 0, "{err}");
    assert_eq!(committed(&topic, &topic, 3).await, vec![0, 0, 0]);

    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 0);
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        records.len() as u64,
        "every record read again is recognised by its offset, and Redis's progress records \
         (written by the first run) did not move the operator's replay"
    );
    assert_eq!(
        idem.counter("idem_redis_rewinds_total", &[]).await,
        Some(0),
        "a commit written by replay is taken as it is"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    let (code, out, _) = idem_cli(&topic, &["inspect", "group", &topic, "--topic", &topic]);
    assert_eq!(code, 0);
    assert!(out.contains("total lag 0"), "{out}");
    idem.terminate().await;
}

/// A forward move with `--allow-skip` while Redis's progress records stop
/// before it: idem starts where the operator said, the skipped records are
/// never applied, and nothing is rewound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_forward_skips_what_the_operator_skipped_despite_progress_records() {
    let topic = unique("replay-skip");
    create_topic(&topic, 1).await;
    let first = stream(&format!("{topic}-a"), 300, 0.0, 11);
    produce(&topic, &first).await;
    let opts = IdemOpts::new(&topic, &topic, &topic);
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;

    let skipped = stream(&format!("{topic}-skipped"), 200, 0.0, 12);
    produce(&topic, &skipped).await;
    let end = end_offsets(&topic, 1).await[0];
    let (code, _, err) = idem_cli(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &topic,
            "--to-offset",
            &format!("0:{end}"),
            "--allow-skip",
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let last = stream(&format!("{topic}-c"), 100, 0.0, 13);
    produce(&topic, &last).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        oracle(&last)
            .0
            .entities
            .values()
            .map(|e| e.applied)
            .sum::<u64>(),
        "only the records after the skip are applied"
    );
    assert_eq!(
        idem.counter("idem_rewound_records_total", &[]).await,
        Some(0)
    );
    let skipped_entities: Vec<String> = oracle(&skipped).0.entities.keys().cloned().collect();
    for (name, view) in read_entities(&redis_url(), &topic, skipped_entities.iter()).await {
        assert!(
            !view.exists,
            "{name} was skipped by the operator, yet applied"
        );
    }
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;

    // The backfill: from earliest, the skipped records are applied once,
    // and what was decided before is not applied again.
    let (code, out, err) = replay_to_earliest(&topic);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "{} of them were decided before",
            first.len() + last.len()
        )),
        "{out}"
    );
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    let applied_of = |records: &[idem::tools::sample::SampleRecord]| -> u64 {
        oracle(records).0.entities.values().map(|e| e.applied).sum()
    };
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        applied_of(&skipped),
        "the skipped records, once"
    );
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        (first.len() + last.len()) as u64,
        "the rest, recognised"
    );
    let all: Vec<_> = first.iter().chain(&skipped).chain(&last).cloned().collect();
    assert_matches_oracle(&redis_url(), &topic, &oracle(&all).0).await;
    idem.terminate().await;
}

/// A new group that starts at `latest` passes over what the topic held;
/// a later backfill from earliest applies exactly those records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_after_starting_at_latest_applies_what_was_passed_over_once() {
    let topic = unique("replay-latest");
    create_topic(&topic, 1).await;
    let before = stream(&format!("{topic}-before"), 300, 0.2, 21);
    produce(&topic, &before).await;
    let opts =
        IdemOpts::new(&topic, &topic, &topic).with("IDEM__KAFKA__AUTO_OFFSET_RESET", "latest");
    let idem = Idem::spawn(&opts);
    // Where "latest" is becomes known once the consumer fetches: one record
    // at a time (each its own entity) until one is applied; those before it
    // were passed over too.
    let mut sentinels = Vec::new();
    loop {
        let n = sentinels.len();
        let record = stream(&format!("{topic}-sentinel-{n}"), 1, 0.0, 30 + n as u64);
        produce(&topic, &record).await;
        sentinels.extend(record);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(2)
            && idem.outcome(&topic, Outcome::Applied).await == 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if idem.outcome(&topic, Outcome::Applied).await > 0 {
            break;
        }
        assert!(sentinels.len() < 60, "idem applied no new record");
    }
    let after = stream(&format!("{topic}-after"), 300, 0.2, 22);
    produce(&topic, &after).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    let applied_of = |records: &[idem::tools::sample::SampleRecord]| -> u64 {
        oracle(records).0.entities.values().map(|e| e.applied).sum()
    };
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        1 + applied_of(&after),
        "only the last sentinel and what came after it"
    );
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;

    let (code, _, err) = replay_to_earliest(&topic);
    assert_eq!(code, 0, "{err}");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        applied_of(&before) + sentinels.len() as u64 - 1,
        "what was passed over, once"
    );
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        after.len() as u64 + 1
    );
    let all: Vec<_> = before
        .iter()
        .chain(&sentinels)
        .chain(&after)
        .cloned()
        .collect();
    assert_matches_oracle(&redis_url(), &topic, &oracle(&all).0).await;
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_window_is_all_replayed() {
    let topic = unique("replay-stale");
    create_topic(&topic, 2).await;
    let records = stream(&topic, 1_000, 0.0, 2);
    let (model, _) = oracle(&records);
    produce(&topic, &records).await;
    let opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__DEDUPE__WINDOW", "200ms");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;
    wait_ids_expired(&topic).await;

    let (code, _, err) = replay_to_earliest(&topic);
    assert_eq!(code, 0, "{err}");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 0);
    assert_eq!(idem.outcome(&topic, Outcome::Stale).await, 0);
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        records.len() as u64,
        "the ids are forgotten, the offsets are not"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_refused_while_a_member_runs() {
    let topic = unique("replay-busy");
    create_topic(&topic, 2).await;
    produce(&topic, &stream(&topic, 200, 0.0, 3)).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    let before = committed(&topic, &topic, 2).await;
    let (code, _, err) = replay_to_earliest(&topic);
    assert_eq!(code, 2, "a refused operation exits 2");
    assert!(
        err.contains("1 active member(s)") && err.contains("Stop every idem instance"),
        "{err}"
    );
    assert_eq!(
        committed(&topic, &topic, 2).await,
        before,
        "offsets untouched"
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_each_injected_divergence_and_repair_cleans_it() {
    let topic = unique("reconcile");
    create_topic(&topic, 2).await;
    let records = stream(&topic, 2_000, 0.1, 4);
    let (model, _) = oracle(&records);
    produce(&topic, &records).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    idem.terminate().await;

    let live: Vec<&String> = model
        .entities
        .iter()
        .filter(|(_, e)| !e.deleted && e.seq.unwrap_or(0) > 2 && !e.state.is_empty())
        .map(|(k, _)| k)
        .collect();
    let (missing, corrupted, lowered) = (live[0].clone(), live[1].clone(), live[2].clone());
    let layout = KeyLayout::new(&topic);
    let mut conn = redis_conn(&redis_url()).await;
    let extra = "not-in-the-log";
    // One command at a time: in a cluster these keys live in different slots.
    for cmd in [
        redis::cmd("DEL").arg(layout.state_key(&missing)).clone(),
        redis::cmd("DEL").arg(layout.meta_key(&missing)).clone(),
        redis::cmd("HSET")
            .arg(layout.state_key(&corrupted))
            .arg("f0")
            .arg("corrupted")
            .clone(),
        redis::cmd("HSET")
            .arg(layout.meta_key(&lowered))
            .arg("seq")
            .arg(1)
            .clone(),
        redis::cmd("HSET")
            .arg(layout.meta_key(extra))
            .arg("seq")
            .arg(3)
            .clone(),
        redis::cmd("HSET")
            .arg(layout.state_key(extra))
            .arg("x")
            .arg("1")
            .clone(),
    ] {
        let _: () = cmd.query_async(&mut conn).await.unwrap();
    }

    let run = |extra_args: &[&str]| reconcile_report(&topic, extra_args, &[]);
    let (code, json) = run(&[]);
    assert_eq!(code, Some(1), "divergence means a non-zero exit");
    let kinds: Vec<(String, String)> = json["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["entity"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want = vec![
        (missing.clone(), "missing_entity".to_string()),
        (corrupted.clone(), "state_differs".to_string()),
        (lowered.clone(), "seq_behind".to_string()),
        (extra.to_string(), "entity_not_in_log".to_string()),
    ];
    let mut got = kinds.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let entry = |json: &serde_json::Value, entity: &str| {
        json["divergences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["entity"] == entity)
            .unwrap()
            .clone()
    };
    // Field by field: what the log makes it, what Redis holds.
    let expected_f0 = model.entities[&corrupted].state.get("f0").cloned();
    assert_eq!(
        entry(&json, &corrupted)["fields"],
        serde_json::json!([{"field": "f0", "expected": expected_f0, "found": "corrupted"}])
    );
    assert_eq!(
        entry(&json, &corrupted)["not_repaired"],
        "not asked: run with --repair"
    );

    // Without --delete-extra, the entity not in the log stays, and says why.
    let (code, json) = run(&["--repair"]);
    assert_eq!(code, Some(1));
    for entity in [&missing, &corrupted, &lowered] {
        let d = entry(&json, entity);
        assert_eq!(d["repaired"], true, "{d}");
        assert!(d["not_repaired"].is_null(), "{d}");
    }
    let d = entry(&json, extra);
    assert_eq!(d["repaired"], false, "{d}");
    assert!(
        d["not_repaired"]
            .as_str()
            .unwrap()
            .contains("--delete-extra"),
        "{d}"
    );
    assert_eq!(
        d["fields"],
        serde_json::json!([{"field": "x", "expected": null, "found": "1"}])
    );

    let (code, _) = run(&["--repair", "--delete-extra"]);
    assert_eq!(
        code,
        Some(1),
        "the repairing run still reports what it found"
    );
    let (code, json) = run(&[]);
    assert_eq!(
        code,
        Some(0),
        "after --repair a second reconcile is clean: {json}"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
}

/// A topic deleted and created again under its name is another log: its
/// offsets restart at 0, under a new topic id, and its records are applied,
/// not taken for re-reads of the old log's offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_is_a_new_log_not_a_replay() {
    let topic = unique("recreated");
    create_topic(&topic, 1).await;
    let record = |id: &str, n: u64, seq: u64| {
        let entity = format!("{topic}:e{}", n % 20);
        let value =
            format!(r#"{{"id":"{id}","entity":"{entity}","seq":{seq},"data":{{"v":"{id}"}}}}"#);
        (entity, value)
    };
    let first: Vec<(String, String)> = (0..300)
        .map(|i| record(&format!("a{i}"), i, i + 1))
        .collect();
    let raw = |records: &[(String, String)]| -> Vec<(Vec<u8>, Vec<u8>)> {
        records
            .iter()
            .map(|(e, v)| (e.clone().into_bytes(), v.clone().into_bytes()))
            .collect()
    };
    produce_keyed(&topic, &raw(&first)).await;
    let opts = IdemOpts::new(&topic, &topic, &topic);
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;
    let old_id = topic_id(&topic).await;

    recreate_topic(&topic).await;
    assert_ne!(
        topic_id(&topic).await,
        old_id,
        "a new incarnation, a new id"
    );
    // Fewer records than before, at the old log's offsets, newer seqs.
    let second: Vec<(String, String)> = (0..100)
        .map(|i| record(&format!("b{i}"), i, 1_000 + i))
        .collect();
    produce_keyed(&topic, &raw(&second)).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Replayed).await, 0);
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 100);
    let entities: Vec<String> = (0..20).map(|n| format!("{topic}:e{n}")).collect();
    for (name, view) in read_entities(&redis_url(), &topic, entities.iter()).await {
        let last = second
            .iter()
            .rev()
            .find(|(e, _)| *e == name)
            .map(|(_, v)| v.clone())
            .unwrap();
        let want: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(view.seq, want["seq"].as_u64(), "{name}");
    }
    idem.terminate().await;
}

/// Produces (key, value) records and waits for Kafka's acknowledgement.
async fn produce_keyed(topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let refs: Vec<RawRecord<'_>> = records
        .iter()
        .map(|(k, v)| (Some(k.as_slice()), Some(v.as_slice())))
        .collect();
    produce_raw(topic, &refs).await;
}

/// A topic that grows from 2 to 4 partitions moves entities to other
/// partitions: marks are kept per partition, so an entity whose events now
/// span two partitions has a mark for each, and a replay of the whole topic
/// is recognised record by record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_partitions_keep_every_replay_recognised() {
    let topic = unique("replay-grown");
    create_topic(&topic, 2).await;
    let records = |seqs: std::ops::Range<u64>| -> Vec<(Vec<u8>, Vec<u8>)> {
        seqs.flat_map(|seq| {
            let topic = topic.clone();
            (0..20).map(move |n| {
                let entity = format!("{topic}:e{n}");
                let value = format!(
                    r#"{{"id":"{entity}-{seq}","entity":"{entity}","seq":{seq},"data":{{"v":"{seq}"}}}}"#
                );
                (entity.into_bytes(), value.into_bytes())
            })
        })
        .collect()
    };
    let opts = IdemOpts::new(&topic, &topic, &topic);
    produce_keyed(&topic, &records(1..16)).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;

    create_topic(&topic, 4).await;
    produce_keyed(&topic, &records(16..31)).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 300);
    idem.terminate().await;
    wait_group_empty(&topic, &topic).await;
    let mut conn = redis_conn(&redis_url()).await;
    let layout = KeyLayout::new(&topic);
    let mut spanning = 0;
    for n in 0..20 {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(layout.meta_key(&format!("{topic}:e{n}")))
            .query_async(&mut conn)
            .await
            .unwrap();
        spanning += usize::from(fields.iter().filter(|f| f.starts_with("o:")).count() == 2);
    }
    assert!(spanning > 0, "some entity moved to another partition");

    let (code, _, err) = replay_to_earliest(&topic);
    assert_eq!(code, 0, "{err}");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 0);
    assert_eq!(idem.outcome(&topic, Outcome::Replayed).await, 600);
    idem.terminate().await;
}
