//! idem: a Kafka stream processor with exactly-once *effects* on Redis.
//!
//! Layout, following the data:
//!
//! - [`config`]: typed settings from `config/default.toml`, a file and `IDEM__…` variables.
//! - [`event`]: decoding a record into an [`event::Event`]; fingerprints.
//! - [`model`]: the decision rules as a pure function (the oracle of the tests).
//! - [`guard`]: the same rules as one atomic Redis script, many events per round trip.
//! - [`dlq`]: the dead-letter topic (invalid records, conflicts), its budget and tools.
//! - [`offsets`]: per-partition done offsets and the contiguous commit point.
//! - [`pipeline`]: the Kafka loop: fetch, decode, guard, mark done, store offsets.
//! - [`kafka`], [`store`]: the Kafka and Redis edges; [`topics`]: topics as code;
//!   [`group`]: a group's members and lag; [`replay`] and [`reconcile`]: operating on a topic's history.
//! - [`metrics`]: Prometheus names and the `/metrics` endpoint; [`sample`]: a test-data generator;
//!   [`bench`]: the benchmark and its baselines; [`conformance`]: fault injection against an oracle.

pub mod bench;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod dlq;
pub mod event;
pub mod group;
pub mod guard;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod pipeline;
pub mod reconcile;
pub mod replay;
pub mod sample;
pub mod store;
pub mod topic_reader;
pub mod topics;
