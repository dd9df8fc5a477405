//! Describing a consumer group under either group protocol. rust-rdkafka
//! 0.39's `fetch_group_list` sends the classic protocol's DescribeGroups,
//! which knows nothing of a group of the consumer protocol (KIP-848): such
//! a group reads as `Dead` with no member, and a tool that trusts it
//! rewrites the offsets of a running group. librdkafka's
//! `DescribeConsumerGroups` (2.4+) asks ConsumerGroupDescribe first and
//! falls back to DescribeGroups, so it describes both. The same pattern as
//! `topic_ids`: one admin request, its event read from a private queue,
//! every object destroyed on every path.

use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};

use super::topic_ids::text;

/// A group as the coordinator describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// `Stable`, `Empty`, `Dead`, `PreparingRebalance`, … (`Dead` for a
    /// group the coordinator does not know).
    pub state: String,
    /// `classic` or `consumer` (`unknown` for a group that does not exist).
    pub protocol: String,
    pub members: Vec<MemberDescription>,
}

/// One member and the partitions assigned to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    /// (topic, partition), in the order the coordinator gives them.
    pub assignment: Vec<(String, i32)>,
}

/// Why the group could not be described.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("the brokers did not describe group {group} within {timeout:?}")]
    Timeout { group: String, timeout: Duration },
    #[error("describing group {group} failed: {message}")]
    Request { group: String, message: String },
}

/// Describes `group` (blocking: call it off the async runtime).
pub fn describe_group<C: ClientContext>(
    client: &Client<C>,
    group: &str,
    timeout: Duration,
) -> Result<GroupDescription, GroupError> {
    let name = std::ffi::CString::new(group).map_err(|_| GroupError::Request {
        group: group.to_string(),
        message: "the group name holds a NUL byte".into(),
    })?;
    let mut pointers = [name.as_ptr()];
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let rk = client.native_ptr();
    // SAFETY: `rk` is a live client for the whole call (borrowed); every
    // object created here is destroyed before returning, and the result's
    // descriptions are read before their event is destroyed.
    unsafe {
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
        );
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeConsumerGroups(rk, pointers.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1_000));
        let result = if event.is_null() {
            Err(GroupError::Timeout {
                group: group.to_string(),
                timeout,
            })
        } else {
            let read = read_result(event, group, timeout);
            rd::rd_kafka_event_destroy(event);
            read
        };
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        result
    }
}

/// The one description of a `DescribeConsumerGroups` result event.
///
/// # Safety
/// `event` is a live event returned by `rd_kafka_queue_poll`.
unsafe fn read_result(
    event: *mut rd::rd_kafka_event_t,
    group: &str,
    timeout: Duration,
) -> Result<GroupDescription, GroupError> {
    let failed = |message: String| GroupError::Request {
        group: group.to_string(),
        message,
    };
    match rd::rd_kafka_event_error(event) {
        rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => {}
        rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT => {
            return Err(GroupError::Timeout {
                group: group.to_string(),
                timeout,
            })
        }
        _ => return Err(failed(text(rd::rd_kafka_event_error_string(event)))),
    }
    let result = rd::rd_kafka_event_DescribeConsumerGroups_result(event);
    if result.is_null() {
        return Err(failed("the answer was not a group description".into()));
    }
    let mut count = 0usize;
    let groups = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut count);
    if count == 0 {
        return Err(failed("the answer described no group".into()));
    }
    let description = *groups;
    let error = rd::rd_kafka_ConsumerGroupDescription_error(description);
    if !error.is_null() {
        let code = rd::rd_kafka_error_code(error);
        if code == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND {
            return Ok(GroupDescription {
                state: "Dead".into(),
                protocol: "unknown".into(),
                members: Vec::new(),
            });
        }
        if code == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT {
            return Err(GroupError::Timeout {
                group: group.to_string(),
                timeout,
            });
        }
        if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(failed(text(rd::rd_kafka_error_string(error))));
        }
    }
    let state = text(rd::rd_kafka_consumer_group_state_name(
        rd::rd_kafka_ConsumerGroupDescription_state(description),
    ));
    let protocol = text(rd::rd_kafka_consumer_group_type_name(
        rd::rd_kafka_ConsumerGroupDescription_type(description),
    ))
    .to_lowercase();
    let mut members = Vec::new();
    for i in 0..rd::rd_kafka_ConsumerGroupDescription_member_count(description) {
        let member = rd::rd_kafka_ConsumerGroupDescription_member(description, i);
        if member.is_null() {
            continue;
        }
        members.push(MemberDescription {
            member_id: text(rd::rd_kafka_MemberDescription_consumer_id(member)),
            client_id: text(rd::rd_kafka_MemberDescription_client_id(member)),
            host: text(rd::rd_kafka_MemberDescription_host(member)),
            assignment: assignment(rd::rd_kafka_MemberDescription_assignment(member)),
        });
    }
    Ok(GroupDescription {
        state,
        protocol,
        members,
    })
}

/// A member's assigned partitions.
///
/// # Safety
/// `assignment` is null or a live assignment of a live description.
unsafe fn assignment(assignment: *const rd::rd_kafka_MemberAssignment_t) -> Vec<(String, i32)> {
    if assignment.is_null() {
        return Vec::new();
    }
    let list = rd::rd_kafka_MemberAssignment_partitions(assignment);
    if list.is_null() {
        return Vec::new();
    }
    let list = &*list;
    (0..list.cnt.max(0) as usize)
        .map(|i| {
            let e = &*list.elems.add(i);
            (text(e.topic), e.partition)
        })
        .collect()
}
