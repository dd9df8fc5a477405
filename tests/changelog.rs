//! The change stream (docs/change-stream.md): the outbox the guard writes in
//! the same step as each change, and the relay that publishes it, against
//! the real broker and Redis (and the Redis Cluster in its pass).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use idem::event::{decode, FieldMap};
use idem::model::{Model, Outcome};
use idem::store::KeyLayout;
use idem::tools::sample::{generate, SampleRecord, SampleSpec};
use idem::tools::topics::TopicSpec;
use serde_json::Value;

const CATCH_UP: Duration = Duration::from_secs(120);

/// One record of a changelog topic, as a consumer reads it.
#[derive(Debug, Clone)]
struct Published {
    partition: i32,
    key: String,
    /// Header `id`: `<entity>#<version>`.
    id: String,
    form: String,
    record: Value,
}

impl Published {
    fn version(&self) -> u64 {
        self.record["seq"].as_u64().expect("seq is the version")
    }
}

/// Creates `topic` with `partitions`, its dead-letter topic and its
/// changelog `<topic>.changes`, as topics/ declares them.
async fn create_with_changelog(topic: &str, partitions: i32) {
    let mut spec = TopicSpec::new(topic, partitions);
    spec.dead_letter = Some(format!("{topic}.dlq"));
    spec.changelog = Some(format!("{topic}.changes"));
    idem::tools::topics::apply(&kafka(), &spec.with_companions(), true)
        .await
        .expect("create topics");
}

/// Every record of `<topic>.changes`, in partition order.
async fn published(topic: &str) -> Vec<Published> {
    let changes = format!("{topic}.changes");
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        idem::tools::topic_reader::read_topic(
            &kafka(),
            &changes,
            |r| {
                out.push(Published {
                    partition: r.partition,
                    key: String::from_utf8(r.key.clone().unwrap_or_default()).unwrap(),
                    id: r.header("id").unwrap_or_default().to_string(),
                    form: r.header("idem.form").unwrap_or_default().to_string(),
                    record: serde_json::from_slice(r.value.as_deref().unwrap_or_default())
                        .expect("a change record is JSON"),
                })
            },
            |_| {},
        )
        .expect("read the changelog");
        out
    })
    .await
    .unwrap()
}

/// Per entity, the ids of the events the model applies, in order: the
/// changes a changelog must carry (under merge, nothing is late or partial).
fn applied_events(records: &[SampleRecord]) -> (Model, BTreeMap<String, Vec<String>>) {
    let mut model = Model::default();
    let mut applied: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in records {
        let e = decode(Some(&r.value), &FieldMap::default(), 1 << 20).expect("valid");
        if model.apply(&e) == Outcome::Applied {
            applied.entry(e.entity.clone()).or_default().push(e.id);
        }
    }
    (model, applied)
}

fn stream(prefix: &str, events: usize, seed: u64) -> Vec<SampleRecord> {
    generate(&SampleSpec {
        events,
        entities: 40,
        duplicate_ratio: 0.3,
        out_of_order_ratio: 0.1,
        delete_ratio: 0.02,
        data_bytes: 8,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    })
}

/// Waits until the changelog holds `want` distinct change ids.
async fn wait_published(topic: &str, want: usize) -> Vec<Published> {
    let deadline = std::time::Instant::now() + CATCH_UP;
    loop {
        let got = published(topic).await;
        let distinct: std::collections::BTreeSet<&str> =
            got.iter().map(|p| p.id.as_str()).collect();
        if distinct.len() >= want {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the changelog holds {} distinct changes, {want} expected",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per entity, the changelog's first copies in order must be versions
/// 1, 2, 3, … of the model's applied events, each with its id and key.
fn assert_changes_are_the_applied_events(
    published: &[Published],
    applied: &BTreeMap<String, Vec<String>>,
) {
    let mut firsts: BTreeMap<String, Vec<&Published>> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in published {
        if seen.insert(p.id.clone()) {
            firsts.entry(p.key.clone()).or_default().push(p);
        }
    }
    assert_eq!(
        firsts.keys().collect::<Vec<_>>(),
        applied.keys().collect::<Vec<_>>(),
        "the entities with changes"
    );
    for (entity, events) in applied {
        let changes = &firsts[entity];
        let got: Vec<(u64, &str)> = changes
            .iter()
            .map(|p| {
                (
                    p.version(),
                    p.record["change"]["event"]["id"].as_str().unwrap(),
                )
            })
            .collect();
        let want: Vec<(u64, &str)> = events
            .iter()
            .enumerate()
            .map(|(i, id)| (i as u64 + 1, id.as_str()))
            .collect();
        assert_eq!(got, want, "{entity}'s changes, first copies in topic order");
        for p in changes {
            assert_eq!(p.id, format!("{entity}#{}", p.version()));
            assert_eq!(p.record["id"], p.id.as_str());
            assert_eq!(p.record["entity"], entity.as_str());
            assert_eq!(p.form, "change");
            assert_eq!(
                p.partition, changes[0].partition,
                "one partition per entity"
            );
        }
    }
}

/// The state of the last change of each entity is what Redis holds.
async fn assert_last_states_are_redis(prefix: &str, model: &Model, published: &[Published]) {
    let views = read_entities(&redis_url(), prefix, model.entities.keys()).await;
    let mut last: BTreeMap<&str, &Published> = BTreeMap::new();
    for p in published {
        let e = last.entry(p.key.as_str()).or_insert(p);
        if p.version() > e.version() {
            *e = p;
        }
    }
    for (entity, p) in last {
        let state: BTreeMap<String, String> =
            serde_json::from_value(p.record["data"].clone()).unwrap();
        assert_eq!(
            state, views[entity].state,
            "{entity}: the last change's state"
        );
        assert_eq!(
            p.record["type"] == "delete",
            views[entity].deleted,
            "{entity}: a delete is published as one"
        );
    }
}

/// A chained idem with the shipped config/changelog-consumer.toml, on
/// `topic`'s changelog into the prefix `<topic>-copy`, caught up: it
/// applied `changes` versions once each (the copies are duplicates), and
/// its view equals the source's (`prefix` `topic` in `source_url`) entity
/// for entity: the same state, the same deletes, the same counters, the
/// same members of set `tags` and the same entries of ledger `ledger`
/// (each entry's fields, in the order they were appended). Returns the
/// copy's view.
async fn assert_a_chained_idem_rebuilds_the_view(
    source_url: &str,
    topic: &str,
    entities: &BTreeMap<String, idem::model::EntityModel>,
    changes: usize,
) -> BTreeMap<String, idem::store::EntityView> {
    let changelog = format!("{topic}.changes");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/changelog-consumer.toml"
    ))
    .unwrap();
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}.toml", unique("chained")));
    std::fs::write(&file, shipped.replace("orders.changes", &changelog)).unwrap();
    let copy = format!("{topic}-copy");
    let chained = Idem::spawn(
        &IdemOpts::new(&changelog, &copy, &copy).with("IDEM_CONFIG", file.to_str().unwrap()),
    );
    wait_caught_up(&copy, &changelog, 3, CATCH_UP).await;
    assert_eq!(
        chained.outcome(&changelog, Outcome::Applied).await,
        changes as u64,
        "every change applied once; the copies are duplicates"
    );
    let source = read_entities(source_url, topic, entities.keys()).await;
    let view = read_entities(&redis_url(), &copy, entities.keys()).await;
    for (entity, want) in &source {
        let got = &view[entity];
        assert_eq!(
            (&got.state, got.deleted),
            (&want.state, want.deleted),
            "{entity}"
        );
        assert_eq!(
            effects_of(&redis_url(), &copy, entity).await,
            effects_of(source_url, topic, entity).await,
            "{entity}: counters, sets and ledger entries"
        );
    }
    chained.terminate().await;
    view
}

/// An entity's counters, the members of its set `tags` and the entries of
/// its ledger `ledger` (each entry's fields sorted: a copy's entry has the
/// source's fields, in the JSON object's order).
async fn effects_of(url: &str, prefix: &str, entity: &str) -> idem::effects::CommutativeView {
    let mut conn = redis_conn(url).await;
    let mut view = idem::store::commutative::read(
        &mut conn,
        &KeyLayout::new(prefix),
        entity,
        &["ledger".to_string()],
        &["tags".to_string()],
    )
    .await
    .unwrap();
    for entry in view.ledgers.values_mut().flatten() {
        entry.sort();
    }
    // Which seq last touched a member is each keyspace's own (the copy's
    // are versions).
    view.set_seqs.clear();
    view
}

/// How many entries wait in each outbox of `prefix`'s entities (one
/// outbox standalone, one per slot on a cluster).
async fn outbox_depths(prefix: &str, entities: impl Iterator<Item = &String>) -> Vec<u64> {
    let layout = KeyLayout::new(prefix);
    let cluster = redis_mode(&redis_url()) == idem::config::RedisMode::Cluster;
    let keys: std::collections::BTreeSet<String> = entities
        .map(|e| {
            layout.outbox_key(
                cluster.then(|| idem::store::hash_slot(layout.entity_base(e).as_bytes())),
            )
        })
        .collect();
    let mut conn = redis_conn(&redis_url()).await;
    let mut depths = Vec::new();
    for k in keys {
        depths.push(
            redis::cmd("XLEN")
                .arg(k)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap(),
        );
    }
    depths
}

/// How many entries wait in the outboxes of `prefix`'s entities.
async fn outbox_depth(prefix: &str, entities: impl Iterator<Item = &String>) -> u64 {
    outbox_depths(prefix, entities).await.iter().sum()
}

/// A stream with 30% redeliveries and 10% reordering through one idem with
/// the changelog on: per entity the changelog's first copies are versions
/// 1, 2, 3, … of exactly the events the model applies, in order, with
/// their ids in the `id` header and the entity as the key; nothing for a
/// duplicate or a stale event; the last change's state is Redis's; and the
/// outbox is drained (every entry deleted once acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_published_in_version_order_with_their_ids() {
    let topic = unique("chg-order");
    create_with_changelog(&topic, 3).await;
    let records = stream(&topic, 1_500, 29);
    let (model, applied) = applied_events(&records);
    let changes: usize = applied.values().map(Vec::len).sum();
    produce(&topic, &records).await;
    let idem =
        Idem::spawn(&IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic));
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let published = wait_published(&topic, changes).await;
    assert_changes_are_the_applied_events(&published, &applied);
    assert_eq!(published.len(), changes, "one relay, no crash: no copy");
    assert!(
        published
            .iter()
            .all(|p| p.record["change"]["event"]["ts"] == "2026-11-26T12:00:00Z"),
        "each change carries its event's time"
    );
    assert_last_states_are_redis(&topic, &model, &published).await;
    let (duplicates, stale) = (
        idem.outcome(&topic, Outcome::Duplicate).await,
        idem.outcome(&topic, Outcome::Stale).await,
    );
    assert!(
        duplicates > 0 && stale > 0,
        "{duplicates} duplicates, {stale} stale: none published"
    );
    wait_until("the outbox is drained", CATCH_UP, || async {
        outbox_depth(&topic, model.entities.keys()).await == 0
    })
    .await;
    assert_eq!(
        idem.counter(
            "idem_changes_published_total",
            &[("topic", &format!("{topic}.changes"))]
        )
        .await,
        Some(changes as u64)
    );
    idem.terminate().await;
}

/// `idem replay` of `topic`'s group (named like the topic) to the earliest
/// offsets, once the group is empty.
async fn replay_from_the_start(topic: &str) {
    wait_group_empty(topic, topic).await;
    let out = idem_tool(
        &[
            "replay",
            "--topic",
            topic,
            "--group",
            topic,
            "--to-earliest",
            "--execute",
        ],
        topic,
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaying the source topic from offset 0, after the dedupe window has
/// forgotten every id, adds no change: every record is `replayed` (the
/// entities' offset marks), so the changelog and the outbox stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_source_after_the_window_adds_no_change() {
    let topic = unique("chg-replay");
    create_with_changelog(&topic, 3).await;
    let records = stream(&topic, 600, 31);
    let (model, applied) = applied_events(&records);
    let changes: usize = applied.values().map(Vec::len).sum();
    produce(&topic, &records).await;
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__CHANGELOG__TOPICS", &topic)
        .with("IDEM__DEDUPE__WINDOW", "1s");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let before = wait_published(&topic, changes).await;
    assert_changes_are_the_applied_events(&before, &applied);
    idem.terminate().await;
    wait_ids_expired(&topic).await;
    replay_from_the_start(&topic).await;

    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        records.len() as u64
    );
    assert_eq!(outbox_depth(&topic, model.entities.keys()).await, 0);
    idem.terminate().await;
    assert_eq!(
        published(&topic).await.len(),
        before.len(),
        "no change added"
    );
}

/// `idem relay` for `topic`'s key prefix, its metrics on `port`.
fn spawn_relay(topic: &str, port: u16) -> IdemProcess {
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}.log", unique(&format!("{topic}-relay"))));
    let cmd = IdemCommand::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_idem")),
        &brokers(),
        topic,
        topic,
    )
    .clean_env()
    .fast_recovery()
    .redis(&redis_url(), redis_mode(&redis_url()), topic)
    .metrics_port(port)
    .env("IDEM__CHANGELOG__TOPICS", topic)
    .subcommand("relay");
    IdemProcess::start(&cmd, &log, port).expect("spawn idem relay")
}

async fn lease_held(metrics: Option<String>) -> bool {
    metrics.is_some_and(|m| sum_metric(&m, "idem_relay_lease_held", &[]) == 1)
}

/// Two relays on one outbox (`idem run`'s and an `idem relay`): the holder
/// is paused (SIGSTOP) past its lease, the other takes over and publishes,
/// then the first wakes up. Nothing is lost, and the copies are at most
/// one round's (`relay::ROUND_ENTRIES`) per hand-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_lose_nothing_and_copy_at_most_a_round() {
    let topic = unique("chg-relays");
    create_with_changelog(&topic, 3).await;
    let records = stream(&topic, 4_000, 37);
    let (_, applied) = applied_events(&records);
    let changes: usize = applied.values().map(Vec::len).sum();
    let idem =
        Idem::spawn(&IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic));
    wait_until("idem's relay holds the lease", CATCH_UP, || async {
        lease_held(idem.metrics().await).await
    })
    .await;
    let relay_port = free_port();
    let relay = spawn_relay(&topic, relay_port);
    wait_until("the second relay serves metrics", CATCH_UP, || async {
        relay.metrics().await.is_some()
    })
    .await;
    assert!(
        !lease_held(relay.metrics().await).await,
        "one holder at a time"
    );
    produce(&topic, &records).await;
    wait_until("some changes are published", CATCH_UP, || async {
        idem.counter("idem_changes_published_total", &[])
            .await
            .unwrap_or(0)
            > 0
    })
    .await;
    idem.stop_process();
    wait_until(
        "the second relay takes the lease over",
        CATCH_UP,
        || async { lease_held(relay.metrics().await).await },
    )
    .await;
    idem.continue_process();
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let published = wait_published(&topic, changes).await;
    assert_changes_are_the_applied_events(&published, &applied);
    let copies = published.len() - changes;
    assert!(copies <= idem::relay::ROUND_ENTRIES, "{copies} copies");
    eprintln!("two relays: {changes} changes, {copies} copies after the hand-over");
    assert!(relay.terminate().await, "the relay stops cleanly");
    idem.terminate().await;
}

/// End to end: 30% redeliveries, 10% reordering, idem SIGKILLed three times
/// while it consumes and its relay publishes. The changelog's distinct
/// change ids are exactly the model's applied events, first copies in
/// version order. Then a second idem, with the shipped
/// config/changelog-consumer.toml, materialises the changelog under another
/// prefix: entity for entity the same state, the same deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_idem_publishes_every_change_and_a_chained_idem_rebuilds_the_view() {
    let topic = unique("chg-e2e");
    create_with_changelog(&topic, 3).await;
    let records = stream(&topic, 6_000, 41);
    let (model, applied) = applied_events(&records);
    let changes: usize = applied.values().map(Vec::len).sum();
    // Small batches, so a kill finds work in flight; a quarter of the
    // stream arrives before each life, so each has new work to be killed in.
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__CHANGELOG__TOPICS", &topic)
        .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "50");
    let quarter = records.len().div_ceil(4);
    for (life, part) in records.chunks(quarter).enumerate() {
        produce(&topic, part).await;
        if life == 3 {
            break;
        }
        let idem = Idem::spawn(&opts);
        wait_until("idem applies and publishes", CATCH_UP, || async {
            idem.counter("idem_changes_published_total", &[])
                .await
                .unwrap_or(0)
                > 0
                && idem.outcome(&topic, Outcome::Applied).await > 0
        })
        .await;
        let in_changelog = published(&topic).await.len();
        idem.kill();
        eprintln!("kill {}: {in_changelog} records in the changelog", life + 1);
    }
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let published = wait_published(&topic, changes).await;
    assert_changes_are_the_applied_events(&published, &applied);
    assert_last_states_are_redis(&topic, &model, &published).await;
    eprintln!(
        "end to end: {changes} changes, {} copies on the wire after 3 kills",
        published.len() - changes
    );
    idem.terminate().await;

    // The chained idem, with the shipped config for this changelog.
    let view =
        assert_a_chained_idem_rebuilds_the_view(&redis_url(), &topic, &model.entities, changes)
            .await;
    for (entity, versions) in &applied {
        assert_eq!(
            view[entity].seq,
            Some(versions.len() as u64),
            "{entity}: its last version"
        );
    }
}

/// A payments stream (balances, a ledger, loyalty points from a commutative
/// custom effect, late deposits) and tag events (a set's adds and removes),
/// with redeliveries and reordering, through an idem with the changelog on:
/// a chained idem with the shipped config ends with the same counters, set
/// members and ledger entries as the source, entity for entity, besides
/// the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_idem_rebuilds_counters_sets_and_ledgers() {
    let topic = unique("chg-fx");
    create_with_changelog(&topic, 3).await;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&topic);
    let file = idem_testbench::payments::write_config(&dir, &topic).unwrap();
    let mut config = std::fs::read_to_string(&file).unwrap();
    for (kind, list) in [("tagged", "set_add"), ("untagged", "set_remove")] {
        config.push_str(&format!(
            "\n[[effects]]\ntopic = \"{topic}\"\ntypes = [\"{kind}\"]\nstate = \"keep\"\n{list} = [{{ set = \"tags\", from = \"/tag\" }}]\n"
        ));
    }
    std::fs::write(&file, config).unwrap();
    let mut records = idem_testbench::payments::generate(&idem_testbench::payments::PaymentsSpec {
        events: 3_000,
        accounts: 30,
        duplicate_ratio: 0.3,
        out_of_order_ratio: 0.1,
        seed: 29,
        prefix: topic.clone(),
    });
    records.extend(tag_stream(&topic, 1_000, 20));

    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM_CONFIG", file.to_str().unwrap())
            .with("IDEM__CHANGELOG__TOPICS", &topic),
    );
    produce(&topic, &records).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let mut changes = 0;
    for outcome in [Outcome::Applied, Outcome::Late] {
        changes += idem.outcome(&topic, outcome).await as usize;
    }
    assert!(
        idem.outcome(&topic, Outcome::Late).await > 10,
        "the stream has late deposits and tags"
    );
    let published = wait_published(&topic, changes).await;
    idem.terminate().await;
    let entities: BTreeMap<String, idem::model::EntityModel> = published
        .iter()
        .map(|p| (p.key.clone(), Default::default()))
        .collect();

    assert_a_chained_idem_rebuilds_the_view(&redis_url(), &topic, &entities, changes).await;
    // What was compared is not empty: balances, points, members, entries.
    let mut seen = (false, false, false, false);
    for entity in entities.keys() {
        let fx = effects_of(&redis_url(), &topic, entity).await;
        seen.0 |= fx.counters.contains_key("balance");
        seen.1 |= fx.counters.contains_key("points");
        seen.2 |= fx.sets.get("tags").is_some_and(|t| !t.is_empty());
        seen.3 |= fx.ledgers.get("ledger").is_some_and(|l| l.len() > 10);
    }
    assert_eq!(
        seen,
        (true, true, true, true),
        "balance, points, tags, ledger"
    );
}

/// `events` tag events over `users` entities (`tagged` / `untagged` of one
/// of four tags), each entity's seqs 1, 2, 3, …, with 30% redeliveries and
/// 10% reordering.
fn tag_stream(prefix: &str, events: usize, users: usize) -> Vec<SampleRecord> {
    let mut rng = idem::tools::sample::Rng::new(7);
    let mut shuffler = idem::tools::sample::Shuffler::new(users, 0.3, 0.1, events * 2);
    let mut next_seq = vec![1u64; users];
    for i in 0..events {
        let u = rng.below(users as u64) as usize;
        let seq = next_seq[u];
        next_seq[u] += 1;
        let entity = format!("{prefix}:user-{u}");
        let kind = if rng.chance(0.6) {
            "tagged"
        } else {
            "untagged"
        };
        let tag = ["a", "b", "c", "d"][rng.below(4) as usize];
        let value = format!(
            r#"{{"id":"{prefix}-t{i}","entity":"{entity}","seq":{seq},"type":"{kind}","data":{{"tag":"{tag}"}}}}"#
        );
        shuffler.push(
            &mut rng,
            u,
            SampleRecord {
                key: entity,
                value: value.into_bytes(),
            },
        );
    }
    shuffler.finish()
}

/// A group member that writes no changes is named by the members that do:
/// first a plain consumer in the group (as an idem older than the changelog
/// looks: it holds partitions and does not register), then an idem whose
/// config has no changelog. Each time `idem_changelog_unpublished_partitions`
/// counts the partitions it holds and `idem check` warns with the way out;
/// once only publishing members are left both say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_writes_no_changes_is_named_by_the_others() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = unique("chg-members");
    create_with_changelog(&topic, 4).await;
    let with_changelog =
        IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic);
    let idem = Idem::spawn(&with_changelog);
    let unpublished = || async {
        idem.counter(
            "idem_changelog_unpublished_partitions",
            &[("topic", topic.as_str())],
        )
        .await
    };
    let check = || {
        let out = idem_tool(
            &["check"],
            &topic,
            &[
                ("IDEM__KAFKA__TOPICS", topic.as_str()),
                ("IDEM__KAFKA__GROUP_ID", topic.as_str()),
                ("IDEM__CHANGELOG__TOPICS", topic.as_str()),
            ],
        );
        // The `changelog members` lines, as "<status> <detail>".
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (status, rest) = l.split_once(' ')?;
                let detail = rest.trim_start().strip_prefix("changelog members")?;
                Some(format!("{status} {}\n", detail.trim_start()))
            })
            .collect::<String>()
    };
    wait_until(
        "idem reports every partition published",
        CATCH_UP,
        || async {
            unpublished().await == Some(0)
                && check().contains(&format!("ok {topic}: all 4 partitions"))
        },
    )
    .await;

    // An older member: in the group, holding partitions, not registering.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let older = {
        let (topic, stop) = (topic.clone(), stop.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = idem::kafka::base_config(&kafka())
                .set("group.id", &topic)
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                consumer.poll(Duration::from_millis(100));
            }
        })
    };
    wait_until(
        "idem names the older member's partitions",
        CATCH_UP,
        || async { unpublished().await.unwrap_or(0) > 0 },
    )
    .await;
    let said = check();
    assert!(
        said.starts_with("warn ")
            && said.contains("held by no member that registers")
            && said.contains(&format!(
                "idem changelog snapshot --topic {topic} --execute"
            )),
        "{said}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    older.join().unwrap();
    wait_until(
        "the older member's partitions come back",
        CATCH_UP,
        || async { unpublished().await == Some(0) },
    )
    .await;

    // A member of this version whose config has no changelog yet.
    let without = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_until(
        "idem names the member without the changelog",
        CATCH_UP,
        || async { unpublished().await.unwrap_or(0) > 0 },
    )
    .await;
    let said = check();
    assert!(
        said.starts_with("warn ") && said.contains("held by members without changelog.topics"),
        "{said}"
    );
    without.terminate().await;
    wait_until("only publishing members are left", CATCH_UP, || async {
        unpublished().await == Some(0)
    })
    .await;
    idem.terminate().await;
}

/// A fatal error of the relay's idempotent producer (injected with
/// librdkafka's test hook: a broker makes one only for a refused sequence or
/// a missing `IdempotentWrite` ACL) does not stop the changelog: the next
/// round replaces the producer, and every change in the outbox is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_producer_failed_fatally_publishes_with_a_new_one() {
    use idem::relay::{Relay, Round};
    use rdkafka::bindings::{rd_kafka_resp_err_t, rd_kafka_test_fatal_error};
    use rdkafka::producer::Producer;
    let topic = unique("chg-fatal");
    create_with_changelog(&topic, 3).await;
    // Changes in the outbox and no relay: a snapshot of what an idem
    // without the changelog applied.
    let records = stream(&topic, 300, 53);
    let (model, _) = applied_events(&records);
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    produce(&topic, &records).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    idem.terminate().await;
    let out = idem_tool(
        &["changelog", "snapshot", "--topic", &topic, "--execute"],
        &topic,
        &[("IDEM__CHANGELOG__TOPICS", &topic)],
    );
    assert!(out.status.success(), "{out:?}");

    let mut env: std::collections::HashMap<String, String> = redis_env(&redis_url())
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    for (k, v) in [
        ("IDEM__KAFKA__BROKERS", brokers()),
        ("IDEM__KAFKA__TOPICS", topic.clone()),
        ("IDEM__KAFKA__GROUP_ID", topic.clone()),
        ("IDEM__REDIS__KEY_PREFIX", topic.clone()),
        ("IDEM__CHANGELOG__TOPICS", topic.clone()),
    ] {
        env.insert(k.to_string(), v);
    }
    let config = std::sync::Arc::new(idem::config::Config::load(None, &env).unwrap());
    let mut relay = Relay::connect(config).await.unwrap();
    let injected = unsafe {
        rd_kafka_test_fatal_error(
            relay.producer().client().native_ptr(),
            rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            c"injected by the test".as_ptr(),
        )
    };
    assert_eq!(injected, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    assert!(relay.producer().client().fatal_error().is_some());
    let mut rounds = Vec::new();
    for _ in 0..20 {
        let round = relay.round().await;
        rounds.push(format!("{round:?}"));
        if matches!(round, Ok(Round::Idle)) {
            break;
        }
    }
    assert_eq!(
        rounds.last().map(String::as_str),
        Some("Ok(Idle)"),
        "{rounds:?}"
    );
    assert!(relay.producer().client().fatal_error().is_none());
    let published = wait_published(&topic, model.entities.len()).await;
    assert!(published
        .iter()
        .all(|p| p.record["change"]["kind"] == "snapshot"));
}

/// The relay cannot publish for 20 s: the changelog topic is missing (the
/// suite shares one broker, so the topic is made unavailable, not the
/// broker), then created. Meanwhile each outbox grows to
/// `changelog.max_outbox` and no further than the changes of the batches in
/// flight past it (the depth is the one the batch's calls found),
/// consumption pauses with records left, `/readyz` names the bound and
/// the errors are counted; once the topic exists every change is
/// published, in version order, and the outbox drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_changelog_topic_pauses_consumption_at_the_bound_and_loses_nothing() {
    const BOUND: u64 = 100;
    const BATCH: u64 = 20;
    let topic = unique("chg-outage");
    create_topic(&topic, 3).await; // the source and its dead letters; no changelog yet
                                   // Few entities, so on a cluster too an outbox (one per slot) reaches the bound.
    let records = generate(&SampleSpec {
        events: 2_000,
        entities: 4,
        duplicate_ratio: 0.3,
        out_of_order_ratio: 0.1,
        delete_ratio: 0.02,
        data_bytes: 8,
        seed: 43,
        prefix: topic.clone(),
        zipf: None,
    });
    let (model, applied) = applied_events(&records);
    let changes: usize = applied.values().map(Vec::len).sum();
    produce(&topic, &records).await;
    let idem = Idem::spawn(
        &IdemOpts::new(&topic, &topic, &topic)
            .with("IDEM__CHANGELOG__TOPICS", &topic)
            .with("IDEM__CHANGELOG__MAX_OUTBOX", &BOUND.to_string())
            .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", &BATCH.to_string()),
    );
    wait_until("/readyz names the outbox bound", CATCH_UP, || async {
        http_get(idem.metrics_port, "/readyz")
            .await
            .is_some_and(|r| r.contains("changelog.max_outbox = 100"))
    })
    .await;
    let outage = std::time::Instant::now();
    let mut deepest = 0;
    while outage.elapsed() < Duration::from_secs(20) {
        let depths = outbox_depths(&topic, model.entities.keys()).await;
        deepest = deepest.max(depths.iter().copied().max().unwrap_or(0));
        assert!(deepest <= BOUND + 2 * BATCH, "an outbox holds {deepest}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(deepest >= BOUND, "the outbox reached the bound: {deepest}");
    let left: i64 = end_offsets(&topic, 3)
        .await
        .iter()
        .zip(committed(&topic, &topic, 3).await)
        .map(|(end, done)| end - done.max(0))
        .sum();
    assert!(left > 0, "consumption paused with records left");
    let errors = idem
        .counter(
            "idem_changelog_publish_errors_total",
            &[("kind", "unknown_topic")],
        )
        .await
        .unwrap_or(0);
    assert!(errors > 0, "the failed rounds are counted");
    let waiting = sum_metric(
        &idem.metrics().await.unwrap_or_default(),
        "idem_changelog_outbox_entries",
        &[],
    );
    assert!(
        waiting >= BOUND,
        "the gauge shows the waiting changes: {waiting}"
    );
    eprintln!("outage: outboxes at most {deepest} (bound {BOUND}), {left} records left, {errors} failed rounds");
    // The operator's view of it: `idem inspect outbox`.
    let out = idem_tool(&["inspect", "outbox", "--json"], &topic, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    let depths = outbox_depths(&topic, model.entities.keys()).await;
    assert_eq!(
        inspected["entries"].as_u64(),
        Some(depths.iter().sum::<u64>()),
        "{inspected}"
    );
    let deepest_inspected = &inspected["outboxes"][0];
    assert_eq!(
        deepest_inspected["depth"].as_u64(),
        depths.iter().max().copied()
    );
    let oldest = deepest_inspected["oldest"]["id"]
        .as_str()
        .unwrap_or_default();
    assert!(
        applied.keys().any(|e| oldest.starts_with(&format!("{e}#"))),
        "the oldest change is named by its id: {oldest}"
    );
    assert!(
        deepest_inspected["oldest"]["age_seconds"].as_f64().unwrap() >= 1.0,
        "{inspected}"
    );
    assert!(
        inspected["lease"]["holder"].as_str().is_some(),
        "idem's relay holds the lease: {inspected}"
    );

    let spec = TopicSpec::new(format!("{topic}.changes"), 3);
    idem::tools::topics::apply(&kafka(), &[spec], true)
        .await
        .expect("create the changelog topic");
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let published = wait_published(&topic, changes).await;
    assert_changes_are_the_applied_events(&published, &applied);
    wait_until("the outbox is drained", CATCH_UP, || async {
        outbox_depth(&topic, model.entities.keys()).await == 0
    })
    .await;
    wait_until("/readyz is ready again", CATCH_UP, || async {
        http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    idem.terminate().await;
}

/// SAVE on `redis` (synchronous: done when it answers, an error if it
/// failed), and a copy of the dump to restore later.
async fn save_snapshot(redis: &PrivateRedis) -> std::path::PathBuf {
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    let saved = redis.dir().join("snapshot-halfway.rdb");
    std::fs::copy(redis.dir().join("dump.rdb"), &saved).unwrap();
    saved
}

/// Redis rollback: the source's Redis (private, without persistence) is
/// restored from a snapshot taken a third of the way, after two thirds
/// were applied and published. idem notices, rewinds and applies the
/// second third again: its changes come out again under the same versions,
/// with the same content (one partition per entity, ids still in the
/// window), so under ids already published, and a deduplicating consumer
/// drops the copies (the guarantee across a rollback, docs/change-stream.md).
/// A chained idem ends with the source's view, entity for entity, every
/// version applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_view_stays_equal_across_a_snapshot_restore_of_the_source() {
    chained_view_across_a_rollback(Rollback::ToSnapshot).await;
}

/// The same when the source's Redis restarts empty after two thirds: idem
/// notices (no epoch marker), re-reads every partition from its start, and
/// re-derives every change under the version it had: all copies, dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_view_stays_equal_across_an_empty_restart_of_the_source() {
    chained_view_across_a_rollback(Rollback::ToEmpty).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rollback {
    /// Restored from a snapshot taken a third of the way.
    ToSnapshot,
    /// Restarted with nothing.
    ToEmpty,
}

async fn chained_view_across_a_rollback(rollback: Rollback) {
    let topic = unique("chg-rollback");
    create_with_changelog(&topic, 3).await;
    let mut redis = PrivateRedis::start_with(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
        "none",
        None,
    )
    .await
    .expect("private redis-server");
    let records = stream(&topic, 3_000, 47);
    let (model, applied) = applied_events(&records);
    let changes: usize = applied.values().map(Vec::len).sum();
    let (a, rest) = records.split_at(1_000);
    let (b, c) = rest.split_at(1_000);
    let count = |upto: &[SampleRecord]| applied_events(upto).1.values().map(Vec::len).sum();
    let mut opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic);
    opts.redis_url = redis.url();
    let idem = Idem::spawn(&opts);
    produce(&topic, a).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    wait_published(&topic, count(a)).await;
    let halfway = match rollback {
        Rollback::ToSnapshot => Some(save_snapshot(&redis).await),
        Rollback::ToEmpty => None,
    };
    produce(&topic, b).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    wait_published(&topic, count(&records[..2_000])).await;
    redis.kill();
    let dump = redis.dir().join("dump.rdb");
    match &halfway {
        Some(snapshot) => drop(std::fs::copy(snapshot, &dump).unwrap()),
        None => drop(std::fs::remove_file(&dump)),
    }
    redis.restart().await.unwrap();
    produce(&topic, c).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let published = wait_published(&topic, changes).await;
    assert_changes_are_the_applied_events(&published, &applied);
    let cause = match rollback {
        Rollback::ToSnapshot => "rolled_back",
        Rollback::ToEmpty => "lost",
    };
    let rewinds = idem
        .counter("idem_redis_rewinds_total", &[("cause", cause)])
        .await
        .unwrap_or(0);
    assert!(
        rewinds >= 1,
        "idem noticed the {rollback:?}: {rewinds} rewinds"
    );
    eprintln!(
        "{rollback:?}: {changes} changes, {} copies on the wire (re-derived)",
        published.len() - changes
    );
    idem.terminate().await;
    assert_a_chained_idem_rebuilds_the_view(&redis.url(), &topic, &model.entities, changes).await;
}

/// Bootstrapping a consumer: a third of the stream applied with the
/// changelog off, a third with it on, then `idem changelog snapshot
/// --execute` while idem runs, then the last third. The snapshot writes one
/// change (`kind = "snapshot"`) per entity under its next version; per
/// entity the changelog's versions are dense and in order; a chained idem
/// that reads the changelog from the start, with the shipped config, ends
/// with the source's view entity for entity (state, deleted), every
/// version applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_bootstraps_a_chained_view_of_what_was_applied_before_the_changelog() {
    let topic = unique("chg-snapshot");
    create_with_changelog(&topic, 3).await;
    let records = stream(&topic, 3_000, 53);
    let (before, rest) = records.split_at(1_000);
    let (during, after) = rest.split_at(1_000);
    produce(&topic, before).await;
    let off = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    off.terminate().await;

    let on = IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic);
    let idem = Idem::spawn(&on);
    produce(&topic, during).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    let out = idem_tool(
        &["changelog", "snapshot", "--topic", &topic, "--execute"],
        &topic,
        &[("IDEM__CHANGELOG__TOPICS", &topic)],
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entities: std::collections::BTreeSet<String> = records[..2_000]
        .iter()
        .map(|r| {
            decode(Some(&r.value), &FieldMap::default(), 1 << 20)
                .unwrap()
                .entity
        })
        .collect();
    assert!(
        said.starts_with(&format!("wrote {} snapshot changes", entities.len())),
        "{said}"
    );
    produce(&topic, after).await;
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;

    // Every change made with the changelog on, plus one per entity.
    let mut model = Model::default();
    let mut with_changelog = 0;
    for (i, r) in records.iter().enumerate() {
        let e = decode(Some(&r.value), &FieldMap::default(), 1 << 20).unwrap();
        if model.apply(&e) == Outcome::Applied && i >= 1_000 {
            with_changelog += 1;
        }
    }
    let changes = with_changelog + entities.len();
    let published = wait_published(&topic, changes).await;
    let snapshots = published
        .iter()
        .filter(|p| p.record["change"]["kind"] == "snapshot")
        .count();
    assert_eq!(snapshots, entities.len(), "one snapshot change per entity");
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &published {
        let seen = last.entry(&p.key).or_insert(0);
        if p.version() > *seen {
            assert!(
                p.version() == *seen + 1,
                "{}: version {} after {seen}",
                p.key,
                p.version()
            );
            *seen = p.version();
        }
    }
    idem.terminate().await;
    assert_a_chained_idem_rebuilds_the_view(&redis_url(), &topic, &model.entities, changes).await;
}

/// An entity whose state has more fields than a Lua call can pass as
/// pairs (3,000): its changes carry the whole state all the same (the
/// script sends it as one JSON field), so a chained view stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_with_thousands_of_fields_is_published_whole() {
    const FIELDS: usize = 3_500;
    let topic = unique("chg-wide");
    create_with_changelog(&topic, 1).await;
    let wide: serde_json::Map<String, Value> = (0..FIELDS)
        .map(|i| (format!("f{i}"), Value::from(format!("v{i}"))))
        .collect();
    let first = serde_json::json!({"id": "w-1", "entity": "wide", "seq": 1, "data": wide});
    let second =
        serde_json::json!({"id": "w-2", "entity": "wide", "seq": 2, "data": {"f0": "changed"}});
    let narrow = serde_json::json!({"id": "n-1", "entity": "narrow", "seq": 1, "data": {"a": "1"}});
    let values: Vec<Vec<u8>> = [first, second, narrow]
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    let raw: Vec<RawRecord<'_>> = values
        .iter()
        .zip([&b"wide"[..], b"wide", b"narrow"])
        .map(|(v, k)| (Some(k), Some(&v[..])))
        .collect();
    produce_raw(&topic, &raw).await;
    let idem =
        Idem::spawn(&IdemOpts::new(&topic, &topic, &topic).with("IDEM__CHANGELOG__TOPICS", &topic));
    let published = wait_published(&topic, 3).await;
    let by_id: BTreeMap<&str, &Value> = published
        .iter()
        .map(|p| (p.id.as_str(), &p.record))
        .collect();
    for (id, f0) in [("wide#1", "v0"), ("wide#2", "changed")] {
        let data = by_id[id]["data"].as_object().unwrap();
        assert_eq!(data.len(), FIELDS, "{id}: the whole state");
        assert_eq!(data["f0"], f0, "{id}");
        assert_eq!(data["f3499"], "v3499", "{id}");
    }
    assert_eq!(by_id["narrow#1"]["data"], serde_json::json!({"a": "1"}));
    idem.terminate().await;
}
