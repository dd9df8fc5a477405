//! `idem gateway`: the HTTP front door.

use std::process::ExitCode;

use clap::Args;

use crate::config::Config;

/// Serve the HTTP front door: writes with an Idempotency-Key become events, once
///
/// POST /v1/topics/{topic}/entities/{entity}/events with a JSON body
/// {"type": "...", "data": {...}} and an Idempotency-Key header binds the
/// key to the entity's next seq and produces one event; a retry with the
/// same key and body gets the stored 202 byte for byte (Idempotent-Replayed:
/// true), another body under the key 422, a retry while the first is in
/// flight 409 with Retry-After.
///
/// GET /v1/topics/{topic}/entities/{entity}?min_seq=N&timeout=2s answers
/// the entity's state once idem decided seq N (read your own writes), with
/// an ETag (If-None-Match: 304).
///
/// Needs: gateway.topics (each in dedupe.dense_seq_topics), state.order =
/// "per_field", gateway.tokens_file, and an `idem run` consuming the topics
/// on the same Redis and prefix. docs/gateway.md has the rest.
///
/// Example:
///   IDEM__GATEWAY__TOPICS=payments IDEM__DEDUPE__DENSE_SEQ_TOPICS=payments \
///   IDEM__STATE__ORDER=per_field IDEM__GATEWAY__TOKENS_FILE=tokens idem gateway
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct GatewayArgs {}

pub async fn run(_args: GatewayArgs, config: Config) -> anyhow::Result<ExitCode> {
    let mut refusals = config.refusals();
    refusals.extend(crate::gateway::refusals(&config));
    if !refusals.is_empty() {
        eprintln!("error: {}", refusals.join("\nerror: "));
        return Ok(ExitCode::from(super::EXIT_FAILED));
    }
    let handle = crate::metrics::install(&config.kafka.group_id, &config.redis.key_prefix)?;
    crate::metrics::describe_gateway();
    crate::metrics::serve(
        config.metrics.listen,
        handle,
        crate::metrics::Health::default(),
    )
    .await?;
    crate::gateway::run(config, super::run::wait_for_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
