//! Topics as code: TOML definitions in `topics/`, applied and checked through
//! Kafka's admin API.
//!
//! Guarantee: `apply` creates missing topics, adds partitions and sets the
//! declared settings; it never deletes a topic or shrinks one (Kafka cannot),
//! and a settings change keeps every setting it does not declare: Kafka's
//! (non-incremental) AlterConfigs resets what it is not sent, so `apply`
//! sends the topic's current explicit settings with the declared ones.

use std::collections::BTreeMap;
use std::path::Path;

use crate::kafka::QuietContext;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use serde::Deserialize;

use crate::config::{is_valid_topic_name, parse_duration};

/// One topic as declared in a `topics/*.toml` file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// Retention as a duration ("7d"), or "forever".
    #[serde(default)]
    pub retention: Option<String>,
    /// "delete", "compact" or "compact,delete".
    #[serde(default)]
    pub cleanup_policy: Option<String>,
    /// The matching dead-letter topic, created beside it with one partition per
    /// source partition.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// The matching changelog topic (`changelog.topic`, docs/change-stream.md),
    /// created beside it with as many partitions and the same retention.
    #[serde(default)]
    pub changelog: Option<String>,
    /// Other topic configs, passed as they are.
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    #[serde(default)]
    topic: Vec<TopicSpec>,
}

impl TopicSpec {
    /// A plain topic with `partitions` partitions and broker defaults.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        TopicSpec {
            name: name.into(),
            partitions,
            replication_factor: 1,
            retention: None,
            cleanup_policy: None,
            dead_letter: None,
            changelog: None,
            configs: BTreeMap::new(),
        }
    }

    /// The topic configs this spec pins, as Kafka names them.
    pub fn kafka_configs(&self) -> Result<BTreeMap<String, String>, String> {
        let mut out = self.configs.clone();
        if let Some(r) = &self.retention {
            let ms = if r == "forever" {
                "-1".to_string()
            } else {
                parse_duration(r)
                    .ok_or_else(|| format!("topic {}: retention {r:?} is not a duration like \"7d\" or \"forever\"", self.name))?
                    .as_millis()
                    .to_string()
            };
            out.insert("retention.ms".into(), ms);
        }
        if let Some(p) = &self.cleanup_policy {
            out.insert("cleanup.policy".into(), p.clone());
        }
        Ok(out)
    }

    /// The spec and, if declared, its dead-letter and changelog topics'
    /// specs. The
    /// dead-letter topic takes records as large as its source topic's (or
    /// the default `event.max_bytes`) plus room for idem's headers, so that
    /// invalid records are kept whole (docs/event-contract.md).
    pub fn with_companions(&self) -> Vec<TopicSpec> {
        let mut v = vec![self.clone()];
        if let Some(dlq) = &self.dead_letter {
            let mut d = TopicSpec::new(dlq.clone(), self.partitions);
            d.replication_factor = self.replication_factor;
            d.retention = self.retention.clone();
            let default_max = crate::config::Config::defaults().event.max_bytes;
            let source_limit = self
                .configs
                .get("max.message.bytes")
                .and_then(|v| v.parse().ok())
                .map_or(default_max, |limit: usize| limit.max(default_max));
            d.configs.insert(
                "max.message.bytes".into(),
                crate::dlq::producer_max_bytes(source_limit).to_string(),
            );
            v.push(d);
        }
        if let Some(changelog) = &self.changelog {
            let mut c = TopicSpec::new(changelog.clone(), self.partitions);
            c.replication_factor = self.replication_factor;
            c.retention = self.retention.clone();
            v.push(c);
        }
        v
    }

    fn validate(&self) -> Result<(), String> {
        if !is_valid_topic_name(&self.name) {
            return Err(format!(
                "topic name {:?} is not a valid Kafka topic name",
                self.name
            ));
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err(format!(
                "topic {}: partitions and replication_factor must be at least 1",
                self.name
            ));
        }
        self.kafka_configs().map(|_| ())
    }
}

/// Reads every `*.toml` in `dir`, dead-letter topics included. A folder
/// without any is refused: it is almost always the wrong folder, and
/// "nothing to change" would hide that.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<TopicSpec>> {
    let mut specs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read topics folder {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!(
            "no *.toml topic files in {}: give the folder of your topic declarations \
             (--dir for idem topics, --topics for idem check; topics/demo.toml shows the form)",
            dir.display()
        );
    }
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        let file: TopicsFile =
            toml_from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for spec in file.topic {
            spec.validate()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            specs.extend(spec.with_companions());
        }
    }
    Ok(specs)
}

fn toml_from_str(text: &str) -> Result<TopicsFile, String> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}

/// What `apply` did or `check` found for one topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TopicState {
    Created,
    PartitionsAdded {
        from: i32,
        to: i32,
    },
    UpToDate,
    Missing,
    PartitionDrift {
        declared: i32,
        actual: i32,
    },
    ConfigDrift {
        key: String,
        declared: String,
        actual: String,
    },
    /// `apply` set a declared setting (`from` is the value before).
    ConfigSet {
        key: String,
        from: String,
        to: String,
    },
    /// More partitions than declared: Kafka cannot remove partitions.
    CannotShrink {
        declared: i32,
        actual: i32,
    },
}

fn admin(kafka: &crate::config::KafkaConfig) -> anyhow::Result<AdminClient<QuietContext>> {
    Ok(crate::kafka::base_config(kafka).create_with_context(QuietContext)?)
}

fn partition_counts(
    kafka: &crate::config::KafkaConfig,
    admin: &AdminClient<QuietContext>,
) -> anyhow::Result<BTreeMap<String, i32>> {
    crate::kafka::partition_counts_of(admin.inner(), kafka.request_timeout)
        .map_err(|e| super::unanswered(kafka, "listing topics", e))
}

/// Creates missing topics, adds missing partitions and sets declared
/// settings that differ; with `execute` false only reports what it would
/// do (the plan). A topic with more partitions than declared is reported as
/// `CannotShrink`.
pub async fn apply(
    kafka: &crate::config::KafkaConfig,
    specs: &[TopicSpec],
    execute: bool,
) -> anyhow::Result<Vec<(String, TopicState)>> {
    let admin = admin(kafka)?;
    let existing = partition_counts(kafka, &admin)?;
    let mut report = Vec::new();
    let mut changed = Vec::new();
    for spec in specs {
        let Some(&actual) = existing.get(&spec.name) else {
            if execute {
                create(kafka, &admin, spec).await?;
                changed.push((spec.name.clone(), spec.partitions));
            }
            report.push((spec.name.clone(), TopicState::Created));
            continue;
        };
        let mut states = Vec::new();
        if actual < spec.partitions {
            if execute {
                add_partitions(kafka, &admin, spec).await?;
                changed.push((spec.name.clone(), spec.partitions));
            }
            states.push(TopicState::PartitionsAdded {
                from: actual,
                to: spec.partitions,
            });
        } else if actual > spec.partitions {
            states.push(TopicState::CannotShrink {
                declared: spec.partitions,
                actual,
            });
        }
        states.extend(set_configs(kafka, &admin, spec, execute).await?);
        if states.is_empty() {
            states.push(TopicState::UpToDate);
        }
        report.extend(states.into_iter().map(|st| (spec.name.clone(), st)));
    }
    await_visible(kafka, &admin, &changed).await?;
    Ok(report)
}

/// Waits until the cluster's metadata shows every topic just created or
/// grown with its partitions. The broker answers CreateTopics before its
/// metadata cache knows the topic, so without the wait an `idem check` or
/// `idem run` started right after `apply` can find it missing.
async fn await_visible(
    kafka: &crate::config::KafkaConfig,
    admin: &AdminClient<QuietContext>,
    changed: &[(String, i32)],
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + kafka.request_timeout;
    loop {
        let counts = partition_counts(kafka, admin)?;
        let pending: Vec<&str> = changed
            .iter()
            .filter(|(name, n)| counts.get(name).is_none_or(|have| have < n))
            .map(|(name, _)| name.as_str())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the brokers do not show {} yet, {:?} after creating: run `idem topics apply` again to see them",
                pending.join(", "),
                kafka.request_timeout
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn create(
    kafka: &crate::config::KafkaConfig,
    admin: &AdminClient<QuietContext>,
    spec: &TopicSpec,
) -> anyhow::Result<()> {
    let opts = AdminOptions::new().operation_timeout(Some(kafka.request_timeout));
    let configs = spec.kafka_configs().map_err(|e| anyhow::anyhow!(e))?;
    let mut topic = NewTopic::new(
        &spec.name,
        spec.partitions,
        TopicReplication::Fixed(spec.replication_factor),
    );
    for (k, v) in &configs {
        topic = topic.set(k, v);
    }
    for r in admin.create_topics([&topic], &opts).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name} failed: {code}"),
        }
    }
    Ok(())
}

async fn add_partitions(
    kafka: &crate::config::KafkaConfig,
    admin: &AdminClient<QuietContext>,
    spec: &TopicSpec,
) -> anyhow::Result<()> {
    let opts = AdminOptions::new().operation_timeout(Some(kafka.request_timeout));
    let np = NewPartitions::new(&spec.name, spec.partitions as usize);
    for r in admin.create_partitions([&np], &opts).await? {
        if let Err((name, code)) = r {
            anyhow::bail!("adding partitions to {name} failed: {code}");
        }
    }
    Ok(())
}

/// The declared settings that differ from the topic's (as `ConfigSet`),
/// set when `execute`: the topic's current explicit settings are sent
/// along, so that none of them falls back to the broker default.
async fn set_configs(
    kafka: &crate::config::KafkaConfig,
    admin: &AdminClient<QuietContext>,
    spec: &TopicSpec,
    execute: bool,
) -> anyhow::Result<Vec<TopicState>> {
    let declared = spec.kafka_configs().map_err(|e| anyhow::anyhow!(e))?;
    if declared.is_empty() {
        return Ok(Vec::new());
    }
    let opts = AdminOptions::new().request_timeout(Some(kafka.request_timeout));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.name)], &opts)
        .await?;
    let Some(Ok(resource)) = described.into_iter().next() else {
        anyhow::bail!("cannot read the settings of topic {}", spec.name);
    };
    let current = |key: &str| {
        resource
            .entries
            .iter()
            .find(|e| e.name == key)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    let changes: Vec<TopicState> = declared
        .iter()
        .filter(|(key, want)| &current(key) != *want)
        .map(|(key, want)| TopicState::ConfigSet {
            key: key.clone(),
            from: current(key),
            to: want.clone(),
        })
        .collect();
    if execute && !changes.is_empty() {
        let mut full: BTreeMap<String, String> = resource
            .entries
            .iter()
            .filter(|e| e.source == ConfigSource::DynamicTopic && !e.is_sensitive)
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        full.extend(declared.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&spec.name));
        for (k, v) in &full {
            alter = alter.set(k, v);
        }
        for r in admin.alter_configs([&alter], &opts).await? {
            if let Err((_, code)) = r {
                anyhow::bail!("setting the configs of topic {} failed: {code}", spec.name);
            }
        }
    }
    Ok(changes)
}

/// Compares the declared topics with the cluster; drift is reported, not fixed.
pub async fn check(
    kafka: &crate::config::KafkaConfig,
    specs: &[TopicSpec],
) -> anyhow::Result<Vec<(String, TopicState)>> {
    let admin = admin(kafka)?;
    let existing = partition_counts(kafka, &admin)?;
    let opts = AdminOptions::new().request_timeout(Some(kafka.request_timeout));
    let mut report = Vec::new();
    for spec in specs {
        let Some(&actual) = existing.get(&spec.name) else {
            report.push((spec.name.clone(), TopicState::Missing));
            continue;
        };
        if actual != spec.partitions {
            report.push((
                spec.name.clone(),
                TopicState::PartitionDrift {
                    declared: spec.partitions,
                    actual,
                },
            ));
        }
        let declared = spec.kafka_configs().map_err(|e| anyhow::anyhow!(e))?;
        if !declared.is_empty() {
            let described = admin
                .describe_configs([&ResourceSpecifier::Topic(&spec.name)], &opts)
                .await?;
            for resource in described.into_iter().flatten() {
                for (key, want) in &declared {
                    let got = resource
                        .get(key)
                        .and_then(|e| e.value.clone())
                        .unwrap_or_default();
                    if &got != want {
                        report.push((
                            spec.name.clone(),
                            TopicState::ConfigDrift {
                                key: key.clone(),
                                declared: want.clone(),
                                actual: got,
                            },
                        ));
                    }
                }
            }
        }
        if !report.iter().any(|(n, _)| n == &spec.name) {
            report.push((spec.name.clone(), TopicState::UpToDate));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_file_parses_with_companions() {
        let file = toml_from_str(
            r#"
            [[topic]]
            name = "orders"
            partitions = 12
            retention = "7d"
            cleanup_policy = "delete"
            dead_letter = "orders.dlq"
            changelog = "orders.changes"
            [topic.configs]
            "max.message.bytes" = "2097152"
            "#,
        )
        .unwrap();
        let specs = file.topic[0].with_companions();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[1].name, "orders.dlq");
        assert_eq!(
            (specs[2].name.as_str(), specs[2].partitions),
            ("orders.changes", 12)
        );
        assert_eq!(
            specs[2].kafka_configs().unwrap()["retention.ms"],
            "604800000"
        );
        let configs = specs[0].kafka_configs().unwrap();
        assert_eq!(configs["retention.ms"], "604800000");
        assert_eq!(configs["cleanup.policy"], "delete");
        assert_eq!(configs["max.message.bytes"], "2097152");
        // The dead-letter topic takes the source's largest record plus idem's headers.
        assert_eq!(
            specs[1].kafka_configs().unwrap()["max.message.bytes"],
            (2_097_152 + crate::dlq::HEADROOM_BYTES).to_string()
        );
    }

    #[test]
    fn bad_specs_are_rejected() {
        assert!(TopicSpec::new("bad name", 1).validate().is_err());
        assert!(TopicSpec::new("ok", 0).validate().is_err());
        let mut s = TopicSpec::new("ok", 1);
        s.retention = Some("a while".into());
        assert!(s.validate().is_err());
    }
}
