//! Metrics: every name and label declared here once, and the HTTP endpoint
//! serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Guarantee: no label carries an entity or an event id, so cardinality is
//! bounded by topics × partitions × outcomes.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::model::Outcome;

mod exposition;
mod gateway;
mod health;
mod tally;

pub use gateway::{
    describe_gateway, gateway_answered, GATEWAY_CONFLICT_WAIT_SECONDS, GATEWAY_PRODUCE_SECONDS,
    GATEWAY_READ_WAIT_SECONDS, GATEWAY_REPLAYS_TOTAL, GATEWAY_REQUESTS_TOTAL, GATEWAY_SWEPT_TOTAL,
};
pub use health::{Health, WAITING_TO_JOIN};
pub use tally::{outcome_counts, Counts};

pub const EVENTS_TOTAL: &str = "idem_events_total";
pub const DUPLICATE_AGE_SECONDS: &str = "idem_duplicate_age_seconds";
pub const BATCH_DURATION_SECONDS: &str = "idem_batch_duration_seconds";
pub const BATCH_EVENTS: &str = "idem_batch_events";
pub const REDIS_ROUND_TRIP_SECONDS: &str = "idem_redis_round_trip_seconds";
pub const RETRIES_TOTAL: &str = "idem_retries_total";
pub const REBALANCES_TOTAL: &str = "idem_rebalances_total";
pub const KAFKA_FATAL_ERRORS_TOTAL: &str = "idem_kafka_fatal_errors_total";
pub const ASSIGNED_PARTITIONS: &str = "idem_assigned_partitions";
pub const COMMITTED_OFFSET: &str = "idem_committed_offset";
pub const BUILD_INFO: &str = "idem_build_info";
pub const EVENT_LATENCY_SECONDS: &str = "idem_event_latency_seconds";
pub const CONSUMER_LAG: &str = "idem_consumer_lag";
pub const UNCOMMITTED_EVENTS: &str = "idem_uncommitted_events";
pub const IN_FLIGHT_EVENTS: &str = "idem_in_flight_events";
pub const PAUSED: &str = "idem_paused";
pub const DEAD_LETTERS_TOTAL: &str = "idem_dead_letters_total";
pub const COMMIT_LAG_SECONDS: &str = "idem_commit_lag_seconds";
pub const KEY_MISMATCH_TOTAL: &str = "idem_key_mismatch_total";
pub const PARTITION_BLOCKED: &str = "idem_partition_blocked";
pub const REDIS_REWINDS_TOTAL: &str = "idem_redis_rewinds_total";
pub const REWOUND_RECORDS_TOTAL: &str = "idem_rewound_records_total";
pub const REDIS_STATE_CHANGES_TOTAL: &str = "idem_redis_state_changes_total";
pub const DENSE_SEQS_CLOSED_TOTAL: &str = "idem_dense_seqs_closed_total";
pub const CHANGES_PUBLISHED_TOTAL: &str = "idem_changes_published_total";
pub const CHANGELOG_REFERENCES_TOTAL: &str = "idem_changelog_references_total";
pub const CHANGELOG_ERRORS_TOTAL: &str = "idem_changelog_publish_errors_total";
pub const CHANGELOG_LAG_SECONDS: &str = "idem_changelog_lag_seconds";
pub const RELAY_LEASE_HELD: &str = "idem_relay_lease_held";
pub const CHANGELOG_OUTBOX_ENTRIES: &str = "idem_changelog_outbox_entries";
pub const CHANGELOG_UNPUBLISHED_PARTITIONS: &str = "idem_changelog_unpublished_partitions";

/// Buckets fine enough for the benchmark to read p50/p99/p99.9 from.
pub const LATENCY_BUCKETS: [f64; 24] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.010, 0.012, 0.015, 0.020, 0.025, 0.030,
    0.040, 0.050, 0.075, 0.100, 0.150, 0.200, 0.300, 0.500, 1.0, 2.5, 10.0,
];

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install the Prometheus recorder")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen on metrics.listen = {listen}: {cause} (another process on that port? set metrics.listen)")]
    Listen {
        listen: SocketAddr,
        cause: std::io::Error,
    },
}

/// Installs the global Prometheus recorder and describes every metric.
/// Every series carries the consumer `group` and the Redis `key_prefix`, so
/// two deployments (a blue/green rebuild) never mix in one query.
pub fn install(group: &str, key_prefix: &str) -> Result<PrometheusHandle, MetricsError> {
    let handle = recorder(group, key_prefix)?;
    // Histogram samples queue up until drained; drain them even if nobody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    describe_all();
    initial_series();
    Ok(handle)
}

/// The recorder with the global labels and each histogram's buckets (no
/// summaries: quantiles of summaries cannot be aggregated across replicas).
fn recorder(group: &str, key_prefix: &str) -> Result<PrometheusHandle, MetricsError> {
    let latency = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let ages = [
        0.1,
        1.0,
        10.0,
        60.0,
        300.0,
        900.0,
        3600.0,
        4.0 * 3600.0,
        12.0 * 3600.0,
        86400.0,
        2.0 * 86400.0,
        3.0 * 86400.0,
    ];
    let sizes = [
        1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    ];
    let commit_lags = [
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
    ];
    Ok(PrometheusBuilder::new()
        .add_global_label("group", group)
        .add_global_label("key_prefix", key_prefix)
        .set_buckets_for_metric(Matcher::Full(COMMIT_LAG_SECONDS.into()), &commit_lags)?
        .set_buckets_for_metric(Matcher::Full(BATCH_DURATION_SECONDS.into()), &latency)?
        .set_buckets_for_metric(Matcher::Full(REDIS_ROUND_TRIP_SECONDS.into()), &latency)?
        .set_buckets_for_metric(Matcher::Full(DUPLICATE_AGE_SECONDS.into()), &ages)?
        .set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), &sizes)?
        .set_buckets_for_metric(Matcher::Prefix("idem_gateway_".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(EVENT_LATENCY_SECONDS.into()),
            &LATENCY_BUCKETS,
        )?
        .install_recorder()?)
}

/// HELP text (and unit) of every metric.
/// The metrics of Redis state losses (docs/guarantees.md).
fn describe_redis_state() {
    describe_counter!(
        REDIS_REWINDS_TOTAL,
        "Partitions resumed before their committed offset because Redis's progress records stop earlier, by cause (lost, rolled_back)."
    );
    describe_counter!(
        DENSE_SEQS_CLOSED_TOTAL,
        "Seqs of dense topics (dedupe.dense_seq_topics) given up without their event: more than 32 later seqs of the entity waited above the gap. A late event in a closed gap is dead-lettered (seq_gap_closed)."
    );
    describe_counter!(
        REWOUND_RECORDS_TOTAL,
        "Records read again because Redis's state stopped before the committed offset."
    );
    describe_counter!(
        REDIS_STATE_CHANGES_TOTAL,
        "Times a running idem found Redis's state lost or rolled back and restarted consumption from what Redis holds, by cause (epoch, rolled_back)."
    );
}

/// The metrics of the changelog relay (docs/change-stream.md).
fn describe_changelog() {
    describe_counter!(
        CHANGES_PUBLISHED_TOTAL,
        "Changes the relay published and the broker acknowledged, by changelog topic (copies after a hand-over included)."
    );
    describe_counter!(
        CHANGELOG_REFERENCES_TOTAL,
        "Changes too large for the changelog topic, published as a reference (same id and version, no state), by changelog topic."
    );
    describe_counter!(
        CHANGELOG_ERRORS_TOTAL,
        "Relay rounds that failed, by kind (redis, unknown_topic, kafka, protocol); the entries stay in the outbox and are published again."
    );
    describe_gauge!(
        CHANGELOG_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest change the relay read in its last round (0 when the outboxes are empty): how far the changelog is behind."
    );
    describe_gauge!(
        CHANGELOG_OUTBOX_ENTRIES,
        "Changes waiting in the outboxes the relay read in its last round, after it deleted what it published (0 when they are empty). Only the lease holder measures it; the others show 0."
    );
    describe_gauge!(
        CHANGELOG_UNPUBLISHED_PARTITIONS,
        "Partitions of a topic in changelog.topics held by a group member that writes no changes for it (an idem older than the changelog, or one without the topic in changelog.topics), by topic: their changes are missing from the changelog."
    );
    describe_gauge!(
        RELAY_LEASE_HELD,
        "1 while this instance's relay holds the lease and publishes the changelog."
    );
}

/// Counts changes published to `topic`.
pub fn record_changes_published(topic: &str, n: u64) {
    counter!(CHANGES_PUBLISHED_TOTAL, "topic" => topic.to_string()).increment(n);
}

pub fn record_changelog_reference(topic: &str) {
    counter!(CHANGELOG_REFERENCES_TOTAL, "topic" => topic.to_string()).increment(1);
}

pub fn record_changelog_error(kind: &'static str) {
    counter!(CHANGELOG_ERRORS_TOTAL, "kind" => kind).increment(1);
}

pub fn set_changelog_lag(seconds: f64) {
    gauge!(CHANGELOG_LAG_SECONDS).set(seconds);
}

pub fn set_changelog_outbox_entries(entries: u64) {
    gauge!(CHANGELOG_OUTBOX_ENTRIES).set(entries as f64);
}

pub fn set_changelog_unpublished(topic: &str, partitions: usize) {
    gauge!(CHANGELOG_UNPUBLISHED_PARTITIONS, "topic" => topic.to_string()).set(partitions as f64);
}

pub fn set_relay_lease(held: bool) {
    gauge!(RELAY_LEASE_HELD).set(if held { 1.0 } else { 0.0 });
}

/// The changelog's series from the start of a relay, zeros.
pub fn init_changelog(topics: &[String]) {
    for t in topics {
        record_changes_published(t, 0);
        counter!(CHANGELOG_REFERENCES_TOTAL, "topic" => t.to_string()).increment(0);
    }
    for kind in ["redis", "unknown_topic", "kafka", "protocol"] {
        counter!(CHANGELOG_ERRORS_TOTAL, "kind" => kind).increment(0);
    }
    set_changelog_lag(0.0);
    set_changelog_outbox_entries(0);
    set_relay_lease(false);
}

/// The metrics of group membership.
fn describe_group() {
    describe_counter!(
        REBALANCES_TOTAL,
        "Consumer group rebalances by kind (assign, revoke, lost, error)."
    );
    describe_counter!(
        KAFKA_FATAL_ERRORS_TOTAL,
        "Fatal errors of the Kafka consumer, by code (unreleased_instance_id, fenced_instance_id, other); each replaces the consumer after a backoff."
    );
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions assigned to this instance.");
}

fn describe_all() {
    describe_counter!(
        EVENTS_TOTAL,
        "Events by topic and outcome (applied, duplicate, stale, conflict, invalid, late, replayed, partial)."
    );
    describe_histogram!(
        DUPLICATE_AGE_SECONDS,
        Unit::Seconds,
        "How long after its first sighting a duplicate arrived (0 when it came in the batch of its original)."
    );
    describe_histogram!(
        BATCH_DURATION_SECONDS,
        Unit::Seconds,
        "Time to decode, guard and release one batch."
    );
    describe_histogram!(BATCH_EVENTS, "Events per batch.");
    describe_histogram!(
        REDIS_ROUND_TRIP_SECONDS,
        Unit::Seconds,
        "One guard attempt of a batch: the progress check and every call of the batch (with the durable wait, if any)."
    );
    describe_counter!(
        RETRIES_TOTAL,
        "Retried operations by cause (see docs/metrics.md); nothing is committed past a failed one."
    );
    describe_redis_state();
    describe_group();
    describe_changelog();
    describe_gauge!(
        COMMITTED_OFFSET,
        "Next offset stored for commit, per partition."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which idem runs: its release and the commit it was built from."
    );
    describe_counter!(
        KEY_MISMATCH_TOTAL,
        "Records whose Kafka key is not their entity (their entity may span partitions)."
    );
    describe_histogram!(
        EVENT_LATENCY_SECONDS,
        Unit::Seconds,
        "From a record's timestamp to its outcome being durable in Redis."
    );
    describe_histogram!(
        COMMIT_LAG_SECONDS,
        Unit::Seconds,
        "From an offset being stored (its effect durable) to Kafka acknowledging its commit."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records between the committed offset and the end of the partition (librdkafka statistics)."
    );
    describe_gauge!(
        UNCOMMITTED_EVENTS,
        "Records done in Redis whose offsets are stored but not yet committed."
    );
    describe_gauge!(
        IN_FLIGHT_EVENTS,
        "Records fetched and not yet done (at most two batches)."
    );
    describe_gauge!(
        PAUSED,
        "1 while fetching is paused (Redis behind, or the dead-letter budget exceeded)."
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Records written to the dead-letter topic, by source topic and reason code."
    );
    describe_gauge!(
        PARTITION_BLOCKED,
        "1 while a partition has records in flight and no progress for pipeline.stall_timeout, by cause (redis, dead_letter, slow)."
    );
}

/// Series that exist from the start, so dashboards and alerts see zeros, not gaps.
fn initial_series() {
    gauge!(BUILD_INFO, "version" => crate::version::VERSION, "commit" => crate::version::COMMIT)
        .set(1.0);
    set_paused(false);
    set_in_flight_events(0);
    set_uncommitted_events(0);
    set_assigned_partitions(0);
    for cause in RETRY_CAUSES {
        counter!(RETRIES_TOTAL, "cause" => cause).increment(0);
    }
    for kind in REBALANCE_KINDS {
        counter!(REBALANCES_TOTAL, "kind" => kind).increment(0);
    }
    for code in KAFKA_FATAL_CODES {
        counter!(KAFKA_FATAL_ERRORS_TOTAL, "code" => code).increment(0);
    }
    for cause in ["epoch", "rolled_back"] {
        counter!(REDIS_STATE_CHANGES_TOTAL, "cause" => cause).increment(0);
    }
    // A registered histogram is exported (empty) before its first sample.
    for name in HISTOGRAMS {
        let _ = histogram!(name);
    }
}

/// Every cause of `idem_retries_total`: Redis's errors
/// ([`crate::store::StoreError::cause`]) and idem's own retried steps.
pub const RETRY_CAUSES: [&str; 11] = [
    "timeout",
    "connection",
    "server",
    "noscript",
    "cluster",
    "protocol",
    "not_durable",
    "dead_letter",
    "redis_connect",
    "redis_check",
    "kafka_refused",
];

/// Every kind of `idem_rebalances_total`.
pub const REBALANCE_KINDS: [&str; 4] = ["assign", "revoke", "lost", "error"];

/// Every code of `idem_kafka_fatal_errors_total`: the two that name a
/// static membership conflict, and the rest as one.
pub const KAFKA_FATAL_CODES: [&str; 3] = ["unreleased_instance_id", "fenced_instance_id", "other"];

/// Every histogram idem exports.
pub const HISTOGRAMS: [&str; 6] = [
    DUPLICATE_AGE_SECONDS,
    BATCH_DURATION_SECONDS,
    BATCH_EVENTS,
    REDIS_ROUND_TRIP_SECONDS,
    EVENT_LATENCY_SECONDS,
    COMMIT_LAG_SECONDS,
];

/// Zero-initialises a topic's counters so `rate()` works from the first scrape.
pub fn init_topic(topic: &str) {
    for outcome in Outcome::ALL {
        record_outcome(topic, outcome, 0);
    }
    counter!(KEY_MISMATCH_TOTAL, "topic" => topic.to_string()).increment(0);
    for cause in ["lost", "rolled_back"] {
        counter!(REDIS_REWINDS_TOTAL, "topic" => topic.to_string(), "cause" => cause).increment(0);
    }
    counter!(REWOUND_RECORDS_TOTAL, "topic" => topic.to_string()).increment(0);
    counter!(DENSE_SEQS_CLOSED_TOTAL, "topic" => topic.to_string()).increment(0);
}

/// Counts one outcome (Prometheus, and the tally `idem top` reads).
pub fn record_outcome(topic: &str, outcome: Outcome, n: u64) {
    counter!(EVENTS_TOTAL, "topic" => topic.to_string(), "outcome" => outcome.as_str())
        .increment(n);
    tally::add(topic, outcome, n);
}

pub fn record_duplicate_age(age: Duration) {
    histogram!(DUPLICATE_AGE_SECONDS).record(age.as_secs_f64());
}

pub fn record_batch(events: usize, elapsed: Duration) {
    histogram!(BATCH_EVENTS).record(events as f64);
    histogram!(BATCH_DURATION_SECONDS).record(elapsed.as_secs_f64());
}

/// Records end-to-end latencies of one batch, in seconds.
pub fn record_event_latencies(latencies: impl Iterator<Item = f64>) {
    let h = histogram!(EVENT_LATENCY_SECONDS);
    for l in latencies {
        h.record(l);
    }
}

pub fn record_round_trip(elapsed: Duration) {
    histogram!(REDIS_ROUND_TRIP_SECONDS).record(elapsed.as_secs_f64());
}

pub fn record_retry(cause: &'static str) {
    counter!(RETRIES_TOTAL, "cause" => cause).increment(1);
}

/// Seqs of a dense topic closed without their event (docs/guarantees.md,
/// "Dense seqs").
pub fn record_dense_seqs_closed(topic: &str, seqs: u64) {
    counter!(DENSE_SEQS_CLOSED_TOTAL, "topic" => topic.to_string()).increment(seqs);
}

pub fn record_rewind(topic: &str, cause: &'static str, records: i64) {
    counter!(REDIS_REWINDS_TOTAL, "topic" => topic.to_string(), "cause" => cause).increment(1);
    counter!(REWOUND_RECORDS_TOTAL, "topic" => topic.to_string()).increment(records.max(0) as u64);
}

pub fn record_redis_state_change(cause: &'static str) {
    counter!(REDIS_STATE_CHANGES_TOTAL, "cause" => cause).increment(1);
}

pub fn record_rebalance(kind: &'static str) {
    debug_assert!(REBALANCE_KINDS.contains(&kind), "{kind} in REBALANCE_KINDS");
    counter!(REBALANCES_TOTAL, "kind" => kind).increment(1);
}

/// Counts a fatal consumer error; returns the code label it counted under.
pub fn record_kafka_fatal(code: rdkafka::types::RDKafkaErrorCode) -> &'static str {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let label = match code {
        Code::UnreleasedInstanceId => "unreleased_instance_id",
        Code::FencedInstanceId => "fenced_instance_id",
        _ => "other",
    };
    counter!(KAFKA_FATAL_ERRORS_TOTAL, "code" => label).increment(1);
    label
}

pub fn set_assigned_partitions(n: usize) {
    gauge!(ASSIGNED_PARTITIONS).set(n as f64);
}

pub fn record_commit_lag(lag: Duration) {
    histogram!(COMMIT_LAG_SECONDS).record(lag.as_secs_f64());
}

pub fn record_dead_letter(topic: &str, reason: &'static str) {
    counter!(DEAD_LETTERS_TOTAL, "topic" => topic.to_string(), "reason" => reason).increment(1);
}

pub fn record_key_mismatch(topic: &str) {
    counter!(KEY_MISMATCH_TOTAL, "topic" => topic.to_string()).increment(1);
}

/// The causes `idem_partition_blocked` names.
pub const BLOCKED_CAUSES: [&str; 3] = ["redis", "dead_letter", "slow"];

/// Zero-initialises a newly assigned partition's series.
pub fn init_partition(topic: &str, partition: i32) {
    for cause in BLOCKED_CAUSES {
        set_partition_blocked(topic, partition, cause, false);
    }
}

/// Sets whether `topic`/`partition` is blocked, and by what (`redis`,
/// `dead_letter`, or `slow` when nothing is being retried).
pub fn set_partition_blocked(topic: &str, partition: i32, cause: &'static str, blocked: bool) {
    gauge!(PARTITION_BLOCKED, "topic" => topic.to_string(), "partition" => partition.to_string(), "cause" => cause)
        .set(if blocked { 1.0 } else { 0.0 });
}

pub fn set_consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(lag as f64);
}

pub fn set_uncommitted_events(n: i64) {
    gauge!(UNCOMMITTED_EVENTS).set(n as f64);
}

pub fn set_in_flight_events(n: usize) {
    gauge!(IN_FLIGHT_EVENTS).set(n as f64);
}

pub fn set_paused(paused: bool) {
    gauge!(PAUSED).set(if paused { 1.0 } else { 0.0 });
}

pub fn set_stored_offset(topic: &str, partition: i32, offset: i64) {
    gauge!(COMMITTED_OFFSET, "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(offset as f64);
}

/// GETs `path` from an idem metrics endpoint on loopback `port` (used by the
/// benchmark and the conformance suite to read the processes they run):
/// the body of any answer, `None` when nothing answers.
pub async fn fetch_local(port: u16, path: &str) -> Option<String> {
    crate::http::get(port, path).await.map(|a| a.body)
}

/// The endpoints: `/metrics` (the Prometheus text format), `/healthz`
/// (alive), `/readyz` (ready to process, or 503 and why not).
fn router(handle: PrometheusHandle, health: Health) -> Router {
    let metrics = {
        let health = health.clone();
        move || async move {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                health.exposition(&handle),
            )
        }
    };
    let ready = move || async move {
        match health.is_ready() {
            true => (StatusCode::OK, "ready\n".to_string()),
            false => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: {}\n",
                    health.not_ready_reason().unwrap_or_default()
                ),
            ),
        }
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` (crate::http:
/// keep-alive, HEAD, 404/405, timeouts) until the process ends.
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    health: Health,
) -> Result<(), MetricsError> {
    let address = crate::http::serve(listen, router(handle, health))
        .await
        .map_err(|cause| MetricsError::Listen { listen, cause })?;
    tracing::info!(address = %address, "metrics endpoint listening");
    Ok(())
}
