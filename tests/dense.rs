//! Dense seqs (`dedupe.dense_seq_topics`) against a real broker and Redis:
//! a copy at a new offset after the window is a duplicate, another event at
//! a decided seq is dead-lettered, a dead-lettered seq redriven applies
//! once, and seqs never produced close at the cap, counted, with a late
//! original in a closed gap dead-lettered.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use idem::config::TopicPolicy;
use idem::model::{EntityModel, Outcome};
use idem::store::commutative as view;
use idem::store::KeyLayout;
use idem_testbench::payments;

const CATCH_UP: Duration = Duration::from_secs(120);

fn config_file(topic: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(topic);
    payments::write_config(&dir, topic).unwrap()
}

fn deposit(id: &str, entity: &str, seq: u64, amount: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","entity":"{entity}","seq":{seq},"type":"deposit","data":{{"amount":"{amount}"}}}}"#
    )
    .into_bytes()
}

async fn produce_values(topic: &str, entity: &str, values: &[Vec<u8>]) {
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|v| (Some(entity.as_bytes()), Some(v.as_slice())))
        .collect();
    produce_raw(topic, &raw).await;
}

async fn balance(prefix: &str, entity: &str) -> Option<String> {
    let mut conn = redis_conn(&redis_url()).await;
    let got = view::read(&mut conn, &KeyLayout::new(prefix), entity, &[], &[])
        .await
        .unwrap();
    got.counters.get("balance").cloned()
}

async fn meta_field(prefix: &str, entity: &str, field: &str) -> Option<String> {
    let mut conn = redis_conn(&redis_url()).await;
    redis::cmd("HGET")
        .arg(KeyLayout::new(prefix).entity(entity).meta())
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn dense_idem(topic: &str, file: &std::path::Path, window: &str) -> Idem {
    Idem::spawn(
        &IdemOpts::new(topic, topic, topic)
            .with("IDEM_CONFIG", file.to_str().unwrap())
            .with("IDEM__DEDUPE__WINDOW", window)
            .with("IDEM__DEDUPE__DENSE_SEQ_TOPICS", topic),
    )
}

/// After the window, copies at new offsets (a producer's retry, a mirror)
/// are duplicates by their seq: no balance moves. Another event at a
/// decided seq is dead-lettered `seq_reused`, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_after_the_window_are_duplicates_by_their_seq() {
    let topic = unique("dense-copy");
    create_topic(&topic, 2).await;
    let file = config_file(&topic);
    let accounts: Vec<String> = (0..10).map(|a| format!("{topic}:acct-{a}")).collect();
    let mut sent = Vec::new();
    for (a, entity) in accounts.iter().enumerate() {
        let values: Vec<Vec<u8>> = (1..=8)
            .map(|seq| deposit(&format!("{a}-{seq}"), entity, seq, &format!("{seq}.25")))
            .collect();
        produce_values(&topic, entity, &values).await;
        sent.push(values);
    }
    let idem = dense_idem(&topic, &file, "2s");
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    let mut before = Vec::new();
    for entity in &accounts {
        before.push(balance(&topic, entity).await);
    }
    assert_eq!(before[0].as_deref(), Some("38.00"), "1.25 + … + 8.25");
    wait_ids_expired(&topic).await;

    // Every record again, at new offsets, after the window.
    for (entity, values) in accounts.iter().zip(&sent) {
        produce_values(&topic, entity, values).await;
    }
    // Another event at account 0's newest seq, and at a seq below it.
    let reused = deposit("other-8", &accounts[0], 8, "1000.00");
    let below = deposit("other-3", &accounts[0], 3, "1000.00");
    produce_values(&topic, &accounts[0], &[reused, below]).await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    for (entity, want) in accounts.iter().zip(&before) {
        assert_eq!(&balance(&topic, entity).await, want, "{entity}");
    }
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 80);
    // 80 copies, and the event at seq 3: idem no longer knows seq 3's
    // fingerprint, so it is taken for a copy (docs/guarantees.md).
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 81);
    assert_eq!(idem.outcome(&topic, Outcome::Conflict).await, 1);
    let letters = dead_letters(&topic).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason(), "seq_reused");
    assert_eq!(
        meta_field(&topic, &accounts[0], "dense").await.as_deref(),
        Some("1:8")
    );
    idem.terminate().await;
}

/// A seq dead-lettered inside the script (its counter was unreadable)
/// decides nothing: the mark waits below it, its redrive applies it once,
/// and a later copy of it is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_seq_redriven_applies_once() {
    let topic = unique("dense-redrive");
    create_topic(&topic, 1).await;
    let file = config_file(&topic);
    let entity = format!("{topic}:acct");
    let counters = KeyLayout::new(&topic).entity(&entity).counters();
    let mut conn = redis_conn(&redis_url()).await;
    let _: () = redis::cmd("HSET")
        .arg(&counters)
        .arg("balance")
        .arg("not a number")
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = deposit("d1", &entity, 1, "10.00");
    produce_values(&topic, &entity, std::slice::from_ref(&first)).await;
    let idem = dense_idem(&topic, &file, "2s");
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(dead_letters(&topic).await[0].reason(), "counter_unreadable");
    // The operator repairs the counter; seqs 2 and 3 apply and wait above 1.
    let _: () = redis::cmd("DEL")
        .arg(&counters)
        .query_async(&mut conn)
        .await
        .unwrap();
    produce_values(
        &topic,
        &entity,
        &[
            deposit("d2", &entity, 2, "2.00"),
            deposit("d3", &entity, 3, "3.00"),
        ],
    )
    .await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(
        meta_field(&topic, &entity, "dense").await.as_deref(),
        Some("1:0")
    );
    let waiting = meta_field(&topic, &entity, "dense_above").await.unwrap();
    assert!(
        waiting.starts_with("2=") && waiting.contains(",3=") && waiting.split(',').count() == 2,
        "{waiting}"
    );

    let env = [("IDEM_CONFIG", file.to_str().unwrap())];
    let dlq = format!("{topic}.dlq");
    let out = idem_tool(
        &[
            "dlq",
            "redrive",
            "--reason",
            "counter_unreadable",
            "--topic",
            &dlq,
            "--execute",
        ],
        &topic,
        &env,
    );
    assert!(out.status.success(), "{out:?}");
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(balance(&topic, &entity).await.as_deref(), Some("15.00"));
    assert_eq!(
        meta_field(&topic, &entity, "dense").await.as_deref(),
        Some("1:3")
    );
    // After the window, the original record once more: a duplicate.
    wait_ids_expired(&topic).await;
    produce_values(&topic, &entity, &[first]).await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(balance(&topic, &entity).await.as_deref(), Some("15.00"));
    // Seq 1 came after 3: late (its deposit counts, the state is newer).
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 2);
    assert_eq!(idem.outcome(&topic, Outcome::Late).await, 1);
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 1);
    idem.terminate().await;
}

/// Seqs never produced: the mark waits at the gap while at most 32 later
/// seqs wait above it, then the cap closes it (counted in
/// idem_dense_seqs_closed_total, as the model counts), and the late
/// original of a closed seq is dead-lettered `seq_gap_closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_produced_seqs_close_at_the_cap_and_a_late_original_is_dead_lettered() {
    let topic = unique("dense-gaps");
    create_topic(&topic, 1).await;
    let file = config_file(&topic);
    let one = format!("{topic}:one-gap");
    let many = format!("{topic}:every-third");
    let one_seqs: Vec<u64> = std::iter::once(1).chain(3..=40).collect();
    let many_seqs: Vec<u64> = (1..=200).filter(|s| s % 3 != 0).collect();
    let values = |entity: &str, seqs: &[u64]| -> Vec<Vec<u8>> {
        seqs.iter()
            .map(|s| deposit(&format!("{entity}-{s}"), entity, *s, "1.00"))
            .collect()
    };
    produce_values(&topic, &one, &values(&one, &one_seqs)).await;
    produce_values(&topic, &many, &values(&many, &many_seqs)).await;
    let idem = dense_idem(&topic, &file, "1h");
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;

    // What the model says, for both entities.
    let dense = TopicPolicy {
        dense_seqs: true,
        ..TopicPolicy::default()
    };
    let model = |entity: &str, seqs: &[u64]| {
        let mut m = EntityModel::default();
        for s in seqs {
            let e = idem::event::Event {
                ts: None,
                change: None,
                id: format!("{entity}-{s}"),
                entity: entity.to_string(),
                seq: *s,
                op: idem::event::Op::Upsert,
                kind: None,
                set: vec![],
                unset: vec![],
                fingerprint: 0,
            };
            m.apply_effects(&e, &idem::effects::MERGE, &dense);
        }
        m.dense.expect("dense")
    };
    let (want_one, want_many) = (model(&one, &one_seqs), model(&many, &many_seqs));
    assert_eq!(want_one.closed, vec![(2, 2)]);
    assert!(want_many.above.len() <= 32 && want_many.closed.len() <= 8);
    for (entity, want) in [(&one, &want_one), (&many, &want_many)] {
        assert_eq!(
            meta_field(&topic, entity, "dense").await,
            Some(want.encode().0),
            "{entity}"
        );
        assert_eq!(
            meta_field(&topic, entity, "dense_closed").await,
            want.encode().2
        );
        let waiting = meta_field(&topic, entity, "dense_above").await;
        assert_eq!(
            waiting.as_deref().map_or(0, |w| w.split(',').count()),
            want.above.len(),
            "{entity}: {waiting:?}"
        );
    }
    let closed = idem
        .counter("idem_dense_seqs_closed_total", &[("topic", topic.as_str())])
        .await
        .unwrap();
    assert_eq!(closed, want_one.seqs_closed + want_many.seqs_closed);
    assert!(closed > 1);

    // inspect shows the rule's fields and the offset mark.
    let env = [("IDEM_CONFIG", file.to_str().unwrap())];
    let out = idem_tool(&["inspect", "entity", &one, "--json"], &topic, &env);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["dense_seqs"]["dense"], "1:40", "{json}");
    assert_eq!(json["dense_seqs"]["dense_closed"], "2-2", "{json}");
    let marks = json["offset_marks"].as_object().expect("an offset mark");
    assert_eq!(marks.len(), 1, "{json}");
    let text = idem_tool(&["inspect", "entity", &one], &topic, &env);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("dense seqs") && text.contains("  dense = 1:40"),
        "{text}"
    );
    assert!(text.contains("offset marks"), "{text}");

    // The late original of seq 2: dead-lettered with its reason, no deposit.
    let before = balance(&topic, &one).await;
    produce_values(
        &topic,
        &one,
        &[deposit(&format!("{one}-2"), &one, 2, "1.00")],
    )
    .await;
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    assert_eq!(balance(&topic, &one).await, before);
    let letters = dead_letters(&topic).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason(), "seq_gap_closed");
    let message = letters[0].header("idem.message").unwrap_or("");
    assert!(message.contains("2-2"), "{message}");
    idem.terminate().await;
}

/// `idem reconcile` compares what idem keeps beside the state: after a
/// clean run on a dense topic under per-field order it finds nothing; an
/// offset mark past the entity's last record (within what it read: exit 1),
/// a dense-seq record and field seqs that the log's events do not make
/// (informational) are each reported, and none is "repaired" into
/// something else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_compares_offset_marks_dense_seqs_and_field_seqs() {
    let topic = unique("bookkeeping");
    create_topic(&topic, 1).await;
    let file = config_file(&topic);
    let records = payments::generate(&payments::PaymentsSpec {
        events: 600,
        accounts: 20,
        duplicate_ratio: 0.1,
        out_of_order_ratio: 0.1,
        seed: 5,
        prefix: topic.clone(),
    });
    produce(&topic, &records).await;
    let config = file.to_str().unwrap();
    let env = [
        ("IDEM_CONFIG", config),
        ("IDEM__DEDUPE__DENSE_SEQ_TOPICS", topic.as_str()),
        ("IDEM__STATE__ORDER", "per_field"),
    ];
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    for (k, v) in env {
        opts = opts.with(k, v);
    }
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    idem.terminate().await;
    let (code, json) = reconcile_report(&topic, &[], &env);
    assert_eq!(code, Some(0), "a clean run reconciles clean: {json}");
    assert_eq!(json["divergences"], serde_json::json!([]), "{json}");

    let id = topic_id(&topic)
        .await
        .expect("the local broker gives topic ids");
    let account = |a: u32| format!("{topic}:acct-{a}");
    // A mark at the log's last offset, for an account whose last record is
    // not there: as if the log lost records idem decided.
    let last_offset = records.len() - 1;
    let ahead = (3..20)
        .map(account)
        .find(|a| records.last().is_some_and(|r| r.key != *a))
        .unwrap();
    let layout = KeyLayout::new(&topic);
    let mut conn = redis_conn(&redis_url()).await;
    for cmd in [
        redis::cmd("HSET")
            .arg(layout.meta_key(&ahead))
            .arg(format!("o:{}:0", id.short()))
            .arg(format!("0:{last_offset}"))
            .clone(),
        // Past what a reconcile reads (written while it runs): not reported.
        redis::cmd("HSET")
            .arg(layout.meta_key(&account(0)))
            .arg(format!("o:{}:0", id.short()))
            .arg("0:999999")
            .clone(),
        redis::cmd("HSET")
            .arg(layout.meta_key(&account(1)))
            .arg("dense_closed")
            .arg("900-901")
            .clone(),
        redis::cmd("HSET")
            .arg(layout.entity(&account(2)).field_seqs())
            .arg("injected")
            .arg(7)
            .clone(),
    ] {
        let _: () = cmd.query_async(&mut conn).await.unwrap();
    }
    for extra in [&[][..], &["--repair"][..]] {
        let (code, json) = reconcile_report(&topic, extra, &env);
        assert_eq!(code, Some(1), "{json}");
        let mut got: Vec<(String, String, bool)> = json["divergences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["entity"].as_str().unwrap().to_string(),
                    d["kind"].as_str().unwrap().to_string(),
                    d["repaired"].as_bool().unwrap(),
                )
            })
            .collect();
        got.sort();
        let mut want = vec![
            (ahead.clone(), "offset_mark_ahead".to_string(), false),
            (account(1), "dense_seqs_differ".to_string(), false),
            (account(2), "field_seqs_differ".to_string(), false),
        ];
        want.sort();
        assert_eq!(got, want);
    }
}
