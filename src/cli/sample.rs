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
    /// Fraction of produced records that are redelivered copies (0 to below 1).
    #[arg(long, default_value_t = 0.2, value_parser = fraction_below_one)]
    duplicates: f64,
    /// Fraction of events that arrive before their entity's previous event (0 to 1).
    #[arg(long, default_value_t = 0.05, value_parser = fraction)]
    out_of_order: f64,
    /// Fraction of events that delete their entity (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
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

/// A fraction from 0 to 1, for clap.
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{text} is not a fraction from 0 to 1 (e.g. 0.2)")),
    }
}

/// A fraction from 0 to below 1: a stream of copies only has no events.
fn fraction_below_one(text: &str) -> Result<f64, String> {
    match fraction(text) {
        Ok(v) if v < 1.0 => Ok(v),
        _ => Err(format!(
            "{text} is not a fraction from 0 to below 1 (e.g. 0.2: a fifth of the records are copies)"
        )),
    }
}

/// Whether `topic` exists, asked before producing: a mistyped name would
/// otherwise wait for the producer's flush and end in a timeout.
async fn refuse_missing_topic(config: &Config, topic: &str) -> anyhow::Result<()> {
    let kafka = config.kafka.clone();
    let timeout = config.kafka.request_timeout;
    let reach =
        tokio::task::spawn_blocking(move || crate::kafka::probe(&kafka, None, timeout)).await??;
    match reach {
        crate::kafka::Reach::Answered { partitions, .. } if !partitions.contains_key(topic) => {
            anyhow::bail!(
                "topic {topic} does not exist at {}: create it (idem topics apply --dir topics, or kafka-topics.sh --create --topic {topic}) or check --topic",
                config.kafka.brokers
            )
        }
        crate::kafka::Reach::Answered { .. } => Ok(()),
        crate::kafka::Reach::NotYet(e) | crate::kafka::Reach::NotABroker(e) => anyhow::bail!(
            "no broker at {} answered within {timeout:?}: {e}. Is kafka.brokers right and the broker up?",
            config.kafka.brokers
        ),
    }
}

pub async fn run(args: SampleArgs, config: Config) -> anyhow::Result<ExitCode> {
    refuse_missing_topic(&config, &args.topic).await?;
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
