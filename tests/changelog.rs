//! The change stream (docs/changelog.md): the outbox the guard writes in
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

/// How many entries wait in the outboxes of `prefix`'s entities.
async fn outbox_depth(prefix: &str, entities: impl Iterator<Item = &String>) -> u64 {
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
    let mut depth = 0;
    for k in keys {
        depth += redis::cmd("XLEN")
            .arg(k)
            .query_async::<u64>(&mut conn)
            .await
            .unwrap();
    }
    depth
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
