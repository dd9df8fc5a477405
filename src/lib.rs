//! idem: a Kafka stream processor with exactly-once *effects* on Redis.
//!
//! Layout, in dependency order: each part uses only the parts above it
//! (`python3 scripts/module-graph.py src` checks the order and that no
//! submodules import each other in a circle; `make lint` runs it).
//!
//! What an event is and what it does, pure:
//! - [`event`]: decoding a record into an [`event::Event`]; fingerprints.
//! - [`effects`]: what an event does, declared per topic and event type:
//!   merge, replace, counters, ledger, sets, custom Lua; planned purely.
//! - [`config`]: typed settings from `config/default.toml`, a file and `IDEM__…` variables.
//! - [`version`]: this build's release and commit; the release each
//!   setting needs from every member of a group.
//! - [`consumed`]: which records of a partition were decided, forever: the
//!   decided ranges and the entities' offset marks, and the re-read rule.
//! - [`model`]: the decision rules as a pure function (the oracle of the tests).
//! - [`offsets`]: per-partition done offsets and the contiguous commit point.
//!
//! The edges:
//! - [`http`]: the HTTP server and client every endpoint shares (axum on
//!   hyper): keep-alive, HEAD, 404/405, timeouts, a bounded body.
//! - [`metrics`]: Prometheus names and the `/metrics` and `/readyz` endpoints.
//! - [`kafka`]: client settings and the start-up check of credentials.
//! - [`store`]: the Redis connection, key layout and start-up checks.
//!
//! The data path:
//! - [`resume`]: where an assigned partition resumes: the commit, or where
//!   Redis's own progress records say its state stops (lost, rolled back).
//! - [`guard`]: the decision rules as one atomic Redis script, many events per round trip.
//! - [`dlq`]: the dead-letter topic (invalid records, conflicts) and its budget.
//! - [`relay`]: publishes the changes the guard wrote to the outboxes to
//!   the changelog topics (`changelog.topics`), under a lease.
//! - [`pipeline`]: the Kafka loop: fetch, decode, guard, mark done, commit;
//!   rebalances and the guard stage's reports arrive in it as messages.
//!
//! On top:
//! - [`tools`]: the operator's tools: topics as code, a group's lag, replay,
//!   reconcile, dead-letter inspection and redrive, the sample generator.
//! - [`gateway`]: `idem gateway`, the HTTP front door: a request with an
//!   Idempotency-Key becomes one event on a dense topic, and reads wait for
//!   idem's decision of the seq it was given.
//! - [`cli`]: the `idem` command line over all of it.

pub mod cli;
pub mod config;
pub mod consumed;
pub mod dlq;
pub mod effects;
pub mod event;
pub mod gateway;
pub mod guard;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod pipeline;
pub mod relay;
pub mod resume;
pub mod store;
pub mod tools;
pub mod version;
