//! Kafka 4's consumer group protocol (KIP-848) against the classic one:
//! static membership under each, and a running group moved from one to the
//! other an instance at a time. The storm, the SIGTERM hand-over and the
//! standby run under both protocols in tests/group.rs and
//! tests/observability.rs.

mod common;

use std::time::Duration;

use common::*;
use idem::model::{Model, Outcome};
use idem::tools::sample::SampleRecord;

const CATCH_UP: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_killed_and_restarted_at_once_serves_again() {
    static_member_restarted_at_once("classic").await;
}

/// Under the consumer protocol the broker keeps the killed member's
/// `group.instance.id` until its session expires and fences the newcomer
/// with UNRELEASED_INSTANCE_ID, fatal in librdkafka: idem replaces its
/// consumer with a backoff until the id is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_killed_and_restarted_at_once_serves_again_under_the_consumer_protocol() {
    static_member_restarted_at_once("consumer").await;
}

/// A pod SIGKILLed mid-stream and started again at once under its name:
/// every record ends applied exactly once, and the new process owns every
/// partition and is ready.
async fn static_member_restarted_at_once(protocol: &str) {
    let partitions = 4;
    let (topic, model, rest) = first_produced(
        &format!("static-{protocol}"),
        partitions,
        6_000,
        200,
        66,
        3_000,
    )
    .await;
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__KAFKA__GROUP_PROTOCOL", protocol)
        .with("IDEM__KAFKA__GROUP_INSTANCE_ID", "pod-0")
        .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "200");
    let killed = Idem::spawn(&opts);
    wait_until("the first process applies events", CATCH_UP, || async {
        killed.outcome(&topic, Outcome::Applied).await > 0
    })
    .await;
    killed.kill();
    let restarted = Idem::spawn(&opts);
    produce(&topic, &rest).await;
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    wait_until(
        "the restarted process owns every partition and is ready",
        CATCH_UP,
        || async {
            restarted.counter("idem_assigned_partitions", &[]).await == Some(partitions as u64)
                && http_get(restarted.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
        },
    )
    .await;
    let fenced = restarted
        .counter(
            "idem_kafka_fatal_errors_total",
            &[("code", "unreleased_instance_id")],
        )
        .await
        .unwrap();
    if protocol == "consumer" {
        assert!(
            fenced >= 1,
            "the newcomer was not fenced: the test proved nothing"
        );
        let log = std::fs::read_to_string(&restarted.log).unwrap();
        assert!(
            log.contains("another member holds group.instance.id \"pod-0\""),
            "the log names the held instance id"
        );
    } else {
        assert_eq!(fenced, 0, "classic fences the old member, not the new one");
    }
    eprintln!("static membership ({protocol}): the restarted process was fenced {fenced} time(s) before it joined");
    restarted.terminate().await;
}

/// The way to the new protocol. Kafka 4.1 converts a running classic group
/// when the first consumer-protocol member joins, unless a member's last
/// assignment carries assignor userData, which librdkafka's cooperative-sticky
/// assignor writes once the group has rebalanced (the broker logs "Cannot
/// upgrade classic group … userData from a custom assignor would be lost").
/// Either way nothing may stall or be lost: refused, the newcomer is not
/// ready and the classic members keep every partition. Then the group is
/// switched while stopped, which converts under any policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_group_moves_to_the_consumer_protocol_rolling_if_the_broker_converts_or_stopped()
{
    let partitions = 6;
    let (topic, model, rest) = first_produced(
        "switch-classic-consumer",
        partitions,
        12_000,
        300,
        98,
        3_000,
    )
    .await;
    let opts = |protocol: &str| {
        IdemOpts::new(&topic, &topic, &topic).with("IDEM__KAFKA__GROUP_PROTOCOL", protocol)
    };
    let mut members: Vec<Idem> = (0..3).map(|_| Idem::spawn(&opts("classic"))).collect();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    wait_all_hold_partitions(&members, "before the switch").await;
    let producing = {
        let (topic, rest) = (topic.clone(), rest.clone());
        tokio::spawn(async move {
            for slice in rest.chunks(300) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        })
    };

    // A rolling step: one classic instance replaced by a consumer-protocol one.
    let mut duplicates = 0;
    let leaving = members.remove(0);
    duplicates += leaving.outcome(&topic, Outcome::Duplicate).await;
    leaving.terminate().await;
    let newcomer = Idem::spawn(&opts("consumer"));
    let converted = holds_partitions_within(&newcomer, Duration::from_secs(30)).await;
    if !converted {
        let mut classic_owned = 0;
        for m in &members {
            classic_owned += m
                .counter("idem_assigned_partitions", &[])
                .await
                .unwrap_or(0);
        }
        assert_eq!(
            classic_owned, partitions as u64,
            "a refused upgrade left partitions without an owner"
        );
        assert_ne!(
            http_get(newcomer.metrics_port, "/readyz").await.as_deref(),
            Some("ready\n"),
            "a newcomer the broker refused said it was ready"
        );
        wait_until(
            "the refused newcomer says why it waits",
            CATCH_UP,
            || async {
                std::fs::read_to_string(&newcomer.log).is_ok_and(|log| {
                    log.contains("the consumer group has not admitted this instance yet")
                })
            },
        )
        .await;
    }
    members.push(newcomer);

    // The switch while stopped: every instance leaves, all start on consumer.
    for m in members.drain(..) {
        duplicates += m.outcome(&topic, Outcome::Duplicate).await;
        m.terminate().await;
    }
    members = (0..3).map(|_| Idem::spawn(&opts("consumer"))).collect();
    wait_all_hold_partitions(&members, "after the stopped switch").await;
    producing.await.unwrap();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    for m in &members {
        duplicates += m.outcome(&topic, Outcome::Duplicate).await;
    }
    assert_eq!(
        duplicates, 0,
        "a hand-over of the switch redelivered applied events"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    eprintln!(
        "classic to consumer: the broker {} the running group at the rolling step",
        if converted {
            "converted"
        } else {
            "refused to convert"
        }
    );
    for m in members {
        m.terminate().await;
    }
}

/// Whether `member` holds a partition within `bound`.
async fn holds_partitions_within(member: &Idem, bound: Duration) -> bool {
    let deadline = std::time::Instant::now() + bound;
    while std::time::Instant::now() < deadline {
        if member
            .counter("idem_assigned_partitions", &[])
            .await
            .unwrap_or(0)
            > 0
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The way back, for an operator who rolls the change back: classic
/// members join a consumer group as they are, and the group returns to
/// classic when its last consumer-protocol member leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_consumer_protocol_group_moves_back_to_classic_one_instance_at_a_time() {
    rolling_switch("consumer", "classic").await;
}

/// Three instances speaking `from` are replaced one at a time, each by
/// SIGTERM and the start of an instance speaking `to`, while records keep
/// coming. At every step the mixed group shares the partitions among all
/// three; no hand-over redelivers, and every record ends applied once.
async fn rolling_switch(from: &str, to: &str) {
    let partitions = 6;
    let (topic, model, rest) = first_produced(
        &format!("switch-{from}-{to}"),
        partitions,
        12_000,
        300,
        99,
        3_000,
    )
    .await;
    let opts = |protocol: &str| {
        IdemOpts::new(&topic, &topic, &topic).with("IDEM__KAFKA__GROUP_PROTOCOL", protocol)
    };
    let mut members: Vec<Idem> = (0..3).map(|_| Idem::spawn(&opts(from))).collect();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    wait_all_hold_partitions(&members, "before the switch").await;

    let producing = {
        let (topic, rest) = (topic.clone(), rest.clone());
        tokio::spawn(async move {
            for slice in rest.chunks(300) {
                produce(&topic, slice).await;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        })
    };
    let mut duplicates = 0;
    for step in 1..=3 {
        let leaving = members.remove(0);
        duplicates += leaving.outcome(&topic, Outcome::Duplicate).await;
        leaving.terminate().await;
        members.push(Idem::spawn(&opts(to)));
        wait_all_hold_partitions(
            &members,
            &format!("after step {step} ({step} of 3 speak {to})"),
        )
        .await;
    }
    producing.await.unwrap();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    for m in &members {
        duplicates += m.outcome(&topic, Outcome::Duplicate).await;
    }
    assert_eq!(
        duplicates, 0,
        "a hand-over of the switch from {from} to {to} redelivered applied events"
    );
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    for m in members {
        m.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_longer_than_max_poll_interval_keeps_the_partitions() {
    redis_stall_past_max_poll_interval("classic").await;
}

/// librdkafka before 2.15 fails a consumer-protocol member that exceeded
/// `max.poll.interval.ms` fatally (INVALID_REQUEST) when it rejoins. idem
/// polls on a thread of its own and pauses fetching while its batches
/// wait on Redis, so a Redis stall stops no poll and the bug is not hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_longer_than_max_poll_interval_keeps_the_partitions_under_the_consumer_protocol(
) {
    redis_stall_past_max_poll_interval("consumer").await;
}

/// A private Redis SIGSTOPped for twice `max.poll.interval.ms` while
/// records arrive: idem keeps its partitions (no rebalance, no fatal
/// error, librdkafka never reports the poll interval exceeded) and, once
/// Redis is back, applies every record once.
async fn redis_stall_past_max_poll_interval(protocol: &str) {
    const MAX_POLL_INTERVAL: Duration = Duration::from_secs(7);
    let partitions = 2;
    let redis = private_redis(None).await;
    let (topic, model, rest) = first_produced(
        &format!("stall-{protocol}"),
        partitions,
        4_000,
        100,
        55,
        2_000,
    )
    .await;
    let mut opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__KAFKA__GROUP_PROTOCOL", protocol)
        .with(
            "IDEM__KAFKA__LIBRDKAFKA__MAX.POLL.INTERVAL.MS",
            &MAX_POLL_INTERVAL.as_millis().to_string(),
        )
        .with("IDEM__PIPELINE__BATCH_MAX_EVENTS", "100");
    opts.redis_url = redis.url();
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    let rebalances = idem.counter("idem_rebalances_total", &[]).await.unwrap();

    redis.pause();
    produce(&topic, &rest).await;
    // The fault itself lasts twice the poll interval; nothing to await.
    tokio::time::sleep(2 * MAX_POLL_INTERVAL).await;
    redis.resume();
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;

    assert_matches_oracle(&redis.url(), &topic, &model).await;
    assert_eq!(
        idem.counter("idem_rebalances_total", &[]).await.unwrap(),
        rebalances,
        "the group rebalanced during the stall"
    );
    assert_eq!(
        idem.counter("idem_kafka_fatal_errors_total", &[])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        idem.counter("idem_assigned_partitions", &[]).await,
        Some(partitions as u64)
    );
    let log = std::fs::read_to_string(&idem.log).unwrap();
    assert!(
        !log.contains("max.poll.interval.ms") && !log.contains("maximum poll interval"),
        "librdkafka reported the poll interval exceeded"
    );
    let retries = idem.counter("idem_retries_total", &[]).await.unwrap();
    assert!(
        retries > 0,
        "the stall was not felt: the test proved nothing"
    );
    idem.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_past_its_session_and_poll_interval_rejoins() {
    stopped_past_poll_interval("classic").await;
}

/// The case librdkafka 2.15 fixed for the consumer protocol (a member that
/// exceeded `max.poll.interval.ms` rejoined into a fatal INVALID_REQUEST):
/// here the whole process is stopped, polls included. Whether or not the
/// bundled librdkafka hits the bug, idem must serve again: a fatal error
/// replaces the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_past_its_session_and_poll_interval_rejoins_under_the_consumer_protocol() {
    stopped_past_poll_interval("consumer").await;
}

/// The only member SIGSTOPped for longer than the session (6 s) and
/// `max.poll.interval.ms` (7 s), then SIGCONTed: it loses its partitions,
/// joins again, owns them all, is ready, and every record ends applied once.
async fn stopped_past_poll_interval(protocol: &str) {
    let partitions = 2;
    let (topic, model, rest) = first_produced(
        &format!("frozen-{protocol}"),
        partitions,
        3_000,
        100,
        44,
        1_500,
    )
    .await;
    let opts = IdemOpts::new(&topic, &topic, &topic)
        .with("IDEM__KAFKA__GROUP_PROTOCOL", protocol)
        .with("IDEM__KAFKA__LIBRDKAFKA__MAX.POLL.INTERVAL.MS", "7000");
    let idem = Idem::spawn(&opts);
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    idem.stop_process();
    // The fault is the length of the stop; nothing to await.
    tokio::time::sleep(Duration::from_secs(12)).await;
    idem.continue_process();
    wait_until(
        "the stopped member loses its partitions",
        CATCH_UP,
        || async {
            idem.counter("idem_rebalances_total", &[("kind", "lost")])
                .await
                .unwrap_or(0)
                + idem
                    .counter("idem_rebalances_total", &[("kind", "revoke")])
                    .await
                    .unwrap_or(0)
                + idem
                    .counter("idem_kafka_fatal_errors_total", &[])
                    .await
                    .unwrap_or(0)
                > 0
        },
    )
    .await;
    produce(&topic, &rest).await;
    wait_caught_up(&topic, &topic, partitions, CATCH_UP).await;
    assert_matches_oracle(&redis_url(), &topic, &model).await;
    wait_until("it owns every partition and is ready", CATCH_UP, || async {
        idem.counter("idem_assigned_partitions", &[]).await == Some(partitions as u64)
            && http_get(idem.metrics_port, "/readyz").await.as_deref() == Some("ready\n")
    })
    .await;
    let fatal = idem
        .counter("idem_kafka_fatal_errors_total", &[])
        .await
        .unwrap();
    eprintln!("stopped past the poll interval ({protocol}): {fatal} fatal client error(s) before it served again");
    idem.terminate().await;
}

/// A fresh topic (named after `name`) of `partitions`, a stream of `events`
/// distinct events over `entities` and its oracle, the first `first` of them
/// produced; returns the topic, the oracle and the records still to produce.
async fn first_produced(
    name: &str,
    partitions: i32,
    events: usize,
    entities: usize,
    seed: u64,
    first: usize,
) -> (String, Model, Vec<SampleRecord>) {
    let topic = unique(name);
    create_topic(&topic, partitions).await;
    let records = unique_stream(&topic, events, entities, seed);
    let (model, _) = oracle(&records);
    produce(&topic, &records[..first]).await;
    (topic, model, records[first..].to_vec())
}
