//! `idem gateway`: the front door. An HTTP request with an
//! `Idempotency-Key` becomes one event on a dense topic, once, whatever
//! the client's retries; a read waits until idem has decided the seq the
//! write was given (docs/gateway.md).
//!
//! One write's path: authenticate, bound the rate, read the body and
//! check it with the consumer's own decoder and effects, then BIND the key
//! in the entity's slot (`binding`). A new binding is produced with an
//! idempotent producer and its `202` stored with the key after the
//! broker's acknowledgement; a stored key answers its response byte for
//! byte; another body under the key is `422`; a key in flight is `409`.
//! A holder that crashed leaves a lease that expires: the client's retry
//! or the sweeper takes it over and produces the same bound event again,
//! a copy the dense rule drops.
//!
//! Guarantee: a seq, once bound, is never given up (the sweeper finishes
//! it), so the gateway's topics have no holes; and no seq is bound under
//! an epoch idem has not caught up with (`fence`).

pub mod binding;
mod callers;
mod fence;
mod read;
pub mod request;
mod routes;
mod service;

use crate::config::Config;
use crate::effects::StateOrder;

pub use binding::MAX_UNACKED;
pub use service::Gateway;

/// Why the configuration cannot run a gateway, one line each (empty: it can).
pub fn refusals(config: &Config) -> Vec<String> {
    let gw = &config.gateway;
    let mut refused = Vec::new();
    if gw.topics.is_empty() {
        refused.push("gateway.topics is empty: name the topics the gateway writes (e.g. IDEM__GATEWAY__TOPICS=payments)".to_string());
    }
    if gw.tokens_file.is_empty() {
        refused.push("gateway.tokens_file is not set: callers authenticate with bearer tokens listed there (docs/gateway.md, \"Callers\")".to_string());
    }
    for topic in &gw.topics {
        if !config.dedupe.dense_seq_topics.contains(topic) {
            refused.push(format!("gateway topic {topic} is not in dedupe.dense_seq_topics: the gateway numbers its entities' seqs densely, and only the dense rule recognises a bound event produced again after the window (add it)"));
        }
        let policy = config.policy(topic);
        if policy.rules.iter().any(|r| r.ledger.is_some()) {
            refused.push(format!("gateway topic {topic} has ledger effects: a ledger keeps arrival order, and writes through several gateway instances arrive in any order (use counters or sets)"));
        }
    }
    if config.effects.state_order != StateOrder::PerField && !gw.topics.is_empty() {
        refused.push("state.order must be \"per_field\" under the gateway: writes to one entity through several instances reach the log in any order, and only per-field order makes the result the writes applied in seq order (docs/gateway.md, \"Concurrent writers\")".to_string());
    }
    if config.event.format == crate::event::EventFormat::CloudEvents {
        refused.push("event.format = \"cloudevents\": the gateway writes idem's envelope; use \"auto\" or \"idem\"".to_string());
    }
    refused
}

/// `idem gateway`: serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listen = config.gateway.listen;
    let gateway = Gateway::start(config).await?;
    gateway.spawn_background();
    let address = crate::http::serve(listen, routes::router(gateway))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on gateway.listen = {listen}: {e}"))?;
    tracing::info!(address = %address, "gateway listening");
    shutdown.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)]) -> Config {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(None, &env).unwrap()
    }

    #[test]
    fn a_gateway_starts_only_on_dense_topics_under_per_field_order() {
        let ok = [
            ("IDEM__KAFKA__TOPICS", "pay"),
            ("IDEM__GATEWAY__TOPICS", "pay"),
            ("IDEM__GATEWAY__TOKENS_FILE", "tokens"),
            ("IDEM__DEDUPE__DENSE_SEQ_TOPICS", "pay"),
            ("IDEM__STATE__ORDER", "per_field"),
        ];
        assert_eq!(refusals(&config(&ok)), Vec::<String>::new());
        let mut sparse = ok.to_vec();
        sparse[3] = ("IDEM__DEDUPE__DENSE_SEQ_TOPICS", "other");
        let refused = refusals(&config(&sparse));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("pay is not in dedupe.dense_seq_topics"));
        let mut ordered = ok.to_vec();
        ordered[4] = ("IDEM__STATE__ORDER", "per_entity");
        assert!(refusals(&config(&ordered))[0].contains("per_field"));
        let none = refusals(&config(&[]));
        assert!(none.iter().any(|r| r.contains("gateway.topics is empty")));
        assert!(none.iter().any(|r| r.contains("gateway.tokens_file")));
    }
}
