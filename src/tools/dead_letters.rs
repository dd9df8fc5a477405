//! Reading the dead-letter topic back: `idem dlq inspect` here, `idem dlq
//! redrive` in redrive.rs. Both read with their own consumer (assigned
//! partitions, no group commits), from the start of the topic up to its end
//! at the time of the call.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::dlq::header;
use crate::tools::topic_reader::{read_topic, TopicRecord};

/// A dead-letter record as read back.
pub type DlqRecord = TopicRecord;

impl DlqRecord {
    pub fn reason(&self) -> &str {
        self.header(header::REASON).unwrap_or("unknown")
    }

    /// The source record it was dead-lettered from, `topic[partition]@offset`
    /// (`None` without idem's provenance headers).
    pub fn source(&self) -> Option<String> {
        Some(format!(
            "{}[{}]@{}",
            self.header(header::TOPIC)?,
            self.header(header::PARTITION)?,
            self.header(header::OFFSET)?
        ))
    }

    /// The record's own headers, without the ones idem added.
    pub fn original_headers(&self) -> impl Iterator<Item = &(String, Vec<u8>)> {
        self.headers
            .iter()
            .filter(|(k, _)| !k.starts_with(header::PREFIX))
    }
}

/// Calls `each` for every record of the dead-letter `topic`. Blocking.
pub fn read_all(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    each: impl FnMut(DlqRecord),
) -> anyhow::Result<u64> {
    read_topic(kafka, topic, each, |_| {})
}

/// What `idem dlq inspect` reports.
#[derive(Debug, Default, Serialize)]
pub struct Inspection {
    pub topic: String,
    /// Dead letters read.
    pub records: u64,
    /// The distinct source records among them (topic, partition, offset):
    /// a record dead-lettered again on a re-read is one source, two copies.
    pub sources: u64,
    /// Source records per reason, each counted once whatever its copies.
    pub by_reason: BTreeMap<String, u64>,
    pub examples: Vec<Example>,
}

/// One example record of a reason.
#[derive(Debug, Serialize)]
pub struct Example {
    pub reason: String,
    pub message: String,
    pub original: String,
    pub dlq_offset: String,
    pub value_preview: String,
}

pub fn inspect(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    examples_per_reason: usize,
) -> anyhow::Result<Inspection> {
    let mut out = Inspection {
        topic: topic.to_string(),
        ..Inspection::default()
    };
    let mut seen: HashSet<String> = HashSet::new();
    out.records = read_all(kafka, topic, |r| {
        let original = r.source();
        // A dead letter without provenance is its own source.
        if original.as_ref().is_some_and(|s| !seen.insert(s.clone())) {
            return;
        }
        out.sources += 1;
        let reason = r.reason().to_string();
        let n = out.by_reason.entry(reason.clone()).or_default();
        *n += 1;
        if *n as usize <= examples_per_reason {
            let preview = r
                .value
                .as_deref()
                .map(|v| String::from_utf8_lossy(&v[..v.len().min(160)]).into_owned())
                .unwrap_or_else(|| "(no value)".into());
            out.examples.push(Example {
                reason,
                message: r.header(header::MESSAGE).unwrap_or("").to_string(),
                original: original.unwrap_or_else(|| "?".into()),
                dlq_offset: format!("[{}]@{}", r.partition, r.offset),
                value_preview: preview,
            });
        }
    })?;
    Ok(out)
}
