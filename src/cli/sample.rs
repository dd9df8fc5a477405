//! `idem sample`: produce a generated stream for demos and trials.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Config;
use crate::tools::sample::{generate, SampleSpec};

/// Produce a generated event stream to try idem out
///
/// Events are keyed by entity, with redelivered duplicates and out-of-order
/// arrivals at the rates given.
///
/// Example:
///   idem sample --topic demo --events 10000 --entities 100 --duplicates 0.2
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct SampleArgs {
    /// Topic to produce to.
    #[arg(long)]
    topic: String,
    /// Distinct events (intents) to generate.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Number of entities the events are spread over.
    #[arg(long, default_value_t = 100)]
    entities: usize,
    /// Fraction of produced records that are redelivered copies.
    #[arg(long, default_value_t = 0.2)]
    duplicates: f64,
    /// Fraction of events that arrive before their entity's previous event.
    #[arg(long, default_value_t = 0.05)]
    out_of_order: f64,
    /// Fraction of events that delete their entity.
    #[arg(long, default_value_t = 0.0)]
    deletes: f64,
    /// Seed of the generator: the same seed gives the same stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Prefix of ids and entity names.
    #[arg(long, default_value = "demo")]
    prefix: String,
    /// Skew the entities' popularity: the k-th most popular gets events in
    /// proportion to 1/k^S (Zipf; 1.1 makes the hottest of 10,000 take 15%).
    /// Without it every entity is equally likely.
    #[arg(long, value_name = "S")]
    zipf: Option<f64>,
}

pub async fn run(args: SampleArgs, config: Config) -> anyhow::Result<ExitCode> {
    let spec = SampleSpec {
        events: args.events,
        entities: args.entities,
        duplicate_ratio: args.duplicates,
        out_of_order_ratio: args.out_of_order,
        delete_ratio: args.deletes,
        data_bytes: 16,
        seed: args.seed,
        prefix: args.prefix,
        zipf: args.zipf,
    };
    let records = generate(&spec);
    let producer: FutureProducer = crate::kafka::base_config(&config.kafka)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()?;
    let total = records.len();
    for (i, r) in records.iter().enumerate() {
        let record = FutureRecord::to(&args.topic).key(&r.key).payload(&r.value);
        let mut record = Some(record);
        while let Some(rec) = record.take() {
            match producer.send_result(rec) {
                Ok(_) => {}
                Err((e, rec))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    producer.poll(Duration::from_millis(50));
                    record = Some(rec);
                }
                Err((e, _)) => anyhow::bail!("producing to {}: {e}", args.topic),
            }
        }
        if (i + 1) % 50_000 == 0 {
            eprintln!("produced {}/{total}", i + 1);
        }
    }
    producer.flush(Duration::from_secs(30))?;
    crate::outln!(
        "produced {total} records ({} events, {} entities) to {}",
        spec.events,
        spec.entities,
        args.topic
    );
    Ok(ExitCode::SUCCESS)
}
