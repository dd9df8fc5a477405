//! The relay: publishes the changes the guard script wrote to the outboxes
//! (`changelog.topics`, docs/change-stream.md) to their changelog topics, and
//! deletes each entry only once the broker acknowledged it.
//!
//! Guarantee: every change reaches its changelog topic at least once, with
//! the same id on every copy (`<entity>#<version>`), and per entity its
//! first copies come in version order. Copies come from a relay that
//! stopped (a crash, a lost lease, a failed delete) after the broker's
//! acknowledgement and before the delete: at most one round
//! ([`ROUND_ENTRIES`]) per hand-over.
//!
//! Layout: `entry` reads an outbox entry and makes its Kafka record (pure),
//! `lease` keeps one publisher at a time, `outboxes` finds the outboxes
//! with entries without polling them (the dirty set and the bell), and
//! this file is the loop: renew, read, publish, delete.

mod error;
mod lease;
pub mod members;
mod outboxes;
mod snapshot;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;
use crate::kafka::QuietContext;
use crate::metrics;
pub use crate::store::outbox::{parse_entries, Entry, Form, REFERENCE_TYPE};
use crate::store::{KeyLayout, RedisConn};
pub use error::RelayError;
pub use lease::{holder_name, Lease};
pub use outboxes::{lease_key, nonempty_outboxes, Outboxes};
pub use snapshot::{snapshot, SnapshotReport};

/// At most this many entries are read and published per round: the bound
/// on the copies a hand-over can publish twice, and on the relay's memory.
pub const ROUND_ENTRIES: usize = 2000;
// A round's outboxes, each given at least its minimum share, stay within it.
const _: () = assert!(outboxes::OUTBOXES_PER_ROUND * outboxes::MIN_SHARE <= ROUND_ENTRIES);
/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// The largest record the relay's producer sends (Kafka's default topic
/// limit, `max.message.bytes`, is 1 MiB); a larger change goes out as a
/// reference ([`Entry::reference`]).
pub const MAX_RECORD_BYTES: usize = 1_000_000;
/// How long the broker has to acknowledge a record before the round fails
/// and its entries are sent again: below [`LEASE_TTL`], so a round stuck on
/// a missing topic or a down broker ends before the lease could lapse.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between two tries after an error: short enough that the
/// outbox drains within seconds of the topic or the brokers coming back.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Headroom below [`MAX_RECORD_BYTES`] for the key, the headers and the
/// batch framing.
const RECORD_HEADROOM: usize = 16_384;

/// The relay's idempotent producer.
fn make_producer(config: &Config) -> Result<FutureProducer<QuietContext>, RelayError> {
    Ok(crate::kafka::base_config(&config.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // A round waits at most this for the broker, so it ends (and the
        // lease is renewed) well before the lease could lapse.
        .set(
            "message.timeout.ms",
            MESSAGE_TIMEOUT.as_millis().to_string(),
        )
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
        .create_with_context(QuietContext)?)
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Published (and deleted) this many entries.
    Published(usize),
    /// Every outbox it knows of is empty.
    Idle,
    /// Another relay holds the lease.
    NotHolder,
}

/// One relay: its own Redis connection (it blocks on the bell), its
/// idempotent producer and its lease.
pub struct Relay {
    conn: RedisConn,
    producer: FutureProducer<QuietContext>,
    outboxes: Outboxes,
    lease: Lease,
    config: Arc<Config>,
    /// Entries the broker refused as too large: sent as references next.
    too_large: std::collections::HashSet<String>,
}

impl Relay {
    pub async fn connect(config: Arc<Config>) -> Result<Relay, RelayError> {
        let conn = crate::store::connect(&config.redis).await?;
        let layout = KeyLayout::new(&config.redis.key_prefix);
        let lease = Lease::new(
            outboxes::lease_key(&layout, conn.is_cluster()),
            holder_name(),
            LEASE_TTL,
        );
        let producer = make_producer(&config)?;
        Ok(Relay {
            outboxes: Outboxes::new(layout, conn.is_cluster()),
            conn,
            producer,
            lease,
            config,
            too_large: Default::default(),
        })
    }

    pub fn holder(&self) -> &str {
        self.lease.holder()
    }

    /// The producer, for tests that inject a fault a broker cannot make on
    /// demand (a fatal idempotence error).
    #[doc(hidden)]
    pub fn producer(&self) -> &FutureProducer<QuietContext> {
        &self.producer
    }

    /// A producer with a fatal error (librdkafka's idempotence: a sequence
    /// the broker refused, a missing `IdempotentWrite` ACL) refuses every
    /// record from then on: a new one takes its place. The records the old
    /// one had in flight were not acknowledged, so their entries are still
    /// in the outbox and are published again (copies, with the same ids,
    /// where the broker had written them).
    fn replace_fatal_producer(&mut self) -> Result<(), RelayError> {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return Ok(());
        };
        metrics::record_changelog_error("kafka");
        tracing::warn!(?code, %reason, "the changelog producer hit a fatal error: a new producer takes over; the changes not acknowledged are published again");
        self.producer = make_producer(&self.config)?;
        Ok(())
    }

    /// One round: renew the lease when due; read up to [`ROUND_ENTRIES`]
    /// entries, shared fairly among the outboxes that have some; publish
    /// them; delete what the broker acknowledged.
    pub async fn round(&mut self) -> Result<Round, RelayError> {
        if self.lease.due(Instant::now()) {
            let held = self.lease.renew(&mut self.conn).await;
            metrics::set_relay_lease(matches!(held, Ok(true)));
            held?;
        }
        if !self.lease.held(Instant::now()) {
            // The holder measures the lag; a dashboard takes the max.
            metrics::set_changelog_lag(0.0);
            metrics::set_changelog_outbox_entries(0);
            return Ok(Round::NotHolder);
        }
        let batches = self.outboxes.read(&mut self.conn, ROUND_ENTRIES).await?;
        let oldest = batches
            .iter()
            .filter_map(|b| b.entries.first())
            .filter_map(|e| crate::store::outbox::written_ms(&e.stream_id))
            .min();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        metrics::set_changelog_lag(
            oldest.map_or(0.0, |ms| now_ms.saturating_sub(ms) as f64 / 1000.0),
        );
        if batches.iter().all(|b| b.entries.is_empty()) {
            metrics::set_changelog_outbox_entries(0);
            self.outboxes.forget_empty(&mut self.conn, &batches).await?;
            return Ok(Round::Idle);
        }
        // Renewed just before publishing, so the round (at most
        // MESSAGE_TIMEOUT of waiting for the broker) ends inside the lease; a
        // holder that slept past it (a pause, a slow Redis) publishes nothing.
        let held = self.lease.renew(&mut self.conn).await;
        metrics::set_relay_lease(matches!(held, Ok(true)));
        if !held? || !self.lease.held(Instant::now()) {
            return Ok(Round::NotHolder);
        }
        self.replace_fatal_producer()?;
        let (acked, error) = self.publish(&batches).await;
        let published = self
            .outboxes
            .delete(&mut self.conn, &batches, &acked)
            .await?;
        let mut by_topic: std::collections::BTreeMap<&str, u64> = Default::default();
        for (b, &n) in batches.iter().zip(&acked) {
            for e in &b.entries[..n] {
                *by_topic.entry(&e.topic).or_default() += 1;
            }
        }
        for (source, n) in by_topic {
            metrics::record_changes_published(&self.config.changelog.topic_for(source), n);
        }
        self.outboxes.forget_empty(&mut self.conn, &batches).await?;
        metrics::set_changelog_outbox_entries(self.outboxes.depth(&mut self.conn, &batches).await?);
        match error {
            Some(e) => Err(self.explain(e).await),
            None => Ok(Round::Published(published)),
        }
    }

    /// Sends every entry of `batches`, each outbox's in order, and waits for
    /// the broker. Returns how many of each outbox's first entries were
    /// acknowledged (its acknowledged prefix), and the first error.
    async fn publish(
        &mut self,
        batches: &[outboxes::OutboxRead],
    ) -> (Vec<usize>, Option<RelayError>) {
        let mut sent: Vec<Vec<DeliveryFuture>> = Vec::with_capacity(batches.len());
        let mut first_error = None;
        for batch in batches {
            let mut deliveries = Vec::with_capacity(batch.entries.len());
            for e in &batch.entries {
                match self.enqueue(e).await {
                    Ok(d) => deliveries.push(d),
                    Err(err) => {
                        // The rest of this outbox waits: its order holds.
                        first_error.get_or_insert(err);
                        break;
                    }
                }
            }
            sent.push(deliveries);
        }
        let mut acked = Vec::with_capacity(sent.len());
        for (batch, deliveries) in batches.iter().zip(sent) {
            let mut prefix = 0;
            let mut broken = false;
            for (e, d) in batch.entries.iter().zip(deliveries) {
                let result = match d.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((err, _))) => Err(err),
                    Err(_) => Err(rdkafka::error::KafkaError::Canceled),
                };
                match result {
                    Ok(()) if !broken => prefix += 1,
                    Ok(()) => {}
                    Err(err) => {
                        if !broken {
                            if err.rdkafka_error_code()
                                == Some(RDKafkaErrorCode::MessageSizeTooLarge)
                            {
                                self.too_large.insert(e.stream_id.clone());
                            }
                            first_error.get_or_insert(self.classify(e, &err));
                        }
                        broken = true;
                    }
                }
            }
            acked.push(prefix);
        }
        (acked, first_error)
    }

    /// Enqueues one entry's record (or its reference, when too large),
    /// waiting while the producer's queue is full.
    async fn enqueue(&mut self, e: &Entry) -> Result<DeliveryFuture, RelayError> {
        let topic = self.config.changelog.topic_for(&e.topic);
        let limit = MAX_RECORD_BYTES - RECORD_HEADROOM;
        let mut as_reference = e.record.len() > limit || self.too_large.contains(&e.stream_id);
        loop {
            let reference;
            let (payload, form) = if as_reference {
                reference = e.reference(limit);
                (&reference[..], Form::Reference)
            } else {
                (&e.record[..], Form::Change)
            };
            let headers = e.headers(&self.config.kafka.group_id, form);
            let mut owned = OwnedHeaders::new_with_capacity(headers.len());
            for (k, v) in &headers {
                owned = owned.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
                .key(e.entity.as_str())
                .payload(payload)
                .headers(owned);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    if as_reference {
                        self.note_reference(e, &topic);
                    }
                    return Ok(delivery);
                }
                Err((err, _)) if err.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((err, _))
                    if !as_reference
                        && err.rdkafka_error_code()
                            == Some(RDKafkaErrorCode::MessageSizeTooLarge) =>
                {
                    as_reference = true;
                }
                Err((err, _)) => return Err(self.classify(e, &err)),
            }
        }
    }

    fn note_reference(&mut self, e: &Entry, topic: &str) {
        self.too_large.remove(&e.stream_id);
        metrics::record_changelog_reference(topic);
        tracing::warn!(
            entity = %e.entity,
            version = e.version,
            record_bytes = e.record.len(),
            topic,
            "change too large for the changelog topic: published as a reference (same id and version, no state; the entity's next change carries its whole state). Raise the topic's max.message.bytes to keep whole changes"
        );
    }

    fn classify(&self, e: &Entry, err: &rdkafka::error::KafkaError) -> RelayError {
        match err.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                RelayError::UnknownTopic {
                    topic: self.config.changelog.topic_for(&e.topic),
                }
            }
            Some(RDKafkaErrorCode::MessageTimedOut) => RelayError::TimedOut {
                topic: self.config.changelog.topic_for(&e.topic),
                error: err.to_string(),
            },
            _ => RelayError::Kafka(err.to_string()),
        }
    }

    /// A record times out, rather than fail, when its topic does not exist
    /// (the broker does not create it): asks the broker which it is, so the
    /// error names the fix.
    async fn explain(&self, error: RelayError) -> RelayError {
        let RelayError::TimedOut { topic, error } = error else {
            return error;
        };
        let client = self.producer.clone();
        let asked = topic.clone();
        let missing = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(Some(&asked), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().first().map(|t| {
                        t.error().is_some_and(|e| {
                            RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition
                        })
                    })
                })
        })
        .await
        .ok()
        .flatten();
        match missing {
            Some(true) => RelayError::UnknownTopic { topic },
            _ => RelayError::Kafka(error),
        }
    }

    /// Waits until a guard rings the bell (new entries), or a short while.
    pub async fn wait_for_work(&mut self) {
        let wait = (self.config.redis.response_timeout / 2).min(Duration::from_secs(2));
        if self.outboxes.wait_bell(&mut self.conn, wait).await.is_err() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Hands the lease over at once (a clean stop).
    pub async fn release(&mut self) {
        self.lease.release(&mut self.conn).await;
        metrics::set_relay_lease(false);
    }
}

/// Runs a relay until `stop` resolves: rounds while there is work, the
/// bell when there is none, a backoff after an error (each logged with
/// what to do, and counted).
pub async fn run(config: Arc<Config>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(250);
    let mut relay = loop {
        tokio::select! {
            _ = &mut stop => return,
            made = Relay::connect(config.clone()) => match made {
                Ok(r) => break r,
                Err(e) => {
                    metrics::record_changelog_error(e.kind());
                    tracing::warn!(error = %e, retry_in = ?backoff, "the changelog relay cannot start");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    };
    tracing::info!(holder = %relay.holder(), topics = ?config.changelog.topics, "changelog relay started");
    let changelogs: Vec<String> = config
        .changelog
        .topics
        .iter()
        .map(|t| config.changelog.topic_for(t))
        .collect();
    metrics::init_changelog(&changelogs);
    let mut backoff = Duration::from_millis(250);
    loop {
        let round = tokio::select! {
            _ = &mut stop => break,
            r = relay.round() => r,
        };
        match round {
            Ok(Round::Published(n)) => {
                backoff = Duration::from_millis(250);
                tracing::debug!(published = n, "changelog round");
            }
            Ok(Round::Idle) => {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = relay.wait_for_work() => {}
                }
            }
            // Only the holder waits on the bell: a relay that does not hold
            // the lease would take the ring meant for the holder.
            Ok(Round::NotHolder) => {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(LEASE_TTL / 5) => {}
                }
            }
            Err(e) => {
                metrics::record_changelog_error(e.kind());
                tracing::warn!(error = %e, retry_in = ?backoff, "changelog round failed; the entries not acknowledged stay in the outbox and are published again");
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    relay.release().await;
    tracing::info!("changelog relay stopped");
}
