//! The log's identity: a topic's id (KIP-516), which changes when a topic
//! is deleted and created again under the same name, or when a mirror on
//! another cluster takes over. Offsets restart at 0 in a new incarnation, so
//! everything idem keys by offset (decided ranges, offset marks) is keyed by
//! this id too.
//!
//! rust-rdkafka 0.39 has no call for it; librdkafka's `DescribeTopics` (2.3+)
//! has, through rdkafka's own bindings. This file holds idem's only
//! `unsafe`: one admin request on a client idem already has, its event read
//! from a private queue, every object destroyed on every path.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};

use crate::consumed::TopicId;

/// Why the ids could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopicIdError {
    #[error("the brokers did not describe the topics within {0:?}")]
    Timeout(Duration),
    #[error("describing the topics failed: {0}")]
    Request(String),
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
}

/// The id of `topic` as the brokers give it now (`None`: a broker without
/// topic ids), through a client of its own: for the tools, off the pipeline.
pub async fn topic_id_of(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
) -> anyhow::Result<Option<TopicId>> {
    let (kafka, topics) = (kafka.clone(), vec![topic.to_string()]);
    let mut ids = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let client: rdkafka::consumer::BaseConsumer<super::QuietContext> =
            super::base_config(&kafka).create_with_context(super::QuietContext)?;
        Ok(topic_ids(
            rdkafka::consumer::Consumer::client(&client),
            &topics,
            kafka.request_timeout,
        )?)
    })
    .await??;
    Ok(ids.remove(topic))
}

/// The ids of `topics`, by name; a topic without an id (an old broker) is
/// left out. Blocking: call it off the async runtime.
pub fn topic_ids<C: ClientContext>(
    client: &Client<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, TopicId>, TopicIdError> {
    let names: Vec<CString> = topics
        .iter()
        .map(|t| CString::new(t.as_str()).expect("topic names have no NUL"))
        .collect();
    let mut pointers: Vec<*const std::os::raw::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let rk = client.native_ptr();
    // SAFETY: `rk` is a live client for the whole call (borrowed); every
    // object created here is destroyed before returning, and the result's
    // descriptions are read before their event is destroyed.
    unsafe {
        let collection =
            rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        // The request's own timeout answers first; the margin covers the poll.
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1_000));
        let result = if event.is_null() {
            Err(TopicIdError::Timeout(timeout))
        } else {
            let read = read_result(event);
            rd::rd_kafka_event_destroy(event);
            read
        };
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(collection);
        result
    }
}

/// The descriptions of a `DescribeTopics` result event.
///
/// # Safety
/// `event` is a live event returned by `rd_kafka_queue_poll`.
unsafe fn read_result(
    event: *mut rd::rd_kafka_event_t,
) -> Result<BTreeMap<String, TopicId>, TopicIdError> {
    if rd::rd_kafka_event_error(event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(TopicIdError::Request(text(
            rd::rd_kafka_event_error_string(event),
        )));
    }
    let result = rd::rd_kafka_event_DescribeTopics_result(event);
    if result.is_null() {
        return Err(TopicIdError::Request(
            "the answer was not a topic description".into(),
        ));
    }
    let mut count = 0usize;
    let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
    let mut ids = BTreeMap::new();
    for i in 0..count {
        let description = *descriptions.add(i);
        let topic = text(rd::rd_kafka_TopicDescription_name(description));
        let error = rd::rd_kafka_TopicDescription_error(description);
        if !error.is_null()
            && rd::rd_kafka_error_code(error) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            let message = text(rd::rd_kafka_error_string(error));
            return Err(TopicIdError::Topic { topic, message });
        }
        let uuid = rd::rd_kafka_TopicDescription_topic_id(description);
        if uuid.is_null() {
            continue;
        }
        let most = rd::rd_kafka_Uuid_most_significant_bits(uuid);
        let least = rd::rd_kafka_Uuid_least_significant_bits(uuid);
        if let Some(id) = TopicId::from_bits(most, least) {
            ids.insert(topic, id);
        }
    }
    Ok(ids)
}

/// A C string librdkafka owns, copied.
///
/// # Safety
/// `s` is null or a NUL-terminated string alive for the call.
pub(super) unsafe fn text(s: *const std::os::raw::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    CStr::from_ptr(s).to_string_lossy().into_owned()
}
