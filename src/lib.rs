//! idem: a Kafka stream processor with exactly-once *effects* on Redis.
//!
//! Layout, following the data. Dependencies point down this list, never up
//! (`python3 scripts/module-graph.py` checks it).
//!
//! The data path:
//! - [`config`]: typed settings from `config/default.toml`, a file and `IDEM__…` variables.
//! - [`event`]: decoding a record into an [`event::Event`]; fingerprints.
//! - [`effects`]: what an event does, declared per topic and event type:
//!   merge, replace, counters, ledger, sets, custom Lua; planned purely.
//! - [`model`]: the decision rules as a pure function (the oracle of the tests).
//! - [`guard`]: the same rules as one atomic Redis script, many events per round trip.
//! - [`offsets`]: per-partition done offsets and the contiguous commit point.
//! - [`resume`]: where an assigned partition resumes: the commit, or where
//!   Redis's own progress records say its state stops (lost, rolled back).
//! - [`dlq`]: the dead-letter topic (invalid records, conflicts) and its budget.
//! - [`pipeline`]: the Kafka loop: fetch, decode, guard, mark done, commit;
//!   rebalances arrive in it as messages.
//!
//! The edges:
//! - [`kafka`]: client settings and the start-up check of credentials;
//! - [`store`]: the Redis connection, key layout and start-up checks;
//! - [`metrics`]: Prometheus names and the `/metrics` and `/readyz` endpoints.
//!
//! The operator's tools, [`tools`]: topics as code, a group's lag, replay,
//! reconcile, dead-letter inspection and redrive, the sample generator;
//! and [`cli`], the `idem` command line over all of it.

pub mod cli;
pub mod config;
pub mod dlq;
pub mod effects;
pub mod event;
pub mod guard;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod pipeline;
pub mod resume;
pub mod store;
pub mod tools;
