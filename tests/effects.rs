//! Effects that are not idempotent, applied exactly once by the real `idem`
//! binary against a real broker and a real Redis: counters to the last
//! digit, a ledger with each event once and in order, a custom effect,
//! late commutative events, and effects that fail leaving nothing behind.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use idem::config::{Config, TopicPolicy};
use idem::effects::CommutativeView;
use idem::model::{Model, Outcome};
use idem::store::commutative as view;
use idem::store::KeyLayout;
use idem::tools::sample::{Rng, SampleRecord};
use idem_testbench::payments::{self, PaymentsSpec, HUGE_AMOUNT};

const CATCH_UP: Duration = Duration::from_secs(180);

fn config_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// The effects idem will run with, read back through idem's own config loader.
fn policy_of(file: &std::path::Path, topic: &str) -> TopicPolicy {
    Config::load(Some(file), &Default::default())
        .expect("effects config")
        .policy(topic)
}

async fn commutative(prefix: &str, entity: &str) -> CommutativeView {
    let mut conn = redis_conn(&redis_url()).await;
    view::read(
        &mut conn,
        &KeyLayout::new(prefix),
        entity,
        &["ledger".to_string()],
        &[],
    )
    .await
    .unwrap()
}

/// Every account's balance (to the last digit) and ledger (each event once,
/// in order) as the model says; points as the snippet must have made them.
async fn assert_effects(
    prefix: &str,
    model: &Model,
    points: &std::collections::BTreeMap<String, u64>,
) {
    assert_matches_oracle(&redis_url(), prefix, model).await;
    let mut wrong = Vec::new();
    for (entity, want) in &model.entities {
        let got = commutative(prefix, entity).await;
        let mut want_view = want.commutative_view();
        if let Some(p) = points.get(entity) {
            want_view.counters.insert("points".into(), p.to_string());
        }
        if got != want_view {
            wrong.push(format!("{entity}: redis {got:?}\n model {want_view:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} accounts differ:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(3)].join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_ledger_and_custom_effect_apply_exactly_once_through_sigkills() {
    let topic = unique("pay");
    let partitions = 4;
    create_topic(&topic, partitions).await;
    let file = payments::write_config(&config_dir(&topic), &topic).unwrap();
    let records = payments::generate(&PaymentsSpec {
        events: 20_000,
        accounts: 300,
        duplicate_ratio: 0.30,
        out_of_order_ratio: 0.10,
        seed: 15,
        prefix: topic.clone(),
    });
    let (model, counts, points) = payments::oracle(&records, &policy_of(&file, &topic));
    assert!(
        counts[&Outcome::Late] > 100,
        "the stream has late deposits: {counts:?}"
    );
    assert!(records
        .iter()
        .any(|r| String::from_utf8_lossy(&r.value).contains(HUGE_AMOUNT)));

    let producing = {
        let (topic, records) = (topic.clone(), records.clone());
        tokio::spawn(async move {
            for slice in records.chunks(records.len() / 8 + 1) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM_CONFIG", file.to_str().unwrap())
        .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "300");
    let mut rng = Rng::new(0xFEE);
    let started = Instant::now();
    let mut kills = 0;
    for _ in 0..4 {
        let idem = Idem::spawn(&opts);
        wait_until("the new idem process handles events", CATCH_UP, || async {
            idem.counter("idem_events_total", &[]).await.unwrap_or(0) > 0
                || (producing.is_finished()
                    && committed(&topic, &topic, partitions).await
                        == end_offsets(&topic, partitions).await)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50 + rng.below(700))).await;
        idem.kill();
        kills += 1;
    }
    producing.await.unwrap();
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    assert_effects(&topic, &model, &points).await;
    let huge_account = model
        .entities
        .iter()
        .find(|(_, e)| {
            e.counters
                .get("balance")
                .is_some_and(|b| b.to_string().len() > 30)
        })
        .map(|(name, e)| (name.clone(), e.counters["balance"].to_string()));
    eprintln!(
        "effects under {kills} SIGKILLs: {} records in {:.1}s, outcomes {counts:?}; the 30-digit account: {huge_account:?}",
        records.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        huge_account.is_some(),
        "one balance carries the 30-digit amount"
    );
    idem.terminate().await;
}

fn record(id: &str, entity: &str, seq: u64, kind: &str, data: &str) -> Vec<u8> {
    format!(r#"{{"id":"{id}","entity":"{entity}","seq":{seq},"type":"{kind}","data":{data}}}"#)
        .into_bytes()
}

/// A deposit that arrives after a newer status update still counts, and
/// its own (older) state fields do not overwrite the newer ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_deposit_still_counts_and_leaves_the_newer_status() {
    let topic = unique("late");
    create_topic(&topic, 1).await;
    let file = payments::write_config(&config_dir(&topic), &topic).unwrap();
    let entity = format!("{topic}:acct");
    let values = [
        record("d1", &entity, 1, "deposit", r#"{"amount":"10.00"}"#),
        record("s3", &entity, 3, "status", r#"{"status":"frozen"}"#),
        // seq 2, after seq 3: stale for the state, still a deposit
        record("d2", &entity, 2, "deposit", r#"{"amount":5.25}"#),
        record("d2", &entity, 2, "deposit", r#"{"amount":5.25}"#),
    ];
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|v| (Some(entity.as_bytes()), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic).with("IDEM_CONFIG", file.to_str().unwrap()),
    );
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;

    let views = read_entities(&redis_url(), &topic, [entity.clone()].iter()).await;
    let state = &views[&entity].state;
    assert_eq!(state.get("status").map(String::as_str), Some("frozen"));
    assert_eq!(
        state.get("amount").map(String::as_str),
        Some("10.00"),
        "the late deposit's own field is older"
    );
    assert_eq!(views[&entity].seq, Some(3));
    let got = commutative(&topic, &entity).await;
    assert_eq!(
        got.counters.get("balance").map(String::as_str),
        Some("15.25")
    );
    assert_eq!(got.counters.get("points").map(String::as_str), Some("15"));
    let ids: Vec<&str> = got.ledgers["ledger"]
        .iter()
        .map(|entry| entry[0].1.as_str())
        .collect();
    assert_eq!(ids, ["d1", "d2"]);
    let env = [("IDEM_CONFIG", file.to_str().unwrap())];
    let out = idem_tool(&["inspect", "entity", &entity, "--json"], &topic, &env);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["counters"]["balance"], "15.25", "{json}");
    assert_eq!(json["ledgers"]["ledger"]["length"], 2, "{json}");
    assert_eq!(json["seq"], 3, "{json}");
    let text = idem_tool(&["inspect", "entity", &entity], &topic, &env);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("balance = 15.25") && text.contains("2 entries"),
        "{text}"
    );
    assert_eq!(idem.outcome(&topic, Outcome::Late).await, 1);
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 1);
    idem.terminate().await;
}

/// A custom effect that errors, a counter that would overflow and an amount
/// with too many decimals: each event is dead-lettered with its reason and
/// message, and nothing of it is in Redis (not its state, not its id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_that_cannot_apply_are_dead_lettered_and_leave_nothing() {
    let topic = unique("reject");
    create_topic(&topic, 1).await;
    let dir = config_dir(&topic);
    std::fs::create_dir_all(&dir).unwrap();
    let failing = dir.join("failing.lua");
    std::fs::write(
        &failing,
        "local x = 1\nerror('refusing ' .. event.id)\nreturn {}\n",
    )
    .unwrap();
    let file = dir.join("effects.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[[effects]]
topic = "{topic}"
types = ["bad"]
custom = [{{ file = "{failing}", order = "ordered", writes = ["x"] }}]

[[effects]]
topic = "{topic}"
types = ["deposit"]
counters = [{{ field = "balance", from = "/amount", scale = 2 }}]
ledger = {{ stream = "ledger", max_len = 10 }}
"#,
            failing = failing.display()
        ),
    )
    .unwrap();
    let (a, b, c) = (
        format!("{topic}:a"),
        format!("{topic}:b"),
        format!("{topic}:c"),
    );
    let nines = "9".repeat(36);
    let values = [
        (a.clone(), record("bad1", &a, 1, "bad", r#"{"x":1}"#)),
        (
            b.clone(),
            record("b1", &b, 1, "deposit", &format!(r#"{{"amount":{nines}}}"#)),
        ),
        (
            b.clone(),
            record("b2", &b, 2, "deposit", &format!(r#"{{"amount":{nines}}}"#)),
        ),
        (
            c.clone(),
            record("c1", &c, 1, "deposit", r#"{"amount":1.005}"#),
        ),
        (
            c.clone(),
            record("c2", &c, 2, "deposit", r#"{"amount":"2"}"#),
        ),
    ];
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .map(|(k, v)| (Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic).with("IDEM_CONFIG", file.to_str().unwrap()),
    );
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;

    let letters = dead_letters(&topic).await;
    let got: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            let original = l.header(idem::dlq::header::OFFSET).unwrap_or("?");
            (original.to_string(), l.reason().to_string())
        })
        .collect();
    assert_eq!(
        got,
        [
            ("0".to_string(), "effect_failed".to_string()),
            ("2".to_string(), "counter_overflow".to_string()),
            ("3".to_string(), "amount_excess_decimals".to_string())
        ],
        "{letters:#?}"
    );
    let failed = letters[0]
        .header(idem::dlq::header::MESSAGE)
        .unwrap_or_default();
    assert!(
        failed.contains(&format!("{}:2:", failing.display())) && failed.contains("refusing bad1"),
        "the message names the snippet's file, line and error: {failed}"
    );
    let views = read_entities(
        &redis_url(),
        &topic,
        [a.clone(), b.clone(), c.clone()].iter(),
    )
    .await;
    assert_eq!(
        views[&a].seq, None,
        "nothing of the failed event is in Redis"
    );
    assert_eq!(
        views[&b].seq,
        Some(1),
        "the overflowing deposit was not applied"
    );
    let balance_b = commutative(&topic, &b).await;
    assert_eq!(balance_b.counters["balance"], format!("{nines}.00"));
    assert_eq!(balance_b.ledgers["ledger"].len(), 1);
    assert_eq!(commutative(&topic, &c).await.counters["balance"], "2.00");
    assert_eq!(idem.outcome(&topic, Outcome::Invalid).await, 3);
    idem.terminate().await;
}

/// A custom effect that does not compile stops the start, naming its file
/// and line, before anything is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snippet_that_does_not_compile_refuses_the_start() {
    let topic = unique("nocompile");
    create_topic(&topic, 1).await;
    let dir = config_dir(&topic);
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.lua");
    std::fs::write(&broken, "local x = 1\nlocal y = = 2\nreturn {}\n").unwrap();
    let file = dir.join("effects.toml");
    std::fs::write(
        &file,
        format!(
            "[[effects]]\ntopic = \"{topic}\"\ncustom = [{{ file = \"{}\", order = \"ordered\", writes = [\"x\"] }}]\n",
            broken.display()
        ),
    )
    .unwrap();
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic).with("IDEM_CONFIG", file.to_str().unwrap()),
    );
    let log = idem.log.clone();
    let status = idem.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success());
    let text = std::fs::read_to_string(log).unwrap();
    assert!(
        text.contains(&format!("{}:2:", broken.display())) && text.contains("does not compile"),
        "{text}"
    );
}

/// A replay from earliest after the window changes nothing: every record
/// is recognised by its offset (`replayed`), through a SIGKILL mid-replay.
/// Only records idem has no record of deciding (here its marks and ranges
/// are removed, as for records decided before an upgrade) need
/// `--allow-recount`, and then they count again, as it warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_the_window_changes_nothing_and_only_unmarked_records_recount() {
    let topic = unique("recount");
    let partitions = 2;
    create_topic(&topic, partitions).await;
    let file = payments::write_config(&config_dir(&topic), &topic).unwrap();
    let records = payments::generate(&PaymentsSpec {
        events: 3_000,
        accounts: 60,
        duplicate_ratio: 0.2,
        out_of_order_ratio: 0.1,
        seed: 77,
        prefix: topic.clone(),
    });
    let (model, _, points) = payments::oracle(&records, &policy_of(&file, &topic));
    produce(&topic, &records).await;
    // Malformed records among them: dead-lettered, never counted again.
    let malformed: Vec<RawRecord<'_>> = (0..5)
        .map(|_| (Some(&b"acct-x"[..]), Some(&b"not json"[..])))
        .collect();
    produce_raw(&topic, &malformed).await;
    let produced = Instant::now();
    let config = file.to_str().unwrap();
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM_CONFIG", config)
        .with("IDEM__DEDUPE__WINDOW", "1s")
        .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "100");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    // The start-up line shows resolved values, spelt as in the config,
    // and the effects declared.
    let logged = std::fs::read_to_string(&idem.log).unwrap();
    for expected in [
        format!("dead_letter_topics={topic}={topic}.dlq"),
        "durability=ack".to_string(),
        format!(
            "{topic}/deposit: merge amount, counter balance, ledger ledger, custom loyalty.lua"
        ),
        format!("{topic}/withdrawal: keep, counter balance, ledger ledger"),
        format!("{topic}/status: merge status"),
    ] {
        assert!(
            logged.contains(&expected),
            "no `{expected}` in the log:
{logged}"
        );
    }
    idem.terminate().await;
    assert_effects(&topic, &model, &points).await;
    wait_until(
        "the records are older than the window",
        CATCH_UP,
        || async { produced.elapsed() > Duration::from_secs(2) },
    )
    .await;
    let env = [
        ("IDEM_CONFIG", config),
        ("IDEM__DEDUPE__WINDOW", "1s"),
        ("IDEM__KAFKA__GROUP_ID", topic.as_str()),
    ];
    let replay = |extra: &'static [&'static str]| {
        let mut args = vec![
            "replay",
            "--topic",
            topic.as_str(),
            "--to-earliest",
            "--execute",
        ];
        args.extend_from_slice(extra);
        idem_tool(&args, &topic, &env)
    };
    let replayed = replay(&[]);
    let stdout = String::from_utf8_lossy(&replayed.stdout);
    assert!(
        replayed.status.success(),
        "a replay onto decided records needs no flag: {}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{} of them were decided before",
            records.len() + malformed.len()
        )),
        "{stdout}"
    );
    // SIGKILLed mid-replay, then run to the end.
    let idem = Idem::spawn(&opts);
    wait_until("the replay is under way", CATCH_UP, || async {
        idem.counter("idem_events_total", &[]).await.unwrap_or(0) > 0
    })
    .await;
    idem.kill();
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    assert_effects(&topic, &model, &points).await;
    for outcome in [
        Outcome::Applied,
        Outcome::Late,
        Outcome::Duplicate,
        Outcome::Stale,
    ] {
        assert_eq!(idem.outcome(&topic, outcome).await, 0, "{outcome:?}");
    }
    assert!(idem.outcome(&topic, Outcome::Replayed).await > 0);
    idem.terminate().await;

    // As before offset marks: nothing says these records were decided.
    forget_offset_marks(&topic).await;
    // The plan counts what would count again: each deposit and withdrawal
    // id once, not the status updates, the copies or the malformed records.
    let commutative_ids: std::collections::HashSet<(String, String)> = records
        .iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).ok()?;
            ["deposit", "withdrawal"]
                .contains(&v["type"].as_str()?)
                .then(|| (v["entity"].to_string(), v["id"].to_string()))
        })
        .collect();
    let dry = idem_tool(
        &["replay", "--topic", &topic, "--to-earliest", "--json"],
        &topic,
        &env,
    );
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(
        plan["total_recount"],
        commutative_ids.len(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(
        commutative_ids.len() < records.len(),
        "the stream has merges and copies"
    );
    let refused = replay(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("--allow-recount") && stderr.contains("no record of deciding"),
        "{stderr}"
    );
    let allowed = replay(&["--allow-recount"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    assert!(
        idem.outcome(&topic, Outcome::Late).await > 0,
        "what --allow-recount warned about: the deposits count again"
    );
    let (entity, want) = model.entities.iter().next().unwrap();
    assert_ne!(
        commutative(&topic, entity).await.counters.get("balance"),
        want.commutative_view().counters.get("balance")
    );
    idem.terminate().await;
}

/// Deletes every offset mark and decided range under `prefix`.
async fn forget_offset_marks(prefix: &str) {
    let mut conn = redis_conn(&redis_url()).await;
    let layout = KeyLayout::new(prefix);
    let (pattern, _) = layout.meta_pattern();
    let metas: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    for meta in metas {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(&meta)
            .query_async(&mut conn)
            .await
            .unwrap();
        for f in fields.iter().filter(|f| f.starts_with("o:")) {
            let _: i64 = redis::cmd("HDEL")
                .arg(&meta)
                .arg(f)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    // One key on a server, one per master on a cluster.
    let decided: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", layout.decided_key(None)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!decided.is_empty(), "idem recorded decided ranges");
    for key in decided {
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// The in-order state of each entity: its distinct events sorted by seq and
/// applied one by one (each newer than the last, so per-entity order writes
/// every one of them).
fn in_order(records: &[SampleRecord], policy: &TopicPolicy) -> Model {
    let mut events: Vec<idem::event::Event> = records
        .iter()
        .map(|r| idem::event::decode(Some(&r.value), &Default::default(), 1 << 20).expect("valid"))
        .collect();
    events.sort_by(|a, b| (&a.entity, a.seq).cmp(&(&b.entity, b.seq)));
    events.dedup_by(|a, b| a.id == b.id);
    let mut model = Model::default();
    let per_entity = TopicPolicy {
        state_order: idem::effects::StateOrder::PerEntity,
        ..policy.clone()
    };
    for e in &events {
        let planned = policy.plan(e).expect("plannable");
        model.apply_effects(e, &planned, &per_entity);
    }
    model
}

/// The late status the per-entity rule loses (a status at seq 10 behind a
/// deposit at 11 is stale, yet nothing newer wrote `status`): with
/// `state.order = "per_field"` every account's status is what in-order
/// application gives, balances and ledgers stay exact, and the outcomes are
/// the model's. The same stream per entity follows the documented rule, and
/// on this seed loses some statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_field_order_keeps_every_late_status_among_deposits() {
    let topic = unique("perfield");
    create_topic(&topic, 3).await;
    let file = payments::write_config(&config_dir(&topic), &topic).unwrap();
    let spec = PaymentsSpec {
        events: 3_000,
        accounts: 60,
        duplicate_ratio: 0.2,
        out_of_order_ratio: 0.15,
        seed: 0x5747,
        prefix: topic.clone(),
    };
    let records = payments::generate(&spec);
    produce(&topic, &records).await;
    let per_entity = format!("{topic}-entity");
    let per_field = format!("{topic}-field");
    let a = Idem::spawn(
        &IdemOpts::new(&topic, &per_entity, &per_entity)
            .with("IDEM_CONFIG", file.to_str().unwrap()),
    );
    let b = Idem::spawn(
        &IdemOpts::new(&topic, &per_field, &per_field)
            .with("IDEM_CONFIG", file.to_str().unwrap())
            .with("IDEM__STATE__ORDER", "per_field"),
    );
    wait_caught_up(&per_entity, &topic, 3, CATCH_UP).await;
    wait_caught_up(&per_field, &topic, 3, CATCH_UP).await;

    let policy = policy_of(&file, &topic);
    let field_policy = TopicPolicy {
        state_order: idem::effects::StateOrder::PerField,
        ..policy.clone()
    };
    let want = in_order(&records, &policy);
    for (prefix, policy, process) in [(&per_entity, &policy, &a), (&per_field, &field_policy, &b)] {
        let (model, counts, points) = payments::oracle(&records, policy);
        assert_effects(prefix, &model, &points).await;
        for (outcome, n) in &counts {
            assert_eq!(
                process.outcome(&topic, *outcome).await,
                *n,
                "{prefix}: {outcome:?}"
            );
        }
    }
    let status = |views: &std::collections::BTreeMap<String, idem::store::EntityView>, e: &str| {
        views[e].state.get("status").cloned()
    };
    let entity_views = read_entities(&redis_url(), &per_entity, want.entities.keys()).await;
    let field_views = read_entities(&redis_url(), &per_field, want.entities.keys()).await;
    let mut lost_per_entity = 0;
    for (entity, m) in &want.entities {
        let expected = m.state.get("status").cloned();
        assert_eq!(status(&field_views, entity), expected, "{entity} per field");
        lost_per_entity += usize::from(status(&entity_views, entity) != expected);
    }
    assert!(
        lost_per_entity > 0,
        "the seed no longer swaps a status behind a deposit: choose another"
    );
    eprintln!(
        "per entity lost {lost_per_entity} of {} statuses; per field none",
        want.entities.len()
    );
    // inspect shows each field's writer on request, and only then.
    let (entity, m) = want
        .entities
        .iter()
        .find(|(_, m)| m.state.contains_key("status"))
        .expect("an account with a status");
    let env = [("IDEM_CONFIG", file.to_str().unwrap())];
    let out = idem_tool(
        &["inspect", "entity", entity, "--json", "--field-seqs"],
        &per_field,
        &env,
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["field_order"]["field_seqs"]["status"]
            .as_u64()
            .is_some(),
        "{json}"
    );
    assert_eq!(
        json["field_order"]["field_seqs_at"].as_u64(),
        m.seq,
        "{json}"
    );
    let out = idem_tool(&["inspect", "entity", entity, "--json"], &per_field, &env);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.get("field_order").is_none(), "{json}");
    let out = idem_tool(
        &["inspect", "entity", entity, "--field-seqs"],
        &per_field,
        &env,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("field seqs") && text.contains("  status @ "),
        "{text}"
    );
    a.terminate().await;
    b.terminate().await;
}

/// Order-independent merge: the events of 100 entities (merges with null
/// fields, replaces and deletes), each entity's shuffled and spread over 6
/// partitions by random keys, end in each entity's in-order state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_field_merges_spread_over_six_partitions_end_in_the_in_order_state() {
    let topic = unique("fieldmerge");
    create_topic(&topic, 6).await;
    let dir = config_dir(&topic);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("replace.toml");
    std::fs::write(
        &file,
        format!("[state]\norder = \"per_field\"\n\n[[effects]]\ntopic = \"{topic}\"\ntypes = [\"replace\"]\nstate = \"replace\"\n"),
    )
    .unwrap();
    let mut rng = Rng::new(0x6A27);
    let mut records = Vec::new();
    for trial in 0..100 {
        let entity = format!("{topic}:e{trial}");
        let n = 8 + rng.below(8);
        let mut events = Vec::new();
        for seq in 1..=n {
            let kind = match rng.below(10) {
                0 => "delete",
                1 | 2 => "replace",
                _ => "update",
            };
            let mut data = Vec::new();
            for f in 0..4 {
                match rng.below(4) {
                    0 => data.push(format!(r#""f{f}":"v{seq}""#)),
                    1 => data.push(format!(r#""f{f}":null"#)),
                    _ => {}
                }
            }
            let value = format!(
                r#"{{"id":"{entity}-{seq}","entity":"{entity}","seq":{seq},"type":"{kind}","data":{{{}}}}}"#,
                data.join(",")
            );
            events.push(value);
        }
        // A random arrival order, each record on a random partition.
        for i in (1..events.len()).rev() {
            events.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for value in events {
            records.push(SampleRecord {
                key: format!("k{}", rng.below(1_000_000)),
                value: value.into_bytes(),
            });
        }
    }
    produce(&topic, &records).await;
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic).with("IDEM_CONFIG", file.to_str().unwrap()),
    );
    wait_caught_up(&topic, &topic, 6, CATCH_UP).await;
    let want = in_order(&records, &policy_of(&file, &topic));
    let views = read_entities(&redis_url(), &topic, want.entities.keys()).await;
    let mut wrong = Vec::new();
    for (entity, m) in &want.entities {
        let got = &views[entity];
        if (&got.state, got.deleted) != (&m.state, m.deleted) {
            wrong.push(format!(
                "{entity}: redis {:?} {}, in order {:?} {}",
                got.state, got.deleted, m.state, m.deleted
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 100 differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        want.entities.values().any(|m| m.deleted)
            && want.entities.values().any(|m| !m.state.is_empty()),
        "the trials end in deleted and in live entities"
    );
    idem.terminate().await;
}
