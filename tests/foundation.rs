//! The foundation's promises, against a real broker, a real Redis and the
//! real `idem` binary: once per intent, crash safety, commit discipline,
//! safe replay, and bad records that never block a partition.

mod common;

use std::time::{Duration, Instant};

use common::*;
use idem::model::Outcome;
use idem::tools::sample::{generate, Rng, SampleSpec};

const CATCH_UP: Duration = Duration::from_secs(120);

fn spec(
    prefix: &str,
    events: usize,
    entities: usize,
    dups: f64,
    ooo: f64,
    seed: u64,
) -> SampleSpec {
    SampleSpec {
        events,
        entities,
        duplicate_ratio: dups,
        out_of_order_ratio: ooo,
        delete_ratio: 0.02,
        data_bytes: 16,
        seed,
        prefix: prefix.to_string(),
        zipf: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_reordered_events_apply_once() {
    let topic = unique("once");
    create_topic(&topic, 4).await;
    let records = generate(&spec(&topic, 6_000, 200, 0.30, 0.10, 11));
    let (model, counts) = oracle(&records);
    produce(&topic, &records).await;

    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 4, CATCH_UP).await;

    assert_matches_oracle(&redis_url(), &topic, &model).await;
    for outcome in [Outcome::Applied, Outcome::Duplicate, Outcome::Stale] {
        assert_eq!(
            idem.outcome(&topic, outcome).await,
            counts.get(&outcome).copied().unwrap_or(0),
            "{outcome:?} count"
        );
    }
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let topic = unique("crash");
    let partitions = 6;
    create_topic(&topic, partitions).await;
    let records = generate(&spec(&topic, 50_000, 1_000, 0.20, 0.05, 22));
    let (model, _) = oracle(&records);

    // Produce in slices while idem runs, so the kills land mid-stream.
    let producing = {
        let (topic, records) = (topic.clone(), records.clone());
        tokio::spawn(async move {
            for slice in records.chunks(records.len() / 8 + 1) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let opts =
        IdemOpts::new(&topic, &topic, &topic).with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "500");
    let mut rng = Rng::new(0xC0FFEE);
    let started = Instant::now();
    let mut kills = 0;
    for _ in 0..4 {
        let idem = Idem::spawn(&opts);
        // Kill only once this process is applying, at a random moment after
        // that (or at once if an earlier one already finished everything).
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
    let elapsed = started.elapsed();
    let duplicates = idem.outcome(&topic, Outcome::Duplicate).await;
    let applied_after_restart = idem.outcome(&topic, Outcome::Applied).await;

    assert_matches_oracle(&redis_url(), &topic, &model).await;
    assert_eq!(
        committed(&topic, &topic, partitions).await,
        end_offsets(&topic, partitions).await
    );
    eprintln!(
        "crash test: {} records, {kills} SIGKILLs, {:.1}s, {:.0} records/s overall; last process saw {duplicates} duplicates and applied {applied_after_restart}",
        records.len(),
        elapsed.as_secs_f64(),
        records.len() as f64 / elapsed.as_secs_f64()
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_never_lets_the_commit_pass_an_unapplied_event() {
    let topic = unique("outage");
    create_topic(&topic, 1).await;
    let mut redis = private_redis(None).await;
    let first = generate(&spec(&format!("{topic}-a"), 2_000, 50, 0.0, 0.0, 33));
    let second = generate(&spec(&format!("{topic}-b"), 2_000, 50, 0.0, 0.0, 34));
    let mut opts = IdemOpts::new(&topic, &topic, &topic);
    opts.redis_url = redis.url();
    produce(&topic, &first).await;
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    let applied_first = first.len() as i64;
    assert_eq!(committed(&topic, &topic, 1).await, vec![applied_first]);

    redis.kill();
    produce(&topic, &second).await;
    let retries_before = idem.counter("idem_retries_total", &[]).await.unwrap();
    // While Redis is down, sample the committed offset until idem has failed
    // and retried several times: it must stay at last done + 1.
    wait_until(
        "idem retried the failed batch several times",
        CATCH_UP,
        || async {
            assert_eq!(
                committed(&topic, &topic, 1).await,
                vec![applied_first],
                "commit moved while Redis was down"
            );
            idem.counter("idem_retries_total", &[]).await.unwrap() >= retries_before + 4
        },
    )
    .await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        first.len() as u64
    );

    redis.restart().await.unwrap();
    wait_caught_up(&topic, &topic, 1, CATCH_UP).await;
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    let (model, _) = oracle(&all);
    assert_matches_oracle(&redis.url(), &topic, &model).await;
    // Committed == last done offset + 1 == the end of the partition.
    assert_eq!(committed(&topic, &topic, 1).await, vec![all.len() as i64]);
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_offset_zero_applies_nothing_again() {
    let topic = unique("replay");
    create_topic(&topic, 3).await;
    let records = generate(&spec(&topic, 3_000, 100, 0.2, 0.05, 44));
    let (model, _) = oracle(&records);
    produce(&topic, &records).await;
    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    idem.terminate().await;
    assert_matches_oracle(&redis_url(), &topic, &model).await;

    // A new group reads the whole topic again from offset 0.
    let replay_group = format!("{topic}-replay");
    let idem = Idem::spawn(&IdemOpts::new(&topic, &replay_group, &topic));
    wait_caught_up(&replay_group, &topic, 3, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 0);
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 0);
    assert_eq!(
        idem.outcome(&topic, Outcome::Replayed).await,
        records.len() as u64,
        "every record read again is recognised by its offset (any group reads the same log)"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_window_expired_is_all_replayed() {
    let topic = unique("replay-expired");
    create_topic(&topic, 3).await;
    // No redelivered copies: each record is one intent.
    let records = generate(&spec(&topic, 2_000, 100, 0.0, 0.05, 55));
    let (model, _) = oracle(&records);
    produce(&topic, &records).await;
    let opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__DEDUPE__WINDOW", "300ms");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, 3, CATCH_UP).await;
    idem.terminate().await;

    wait_ids_expired(&topic).await;

    let replay_group = format!("{topic}-replay");
    let mut opts = opts.clone();
    opts.group = replay_group.clone();
    let idem = Idem::spawn(&opts);
    wait_caught_up(&replay_group, &topic, 3, CATCH_UP).await;
    assert_eq!(idem.outcome(&topic, Outcome::Applied).await, 0);
    assert_eq!(idem.outcome(&topic, Outcome::Duplicate).await, 0);
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
async fn bad_records_never_block_their_partition() {
    let topic = unique("bad");
    create_topic(&topic, 2).await;
    let good = generate(&spec(&topic, 400, 20, 0.0, 0.0, 66));
    let (model, _) = oracle(&good);
    let bad: Vec<&[u8]> = vec![
        b"{\"id\":\"x\",\"entity\":\"e\",\"seq\":1",
        b"\xff\xfe\xfd binary",
        b"[1,2,3]",
        br#"{"entity":"e","seq":1}"#,
        br#"{"id":"","entity":"e","seq":1}"#,
        br#"{"id":"x","entity":7,"seq":1}"#,
        br#"{"id":"x","entity":"e","seq":-3}"#,
        br#"{"id":"x","entity":"e","seq":99999999999999999999}"#,
        br#"{"id":"x","entity":"e","seq":"12"}"#,
        br#"{"id":"x","entity":"e","seq":1,"data":[1]}"#,
        br#"{"id":"x","entity":"e","seq":1,"ts":"now"}"#,
        b"",
    ];
    let mut raw: Vec<RawRecord<'_>> = Vec::new();
    for (i, r) in good.iter().enumerate() {
        raw.push((Some(r.key.as_bytes()), Some(&r.value)));
        if i % 30 == 0 {
            let b = bad[(i / 30) % bad.len()];
            // Same key as the good record: the bad one sits in the same partition.
            raw.push((Some(r.key.as_bytes()), Some(b)));
        }
    }
    raw.push((Some(b"k"), None)); // a record without a value
    let bad_count = raw.len() - good.len();
    produce_raw(&topic, &raw).await;

    let idem = Idem::spawn(&IdemOpts::new(&topic, &topic, &topic));
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;
    assert_eq!(
        idem.outcome(&topic, Outcome::Invalid).await,
        bad_count as u64
    );
    assert_eq!(
        idem.outcome(&topic, Outcome::Applied).await,
        good.len() as u64
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    idem.terminate().await;
}
