//! The gateway's metrics (docs/gateway.md, "Monitoring"): only `idem
//! gateway` exports them.

use metrics::{counter, describe_counter, describe_histogram, Unit};

pub const GATEWAY_REQUESTS_TOTAL: &str = "idem_gateway_requests_total";
pub const GATEWAY_REPLAYS_TOTAL: &str = "idem_gateway_replays_total";
pub const GATEWAY_PRODUCE_SECONDS: &str = "idem_gateway_produce_seconds";
pub const GATEWAY_READ_WAIT_SECONDS: &str = "idem_gateway_read_wait_seconds";
pub const GATEWAY_SWEPT_TOTAL: &str = "idem_gateway_swept_total";
pub const GATEWAY_CONFLICT_WAIT_SECONDS: &str = "idem_gateway_conflict_wait_seconds";

/// HELP text of the gateway's metrics (`idem gateway` calls it).
pub fn describe_gateway() {
    describe_counter!(
        GATEWAY_REQUESTS_TOTAL,
        "Requests the gateway answered, by route (write, read) and status code"
    );
    describe_counter!(
        GATEWAY_REPLAYS_TOTAL,
        "Writes answered with the response stored for their key (Idempotent-Replayed)"
    );
    describe_histogram!(
        GATEWAY_PRODUCE_SECONDS,
        Unit::Seconds,
        "Time from a bound write's produce to the brokers' acknowledgement"
    );
    describe_histogram!(
        GATEWAY_READ_WAIT_SECONDS,
        Unit::Seconds,
        "Time a read with min_seq waited for idem to decide the seq"
    );
    describe_histogram!(
        GATEWAY_CONFLICT_WAIT_SECONDS,
        Unit::Seconds,
        "Time from a key's first 409 (in flight) to the answer of a later retry with it"
    );
    describe_counter!(
        GATEWAY_SWEPT_TOTAL,
        "Bound events the sweeper produced again after their holder's lease expired"
    );
}

/// Counts one answer of the gateway.
pub fn gateway_answered(route: &'static str, status: u16) {
    counter!(GATEWAY_REQUESTS_TOTAL, "route" => route, "status" => status.to_string()).increment(1);
}
