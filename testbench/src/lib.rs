//! idem's test bench, apart from the product: the conformance suite (fault
//! injection against an oracle), the benchmark with its baselines, and the
//! harness that idem's own integration tests share with them. It drives the
//! real `idem` binary and real services; it may run `kill`, `redis-server`
//! and shell commands, which is why it does not ship inside `idem`.
//!
//! - [`process`]: starting `idem run`, free ports, signals, memory readings.
//! - [`services`]: the local Kafka and Redis, unique names.
//! - [`oracle`]: what idem must have done with a stream, from the pure model.
//! - [`payments`]: a payments stream with counters, a ledger and a custom effect.
//! - [`exposition`]: reading `/metrics` (sums by label, histogram buckets).
//! - [`conformance`]: the fault-injection suite (`idem-testbench conformance`).
//! - [`bench`]: the benchmark (`idem-testbench bench`).
//! - [`handover`]: partitions without an owner per group protocol (`idem-testbench handover`).

pub mod bench;
pub mod conformance;
pub mod exposition;
pub mod handover;
pub mod oracle;
pub mod payments;
pub mod process;
pub mod services;
