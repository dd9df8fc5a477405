//! Bad input and the dead-letter topic: nothing blocks a partition, nothing
//! is lost, and what was dead-lettered can be re-driven once.

mod common;

use std::time::Duration;

use common::*;
use idem::model::Outcome;
use idem::tools::sample::{generate, SampleSpec};

const CATCH_UP: Duration = Duration::from_secs(120);

/// Well-formed records only, over 20 entities.
fn good(prefix: &str, events: usize, seed: u64) -> Vec<idem::tools::sample::SampleRecord> {
    unique_stream(prefix, events, 20, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_record_lands_in_the_dead_letter_topic_unchanged() {
    let topic = unique("poison");
    create_topic(&topic, 2).await;
    let good = good(&topic, 600, 5);
    let (model, _) = oracle(&good);
    let oversize = format!(
        r#"{{"id":"big","entity":"e","seq":1,"data":{{"x":"{}"}}}}"#,
        "y".repeat(3000)
    );
    // The first good record's id reused with another payload: a conflict.
    let first: serde_json::Value = serde_json::from_slice(&good[0].value).unwrap();
    let conflict = format!(
        r#"{{"id":{},"entity":{},"seq":999999,"data":{{"other":"payload"}}}}"#,
        first["id"], first["entity"]
    );
    let bad: Vec<(&[u8], &str)> = vec![
        (b"{\"id\":\"x\",\"entity\":\"e\",\"seq\":1", "not_json"),
        (b"\xff\xfe\xfd binary garbage \x00\x01", "not_utf8"),
        (b"[1,2,3]", "not_object"),
        (b"42", "not_object"),
        (br#"{"entity":"e","seq":1}"#, "missing_field"),
        (br#"{"id":"x","seq":1}"#, "missing_field"),
        (br#"{"id":"x","entity":"e"}"#, "missing_field"),
        (br#"{"id":"","entity":"e","seq":1}"#, "empty_field"),
        (br#"{"id":"x","entity":"","seq":1}"#, "empty_field"),
        (br#"{"id":7,"entity":"e","seq":1}"#, "wrong_type"),
        (br#"{"id":"x","entity":["e"],"seq":1}"#, "wrong_type"),
        (br#"{"id":"x","entity":"e","seq":"12"}"#, "wrong_type"),
        (
            br#"{"id":"x","entity":"e","seq":1,"data":[1]}"#,
            "wrong_type",
        ),
        (
            br#"{"id":"x","entity":"e","seq":1,"type":false}"#,
            "wrong_type",
        ),
        (br#"{"id":"x","entity":"e","seq":-3}"#, "seq_out_of_range"),
        (
            br#"{"id":"x","entity":"e","seq":99999999999999999999}"#,
            "seq_out_of_range",
        ),
        (br#"{"id":"x","entity":"e","seq":1.5}"#, "seq_out_of_range"),
        (
            br#"{"id":"x","entity":"e","seq":1,"ts":"yesterday"}"#,
            "bad_timestamp",
        ),
        (b"", "empty_value"),
        (
            br#"{"id":"x","entity":"e","seq":1,"ts":"2024-13-45T99:99:99Z"}"#,
            "bad_timestamp",
        ),
        (oversize.as_bytes(), "too_large"),
        (conflict.as_bytes(), "conflict"),
    ];
    let mut raw: Vec<RawRecord<'_>> = Vec::new();
    let mut expected = Vec::new();
    for (i, r) in good.iter().enumerate() {
        raw.push((Some(r.key.as_bytes()), Some(&r.value)));
        if i % 25 == 10 && expected.len() < bad.len() {
            let (value, reason) = bad[expected.len()];
            // The conflict must follow the original in its partition: same key.
            let key = if reason == "conflict" {
                &good[0].key
            } else {
                &r.key
            };
            raw.push((Some(key.as_bytes()), Some(value)));
            expected.push((key.clone(), value.to_vec(), reason));
        }
    }
    assert_eq!(
        expected.len(),
        bad.len(),
        "every kind of bad record is produced"
    );
    raw.push((Some(b"tombstone"), None));
    expected.push(("tombstone".into(), Vec::new(), "empty_value"));
    let positions = produce_raw(&topic, &raw).await;

    let opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__EVENT__MAX_BYTES", "2048");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        good.len() as u64
    );
    assert_eq!(
        idem.outcome(&topic, Outcome::Invalid).await,
        bad.len() as u64
    ); // conflict counted apart, tombstone added
    assert_eq!(idem.outcome(&topic, Outcome::Conflict).await, 1);
    assert_matches_oracle(&redis_url(), &topic, &model).await;

    let letters = dead_letters(&topic).await;
    assert_eq!(letters.len(), expected.len());
    for (key, value, reason) in &expected {
        let found = letters
            .iter()
            .find(|l| {
                l.key.as_deref() == Some(key.as_bytes())
                    && l.value.clone().unwrap_or_default() == *value
            })
            .unwrap_or_else(|| panic!("no dead letter for a {reason} record"));
        assert_eq!(
            found.reason(),
            *reason,
            "value {:?}",
            String::from_utf8_lossy(value)
        );
        assert_eq!(found.header("idem.original.topic"), Some(topic.as_str()));
        assert_eq!(found.header("idem.consumer.group"), Some(topic.as_str()));
        assert!(found.header("idem.message").is_some_and(|m| !m.is_empty()));
        let (p, o) = (
            found
                .header("idem.original.partition")
                .unwrap()
                .parse::<i32>()
                .unwrap(),
            found
                .header("idem.original.offset")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
        let index = positions
            .iter()
            .position(|pos| *pos == (p, o))
            .expect("the original position exists");
        assert_eq!(
            raw[index].1.unwrap_or_default(),
            value.as_slice(),
            "dead letter bytes are the original bytes"
        );
    }
    let conflict_letter = letters.iter().find(|l| l.reason() == "conflict").unwrap();
    assert!(conflict_letter.header("idem.fingerprint").is_some());
    assert!(conflict_letter
        .header("idem.remembered.fingerprint")
        .is_some());
    idem.terminate().await;

    // A replay from earliest reads every record again: each one, bad ones
    // included, is `replayed`, and none is dead-lettered a second time.
    let replay = idem_tool(
        &["replay", "--topic", &topic, "--to-earliest", "--execute"],
        &topic,
        &[("IDEM__KAFKA__GROUP_ID", topic.as_str())],
    );
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        raw.len() as u64
    );
    assert_eq!(idem.outcome(&topic, Outcome::Invalid).await, 0);
    assert_eq!(idem.outcome(&topic, Outcome::Conflict).await, 0);
    assert_eq!(
        dead_letters(&topic).await.len(),
        expected.len(),
        "a replay adds no dead letter"
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_dead_letter_topic_holds_the_commit_until_it_returns() {
    let topic = unique("nodlq");
    create_topic_without_dlq(&topic, 1).await;
    let good = good(&topic, 300, 6);
    let mut raw: Vec<RawRecord<'_>> = good[..100]
        .iter()
        .map(|r| (Some(r.key.as_bytes()), Some(r.value.as_slice())))
        .collect();
    raw.push((Some(b"k"), Some(b"not json")));
    let bad_offset = 100i64;
    raw.extend(
        good[100..]
            .iter()
            .map(|r| (Some(r.key.as_bytes()), Some(r.value.as_slice()))),
    );
    produce_raw(&topic, &raw).await;

    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM__DLQ__SEND_TIMEOUT", "1s")
            .with("IDEM__PIPELINE__STALL_TIMEOUT", "2s"),
    );
    wait_until(
        "the start-up check names the missing dead-letter topic",
        CATCH_UP,
        || async {
            std::fs::read_to_string(&idem.log).is_ok_and(|log| {
                log.contains("the dead-letter topic does not exist")
                    && log.contains(&format!("{topic}.dlq"))
            })
        },
    )
    .await;
    wait_until(
        "the dead-letter write failed and was retried",
        CATCH_UP,
        || async {
            idem.counter("idem_retries_total", &[("cause", "dead_letter")])
                .await
                .unwrap_or(0)
                >= 2
        },
    )
    .await;
    let held = committed(&topic, &topic, 1).await[0];
    assert!(
        held <= bad_offset,
        "committed {held} passed the undelivered dead letter at {bad_offset}"
    );
    // Blocked: /readyz says so, naming the partition, and the metric names the cause.
    let blocked = [
        ("topic", topic.as_str()),
        ("partition", "0"),
        ("cause", "dead_letter"),
    ];
    wait_until("the partition is reported blocked", CATCH_UP, || async {
        let ready = http_get(idem.metrics_port, "/readyz")
            .await
            .unwrap_or_default();
        ready.contains("blocked by dead_letter")
            && ready.contains(&format!("{topic}/0"))
            && idem.counter("idem_partition_blocked", &blocked).await == Some(1)
    })
    .await;

    create_topic(&topic, 1).await; // creates the missing .dlq
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    wait_until(
        "the partition moves again and idem is ready",
        CATCH_UP,
        || async {
            http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
                && idem.counter("idem_partition_blocked", &blocked).await == Some(0)
        },
    )
    .await;
    let letters = dead_letters(&topic).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].value.as_deref(), Some(&b"not json"[..]));
    let (model, _) = oracle(&good);
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_a_fix_applies_each_intent_once() {
    let topic = unique("redrive");
    create_topic(&topic, 2).await;
    // A "bug": max_bytes too small rejects the larger events as too_large.
    let records = generate(&SampleSpec {
        events: 400,
        entities: 20,
        // No copies: a copy of an enlarged record would be a conflict.
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.0,
        data_bytes: 16,
        seed: 8,
        prefix: topic.clone(),
        zipf: None,
    });
    let mut records = records;
    for (i, r) in records.iter_mut().enumerate() {
        if i % 3 == 0 {
            let mut v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            v["data"]["blob"] = serde_json::Value::String("z".repeat(400));
            r.value = serde_json::to_vec(&v).unwrap();
        }
    }
    produce(&topic, &records).await;
    // One record the fix does not cure: too large for the buggy config, and
    // with a bad timestamp. The redrive re-checks it and leaves it alone.
    let incurable = format!(
        r#"{{"id":"incurable","entity":"{topic}-x","seq":1,"ts":"2024-13-45T99:99:99Z","data":{{"blob":"{}"}}}}"#,
        "q".repeat(400)
    );
    let key = format!("{topic}-x");
    produce_raw(
        &topic,
        &[(Some(key.as_bytes()), Some(incurable.as_bytes()))],
    )
    .await;
    let buggy = IdemOpts::new(&topic, &topic, &topic).with("IDEM__EVENT__MAX_BYTES", "300");
    let idem = Idem::spawn(&buggy);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    // The rejected records that the fix cures.
    let rejected = idem.outcome(&topic, Outcome::Invalid).await - 1;
    assert!(rejected > 100, "{rejected}");
    idem.terminate().await;

    // The fix: the default max_bytes. A dry run first (publishes nothing),
    // then --execute twice (an operator repeating the command): the second
    // publishes nothing, so each dead letter is re-published once.
    let fixed = IdemOpts::new(&topic, &topic, &topic);
    let redrive = |execute: bool| {
        let mut args = vec![
            "dlq".to_string(),
            "redrive".into(),
            "--reason".into(),
            "too_large".into(),
            "--topic".into(),
            format!("{topic}.dlq"),
        ];
        if execute {
            args.push("--execute".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = idem_tool(&args, &topic, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ends_before = end_offsets(&topic, 2).await;
    let dry = redrive(false);
    assert!(
        dry.contains(&format!("would re-publish {rejected} to {topic}"))
            && dry.contains("1 would be rejected again (bad_timestamp)"),
        "{dry}"
    );
    assert_eq!(
        end_offsets(&topic, 2).await,
        ends_before,
        "a dry run publishes nothing"
    );
    let first = redrive(true);
    assert!(
        first.contains(&format!("re-published {rejected} to {topic}")),
        "{first}"
    );
    let second = redrive(true);
    assert!(
        second.contains("re-published 0")
            && second.contains(&format!("{rejected} already re-published")),
        "{second}"
    );
    let idem = Idem::spawn(&fixed);
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    // The oracle applies the records in one pass; the redriven ones arrive
    // later, so only entities' final state and counts under "each intent at
    // most once, none lost" can be compared: every id must be applied or stale once.
    let (model, _) = oracle(&records);
    let views = read_entities(&redis_url(), &topic, model.entities.keys()).await;
    let applied_total: u64 = views.values().map(|v| v.applied).sum();
    let oracle_max: u64 = model.entities.values().map(|e| e.applied).sum();
    assert!(
        applied_total <= oracle_max,
        "an intent was applied twice: {applied_total} > {oracle_max}"
    );
    for (entity, want) in &model.entities {
        assert_eq!(
            views[entity].seq, want.seq,
            "{entity}: the newest event is applied"
        );
    }
    assert_eq!(
        idem.outcome(&topic, Outcome::Invalid).await,
        0,
        "after the fix nothing is rejected"
    );
    // Each re-driven record was published once: no duplicates.
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 0);
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await + idem.outcome(&topic, Outcome::Stale).await,
        rejected,
        "each re-driven intent is decided once"
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_flood_stops_consumption_and_says_why() {
    let topic = unique("flood");
    create_topic(&topic, 1).await;
    let raw: Vec<RawRecord<'_>> = (0..400)
        .map(|_| (Some(&b"k"[..]), Some(&b"garbage"[..])))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM__DLQ__RATIO_WINDOW", "100")
            .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "50")
            .with("IDEM__DLQ__MAX_RATIO", "0.5"),
    );
    wait_until("/readyz reports the stop", CATCH_UP, || async {
        http_get(idem.metrics_port, "/readyz")
            .await
            .is_some_and(|b| b.contains("dead-letter ratio"))
    })
    .await;
    assert_eq!(idem.counter("idem_paused", &[]).await, Some(1));
    // What was dead-lettered is committed (the last commit may take one
    // commit interval), and nothing more.
    wait_until(
        "the commit reaches the last dead letter",
        CATCH_UP,
        || async {
            committed(&topic, &topic, 1).await[0] == dead_letters(&topic).await.len() as i64
        },
    )
    .await;
    let dead = dead_letters(&topic).await.len();
    assert!(
        (100..2000).contains(&dead),
        "stopped after the budget, not at the end: {dead} dead letters"
    );
    idem.terminate().await;
}

/// Copies every record of `topic`'s dead-letter topic once more into it,
/// headers included: what a replay used to leave there (the same source
/// record dead-lettered twice).
async fn duplicate_dead_letters(topic: &str) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let dlq = format!("{topic}.dlq");
    let records = dead_letters(topic).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for r in &records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut copy: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dlq).headers(headers);
        if let Some(k) = r.key.as_deref() {
            copy = copy.key(k);
        }
        if let Some(v) = r.value.as_deref() {
            copy = copy.payload(v);
        }
        producer.send(copy, Duration::from_secs(10)).await.unwrap();
    }
}

/// Runs `idem dlq <args> --topic <dlq> --json` with `env`: its JSON report.
fn dlq_json(args: &[&str], dlq: &str, prefix: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--topic", dlq, "--json"]);
    let out = idem_tool(&all, prefix, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A redrive's dry run promises only what would be applied: a dead letter
/// whose effects the current config cannot plan, and one whose id is now
/// remembered with another payload, are reported with the reason they
/// would get, not published. `dlq inspect` counts source records, and a
/// redrive publishes each source record once, whatever copies the
/// dead-letter topic holds, also across runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_publishes_only_what_would_be_applied_once_per_source() {
    let topic = unique("redrive-fates");
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{topic}.toml"));
    std::fs::write(
        &file,
        format!("[[effects]]\ntopic = \"{topic}\"\ntypes = [\"deposit\"]\ncounters = [{{ field = \"balance\", from = \"/amount\" }}]\n"),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let blob = "z".repeat(400);
    let deposit = |id: &str, entity: &str, amount: &str, blob: &str| {
        format!(
            r#"{{"id":"{id}","entity":"{entity}","seq":1,"type":"deposit","data":{{"amount":{amount},"blob":"{blob}"}}}}"#
        )
    };
    let (cured, nan, reused) = (
        format!("{topic}:cured"),
        format!("{topic}:nan"),
        format!("{topic}:reused"),
    );
    // Too large for the buggy max_bytes, all three; the id of the third is
    // then applied with another (smaller) payload.
    let values = [
        (cured.clone(), deposit("cured", &cured, "5", &blob)),
        (nan.clone(), deposit("nan", &nan, r#""abc""#, &blob)),
        (reused.clone(), deposit("reused", &reused, "1", &blob)),
        (reused.clone(), deposit("reused", &reused, "2", "")),
    ];
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|(k, v)| (Some(k.as_bytes()), Some(v.as_bytes())))
        .collect();
    produce_raw(&topic, &raw).await;
    let buggy = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM_CONFIG", config)
        .with("IDEM__EVENT__MAX_BYTES", "300");
    let idem = Idem::spawn(&buggy);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Invalid).await, 3);
    idem.terminate().await;
    duplicate_dead_letters(&topic).await;

    let env = [("IDEM_CONFIG", config)];
    let inspected = dlq_json(&["inspect"], &dlq, &topic, &env);
    assert_eq!(
        (
            &inspected["records"],
            &inspected["sources"],
            &inspected["by_reason"]["too_large"]
        ),
        (&6.into(), &3.into(), &3.into()),
        "{inspected}"
    );

    let dry = dlq_json(&["redrive"], &dlq, &topic, &env);
    assert_eq!(dry["by_topic"], serde_json::json!({ &topic: 1 }), "{dry}");
    assert_eq!(
        dry["still_invalid"],
        serde_json::json!({ "amount_not_numeric": 1, "conflict": 1 }),
        "{dry}"
    );
    assert_eq!(dry["copies"], 3, "{dry}");

    let first = dlq_json(&["redrive", "--execute"], &dlq, &topic, &env);
    assert_eq!(
        first["by_topic"],
        serde_json::json!({ &topic: 1 }),
        "{first}"
    );
    let again = dlq_json(&["redrive", "--execute"], &dlq, &topic, &env);
    assert_eq!(
        (
            &again["by_topic"],
            &again["already_redriven"],
            &again["copies"]
        ),
        (&serde_json::json!({}), &2.into(), &2.into()),
        "both copies of the published record are known to be re-published: {again}"
    );
    let fixed = IdemOpts::new(&topic, &topic, &topic).with("IDEM_CONFIG", config);
    let idem = Idem::spawn(&fixed);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;
    let mut conn = redis_conn(&redis_url()).await;
    let balance: Option<String> = redis::cmd("HGET")
        .arg(
            idem::store::KeyLayout::new(&topic)
                .entity(&cured)
                .counters(),
        )
        .arg("balance")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        balance.as_deref(),
        Some("5"),
        "the cured deposit counted once"
    );

    // Forgetting what was re-published: the id is now remembered with this
    // payload, so the dry run says it is applied already.
    let _: () = redis::cmd("DEL")
        .arg(idem::store::KeyLayout::new(&topic).redriven_key(&dlq))
        .query_async(&mut conn)
        .await
        .unwrap();
    let forgotten = dlq_json(&["redrive"], &dlq, &topic, &env);
    assert_eq!(
        (&forgotten["by_topic"], &forgotten["already_applied"]),
        (&serde_json::json!({}), &1.into()),
        "{forgotten}"
    );
}
