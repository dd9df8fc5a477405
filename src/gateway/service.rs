//! What every handler shares, and the writes' second half: producing a
//! bound event, storing its response, and the sweeper that finishes the
//! bindings a holder left.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{Config, Policies};
use crate::kafka::QuietContext;
use crate::store::progress::ProgressStore;
use crate::store::KeyLayout;

use super::binding::{Bindings, Kept};
use super::callers::Callers;
use super::fence::{self, Fence};
use super::request::{self, Accepted, Intent};

/// Why a bound write has no stored answer yet. Either way its seq stays
/// bound to its key: the next retry or the sweeper finishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfinished {
    /// The brokers did not acknowledge the event.
    NotAcknowledged(String),
    /// The event was acknowledged; Redis did not take its answer.
    NotStored(String),
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfinished::NotAcknowledged(e) => write!(f, "the brokers did not acknowledge it: {e}"),
            Unfinished::NotStored(e) => write!(
                f,
                "it was produced, but Redis did not store its answer: {e}"
            ),
        }
    }
}

/// What every handler shares.
pub struct Gateway {
    pub(super) config: Arc<Config>,
    pub(super) policies: Policies,
    pub(super) bindings: Bindings,
    pub(super) callers: Callers,
    pub(super) fence: Fence,
    producer: FutureProducer<QuietContext>,
    /// Fault injection for the tests: a crash no real server produces on
    /// demand (`IDEM_GATEWAY_FAULT`).
    fault: Option<Fault>,
}

/// Where `IDEM_GATEWAY_FAULT` makes the process exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `exit_before_produce`: a seq bound, its event not produced yet.
    ExitBeforeProduce,
    /// `exit_after_ack`: the broker acknowledged the event, the response
    /// is not stored yet.
    ExitAfterAck,
}

impl Fault {
    fn from_env() -> Option<Fault> {
        match std::env::var("IDEM_GATEWAY_FAULT").as_deref() {
            Ok("exit_before_produce") => Some(Fault::ExitBeforeProduce),
            Ok("exit_after_ack") => Some(Fault::ExitAfterAck),
            _ => None,
        }
    }
}

/// The gateway's idempotent producer: the brokers' acknowledgement within
/// `gateway.produce_timeout` or an error, never a silent retry later.
fn producer(config: &Config) -> anyhow::Result<FutureProducer<QuietContext>> {
    Ok(crate::kafka::base_config(&config.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        // The Java clients' partitioner: an entity's events land in the
        // partition other producers (and tools) would put them in.
        .set("partitioner", "murmur2_random")
        .set(
            "message.timeout.ms",
            config.gateway.produce_timeout.as_millis().to_string(),
        )
        .create_with_context(QuietContext)?)
}

impl Gateway {
    /// Connects to Redis and Kafka and reads the callers.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Gateway>> {
        let callers = Callers::load(&config.gateway.tokens_file, config.gateway.rate_per_caller)
            .map_err(anyhow::Error::msg)?;
        let conn = crate::store::connect_or_explain(&config.redis).await?;
        let config = Arc::new(config);
        Ok(Arc::new(Gateway {
            policies: Policies::of(config.clone()),
            bindings: Bindings::new(conn, KeyLayout::new(&config.redis.key_prefix)),
            producer: producer(&config)?,
            callers,
            fence: Fence::default(),
            fault: Fault::from_env(),
            config,
        }))
    }

    /// Runs the background work: the fence's watch, the tokens file's, the sweeper.
    pub fn spawn_background(self: &Arc<Self>) {
        let markers = ProgressStore::new(self.bindings.conn(), self.bindings.layout().clone());
        tokio::spawn(self.fence.clone().watch(markers, self.config.clone()));
        tokio::spawn(self.callers.clone().watch());
        tokio::spawn(self.clone().sweep_forever());
    }

    /// Exits the process where the test's fault (`IDEM_GATEWAY_FAULT`) is `at`.
    fn strike(&self, at: Fault) {
        if self.fault == Some(at) {
            tracing::error!(?at, "IDEM_GATEWAY_FAULT: exiting");
            std::process::exit(137);
        }
    }

    /// Produces `entity`'s event at `seq` and waits for the acknowledgement.
    async fn produce(
        &self,
        topic: &str,
        entity: &str,
        seq: u64,
        intent: &Intent,
    ) -> Result<Accepted, String> {
        let record = request::event_record(&self.config.event.fields, entity, seq, intent);
        let started = std::time::Instant::now();
        let sent = self
            .producer
            .send(
                FutureRecord::to(topic).key(entity).payload(&record),
                self.config.gateway.produce_timeout,
            )
            .await;
        metrics::histogram!(crate::metrics::GATEWAY_PRODUCE_SECONDS)
            .record(started.elapsed().as_secs_f64());
        match sent {
            Ok(delivery) => Ok(Accepted {
                id: request::event_id(seq),
                entity: entity.to_string(),
                seq,
                topic: topic.to_string(),
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((e, _)) => Err(e.to_string()),
        }
    }

    /// Produces a bound event as the holder of `token`, then stores its
    /// response (or, when the produce failed, releases the lease so that a
    /// retry or the sweeper produces it at once). The response to answer.
    pub(super) async fn finish(
        &self,
        topic: &str,
        entity: &str,
        binding: &str,
        (seq, token): (u64, u64),
        intent: &Intent,
    ) -> Result<(Kept, Vec<u8>), Unfinished> {
        self.strike(Fault::ExitBeforeProduce);
        match self.produce(topic, entity, seq, intent).await {
            Ok(accepted) => {
                self.strike(Fault::ExitAfterAck);
                let at = (accepted.partition, accepted.offset);
                let kept = self
                    .bindings
                    .keep(entity, binding, token, Some(at))
                    .await
                    .map_err(|e| Unfinished::NotStored(e.to_string()))?;
                Ok((kept, accepted.to_bytes()))
            }
            Err(e) => {
                if let Err(release) = self.bindings.keep(entity, binding, token, None).await {
                    tracing::warn!(error = %release, "a failed produce's lease was not released: it expires");
                }
                Err(Unfinished::NotAcknowledged(e))
            }
        }
    }

    /// The sweeper: every half lease, produces again the bound events whose
    /// holder's lease expired, so no seq waits for its client to come back.
    async fn sweep_forever(self: Arc<Self>) {
        let every = (self.config.gateway.lease / 2).max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            if let fence::Gate::Open { epoch } = self.fence.gate() {
                if let Err(e) = self.sweep(&epoch).await {
                    tracing::warn!(error = %e, "gateway sweep failed; tried again later");
                }
            }
        }
    }

    async fn sweep(&self, epoch: &str) -> Result<(), crate::store::StoreError> {
        for pending in self.bindings.pending_sets().await? {
            let taken = self
                .bindings
                .sweep(epoch, &pending, self.config.gateway.lease, 100)
                .await?;
            for t in taken {
                let Some(intent) = Intent::from_canonical(&t.body) else {
                    tracing::error!(
                        binding = t.binding,
                        "a binding's body does not parse; left for its lease"
                    );
                    continue;
                };
                match self
                    .finish(&t.topic, &t.entity, &t.binding, (t.seq, t.token), &intent)
                    .await
                {
                    Ok(_) => {
                        metrics::counter!(crate::metrics::GATEWAY_SWEPT_TOTAL).increment(1);
                        tracing::info!(
                            entity = t.entity,
                            seq = t.seq,
                            "sweeper produced a bound event its holder left"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(entity = t.entity, seq = t.seq, error = %e, "sweeper could not produce; tried again later")
                    }
                }
            }
        }
        Ok(())
    }
}
