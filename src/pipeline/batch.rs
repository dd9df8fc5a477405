//! A batch of fetched records, decoded and owned, so it can move from the
//! fetch loop to the guard stage.

use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Message};

use crate::config::Config;
use crate::event::{self, Event, Invalid};
use crate::offsets::TopicPartition;

/// One record of a batch.
pub struct Item {
    /// Index into `Batch::partitions`.
    pub partition: usize,
    pub offset: i64,
    /// The record's Kafka timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub decoded: Result<Event, Invalid>,
}

/// Records in fetch order, with the partitions they came from.
pub struct Batch {
    pub partitions: Vec<TopicPartition>,
    /// The dedupe window of each partition's topic.
    pub windows: Vec<Duration>,
    pub items: Vec<Item>,
}

impl Batch {
    /// Decodes `messages` in order.
    pub fn decode(messages: &[BorrowedMessage<'_>], config: &Config) -> Batch {
        let mut batch = Batch {
            partitions: Vec::new(),
            windows: Vec::new(),
            items: Vec::with_capacity(messages.len()),
        };
        for m in messages {
            let partition = batch.partition_index(m.topic(), m.partition(), config);
            batch.items.push(Item {
                partition,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                decoded: event::decode(m.payload(), &config.event.fields, config.event.max_bytes),
            });
        }
        batch
    }

    fn partition_index(&mut self, topic: &str, partition: i32, config: &Config) -> usize {
        // Batches hold few partitions: a linear search beats hashing here.
        if let Some(i) = self
            .partitions
            .iter()
            .position(|tp| tp.partition == partition && tp.topic == topic)
        {
            return i;
        }
        self.partitions.push(TopicPartition::new(topic, partition));
        self.windows.push(config.dedupe.window_for(topic));
        self.partitions.len() - 1
    }

    /// (partition, offset) of every record.
    pub fn positions(&self) -> impl Iterator<Item = (&TopicPartition, i64)> + '_ {
        self.items
            .iter()
            .map(|it| (&self.partitions[it.partition], it.offset))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
