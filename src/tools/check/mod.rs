//! `idem check`: everything `idem run` needs, checked once, one line per
//! check, before anything is consumed. Nothing is written anywhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::config::{Config, GroupProtocol};
use crate::dlq::TopicState as DlqTopic;
use crate::kafka::Reach;
use crate::tools::topics::{self, TopicState};

mod redis_checks;
mod report;

use report::line;
pub use report::{Check, Status};

/// Runs every check; Kafka's wait for an answer is bounded by `timeout`.
/// `topics_dir`: also compare the declared topics (partitions, settings).
pub async fn run(config: &Config, timeout: Duration, topics_dir: Option<&Path>) -> Vec<Check> {
    let refusals = config.refusals();
    let mut checks = vec![line(
        if refusals.is_empty() {
            Status::Ok
        } else {
            Status::Fail
        },
        "config",
        format!(
            "{}: group {}, topics {}, windows {}",
            if refusals.is_empty() {
                "valid"
            } else {
                "refused by idem run"
            },
            config.kafka.group_id,
            config.kafka.topics.join(","),
            config.effective_windows()
        ),
    )];
    checks.extend(
        refusals
            .into_iter()
            .map(|r| line(Status::Fail, "config", r)),
    );
    checks.extend(
        config
            .warnings()
            .into_iter()
            .map(|w| line(Status::Warn, "config", w)),
    );
    if let Some(changelog) = config.changelog.describe(&config.kafka.group_id) {
        checks.push(line(Status::Ok, "changelog", changelog));
    }
    let partitions = kafka(config, timeout, &mut checks).await;
    if partitions.is_some() {
        if let Some(dir) = topics_dir {
            declared_topics(config, dir, &mut checks).await;
        }
    }
    redis_checks::redis(config, &mut checks, partitions.as_ref()).await;
    checks
}

/// Why the brokers did not answer as brokers (or the probe failed), for
/// the `kafka` line; the answer itself where they did.
fn answer(
    config: &Config,
    timeout: Duration,
    probed: Result<Result<Reach, crate::kafka::PreflightError>, tokio::task::JoinError>,
) -> Result<(Vec<i32>, BTreeMap<String, usize>), String> {
    match probed {
        Ok(Ok(Reach::Answered {
            brokers,
            partitions,
        })) => Ok((brokers, partitions)),
        Ok(Ok(Reach::NotYet(e))) => Err(format!("no broker at {} answered within {timeout:?}: {e}. Is kafka.brokers right and the broker up? (--timeout waits longer)", config.kafka.brokers)),
        Ok(Ok(Reach::NotABroker(e))) => Err(format!(
            "{}: {}, {e}",
            config.kafka.brokers,
            crate::kafka::NOT_A_BROKER
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the check did not finish: {e}")),
    }
}

/// The brokers, the source topics and their dead-letter topics; the
/// partition count of every topic the brokers know, or `None` when they did
/// not answer (the rest cannot be checked).
async fn kafka(
    config: &Config,
    timeout: Duration,
    checks: &mut Vec<Check>,
) -> Option<BTreeMap<String, usize>> {
    let cfg = config.kafka.clone();
    let probed =
        tokio::task::spawn_blocking(move || crate::kafka::probe(&cfg, None, timeout)).await;
    let (brokers, partitions) = match answer(config, timeout, probed) {
        Ok(answered) => answered,
        Err(why) => {
            checks.push(line(Status::Fail, "kafka", why));
            return None;
        }
    };
    checks.push(line(
        Status::Ok,
        "kafka",
        format!(
            "{} broker(s) answered at {}",
            brokers.len(),
            config.kafka.brokers
        ),
    ));
    checks.push(group_protocol(config, &brokers).await);
    for topic in &config.kafka.topics {
        checks.push(match partitions.get(topic) {
            Some(n) => line(
                Status::Ok,
                format!("topic {topic}"),
                format!("exists, {n} partition(s)"),
            ),
            None => line(
                Status::Fail,
                format!("topic {topic}"),
                "does not exist: create it (idem topics apply --dir topics) or fix kafka.topics",
            ),
        });
        if partitions.contains_key(topic) {
            checks.extend(log_identity(config, topic).await);
        }
        let dlq = config.dlq.topic_for(topic);
        let what = format!("dead-letter topic {dlq}");
        if config.changelog.topics.contains(topic) {
            let changelog = config.changelog.topic_for(topic);
            let what = format!("changelog topic {changelog}");
            checks.push(match partitions.get(&changelog) {
                Some(_) => line(Status::Ok, what, format!("exists (for {topic})")),
                None => line(
                    Status::Fail,
                    what,
                    config.changelog.missing_topic_text(&changelog),
                ),
            });
        }
        checks.push(match crate::dlq::describe_topic(&config.kafka, &dlq).await {
            Ok(DlqTopic::Exists(_)) => line(Status::Ok, what, format!("exists (for {topic})")),
            Ok(DlqTopic::Missing) => line(
                Status::Fail,
                what,
                format!("does not exist: the first invalid record of {topic} would block its partition. Create it (idem topics apply --dir topics) or set dlq.topic"),
            ),
            Err(e) => line(Status::Warn, what, format!("could not describe it: {e}")),
        });
    }
    Some(partitions)
}

/// What the brokers' `group.coordinator.rebalance.protocols` says, per
/// broker id: `None` where a broker does not have the setting (before
/// Kafka 3.7: classic only).
type ProtocolAnswers = Vec<(i32, Option<String>)>;

/// Reads `group.coordinator.rebalance.protocols` of each broker of `ids`
/// (librdkafka exposes neither ApiVersions nor DescribeFeatures).
async fn rebalance_protocols(config: &Config, ids: &[i32]) -> anyhow::Result<ProtocolAnswers> {
    use crate::kafka::QuietContext;
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let timeout = config.kafka.request_timeout;
    let admin: AdminClient<QuietContext> =
        crate::kafka::base_config(&config.kafka).create_with_context(QuietContext)?;
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let mut answers = Vec::with_capacity(ids.len());
    // One broker per request: librdkafka refuses several BROKER resources in one.
    for &id in ids {
        let described = admin
            .describe_configs([&ResourceSpecifier::Broker(id)], &opts)
            .await?;
        let value = match described.into_iter().next() {
            Some(Ok(r)) => r
                .get("group.coordinator.rebalance.protocols")
                .and_then(|e| e.value.clone()),
            Some(Err(code)) => anyhow::bail!("broker {id} answered {code}"),
            None => None,
        };
        answers.push((id, value));
    }
    Ok(answers)
}

/// Whether the brokers serve `kafka.group_protocol`, as far as they say.
async fn group_protocol(config: &Config, brokers: &[i32]) -> Check {
    match rebalance_protocols(config, brokers).await {
        Ok(answers) => group_protocol_check(config.kafka.group_protocol, &answers),
        Err(e) => line(
            Status::Warn,
            "kafka group protocol",
            format!("could not read the brokers' group.coordinator.rebalance.protocols: {e}"),
        ),
    }
}

/// The group protocol line: whether every broker serves `configured`.
fn group_protocol_check(configured: GroupProtocol, answers: &ProtocolAnswers) -> Check {
    let what = "kafka group protocol";
    let serves_consumer = |value: &Option<String>| {
        value
            .as_deref()
            .is_some_and(|v| v.split(',').any(|p| p.trim() == "consumer"))
    };
    let without: Vec<String> = answers
        .iter()
        .filter(|(_, value)| !serves_consumer(value))
        .map(|(id, value)| match value {
            Some(v) => format!("broker {id} ({v})"),
            None => format!("broker {id} (no such setting: before Kafka 3.7)"),
        })
        .collect();
    match configured {
        GroupProtocol::Consumer if answers.is_empty() => {
            line(Status::Warn, what, "no broker listed: cannot tell whether they serve the consumer protocol")
        }
        GroupProtocol::Consumer if without.is_empty() => line(
            Status::Ok,
            what,
            "consumer (KIP-848): every broker lists it in group.coordinator.rebalance.protocols",
        ),
        GroupProtocol::Consumer => line(
            Status::Fail,
            what,
            format!(
                "kafka.group_protocol = \"consumer\" but {} do(es) not serve it (group.coordinator.rebalance.protocols): set kafka.group_protocol = \"classic\", or enable it on Kafka 4 brokers",
                without.join(", ")
            ),
        ),
        GroupProtocol::Classic if !answers.is_empty() && without.is_empty() => line(
            Status::Ok,
            what,
            "classic; the brokers also serve consumer (KIP-848: kafka.group_protocol = \"consumer\", docs/configuration.md)",
        ),
        GroupProtocol::Classic => line(Status::Ok, what, "classic"),
    }
}

/// What offset marks rest on for `topic`: a topic id (the log's identity)
/// and no unclean leader election (which reuses offsets in place).
async fn log_identity(config: &Config, topic: &str) -> Vec<Check> {
    let what = format!("topic {topic} log");
    let id = crate::kafka::topic_ids::topic_id_of(&config.kafka, topic).await;
    let mut checks = vec![match id.as_ref().map(Option::as_ref) {
        Ok(Some(id)) => line(
            Status::Ok,
            what.clone(),
            format!("topic id {}: records read again are recognised by their offset, whatever the window", id.as_str()),
        ),
        Ok(None) => line(
            Status::Warn,
            what.clone(),
            "the brokers give no topic id (Kafka before 2.8): records read again are recognised by the dedupe window and the seq only",
        ),
        Err(e) => line(Status::Warn, what.clone(), format!("could not read the topic id: {e}")),
    }];
    match unclean_election(config, topic).await {
        Ok(true) => checks.push(line(
            Status::Warn,
            what,
            "unclean.leader.election.enable=true: an unclean election can truncate a partition and reuse its offsets for other records, which idem would take as already decided (docs/guarantees.md, offsets reused in place). Set it to false",
        )),
        Ok(false) => {}
        Err(e) => checks.push(line(
            Status::Warn,
            what,
            format!("could not read unclean.leader.election.enable: {e}"),
        )),
    }
    checks
}

/// Whether `topic` allows unclean leader elections (its effective setting).
async fn unclean_election(config: &Config, topic: &str) -> anyhow::Result<bool> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<crate::kafka::QuietContext> =
        crate::kafka::base_config(&config.kafka).create_with_context(crate::kafka::QuietContext)?;
    let opts = AdminOptions::new().request_timeout(Some(config.kafka.request_timeout));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await?;
    let resource = match described.into_iter().next() {
        Some(Ok(resource)) => resource,
        Some(Err(code)) => anyhow::bail!("the brokers answered {code}"),
        None => return Ok(false),
    };
    Ok(resource
        .get("unclean.leader.election.enable")
        .and_then(|e| e.value.as_deref())
        == Some("true"))
}

/// The topics declared in `dir` against the cluster.
async fn declared_topics(config: &Config, dir: &Path, checks: &mut Vec<Check>) {
    let report = match topics::load_dir(dir) {
        Ok(specs) => topics::check(&config.kafka, &specs).await,
        Err(e) => Err(e),
    };
    match report {
        Ok(rows) => checks.extend(rows.into_iter().map(|(name, state)| {
            let what = format!("declared topic {name}");
            match state {
                TopicState::UpToDate => line(Status::Ok, what, "matches its declaration"),
                other => line(
                    Status::Fail,
                    what,
                    format!(
                        "{other:?} (idem topics apply --dir {} shows the plan)",
                        dir.display()
                    ),
                ),
            }
        })),
        Err(e) => checks.push(line(
            Status::Fail,
            format!("declared topics in {}", dir.display()),
            format!("{e:#}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::progress::Survey;
    use redis_checks::progress_line;

    /// The table of `progress_line`, row by row.
    #[test]
    fn progress_lines_by_table() {
        let survey = |epochs: &[(&str, usize)], missing, records: usize| Survey {
            epochs: epochs.iter().map(|(e, n)| (e.to_string(), *n)).collect(),
            missing,
            records: vec![(None, records)],
        };
        let status = |s: &Survey| progress_line(s).status;
        assert_eq!(status(&survey(&[], 1, 0)), Status::Ok, "not set yet");
        assert_eq!(status(&survey(&[("E", 1)], 0, 3)), Status::Ok);
        assert!(progress_line(&survey(&[("E", 1)], 0, 3))
            .detail
            .contains("epoch E"));
        assert_eq!(status(&survey(&[("E", 10)], 2, 3)), Status::Warn, "absent");
        assert_eq!(
            status(&survey(&[("E", 5), ("F", 5)], 0, 3)),
            Status::Warn,
            "differing"
        );
        assert_eq!(
            status(&survey(&[], 1, 2)),
            Status::Warn,
            "records, no marker"
        );
    }

    /// The group protocol line against what the brokers answer.
    #[test]
    fn group_protocol_lines_by_table() {
        let answers = |values: &[Option<&str>]| -> ProtocolAnswers {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as i32 + 1, v.map(str::to_string)))
                .collect()
        };
        let both = answers(&[Some("classic,consumer"), Some("classic, consumer")]);
        let one_old = answers(&[Some("classic,consumer"), None]);
        let classic_only = answers(&[Some("classic")]);
        let check = group_protocol_check;
        assert_eq!(check(GroupProtocol::Consumer, &both).status, Status::Ok);
        let refused = check(GroupProtocol::Consumer, &one_old);
        assert_eq!(refused.status, Status::Fail);
        assert!(
            refused.detail.contains("broker 2 (no such setting")
                && !refused.detail.contains("broker 1"),
            "{}",
            refused.detail
        );
        let refused = check(GroupProtocol::Consumer, &classic_only);
        assert_eq!(refused.status, Status::Fail);
        assert!(
            refused.detail.contains("broker 1 (classic)"),
            "{}",
            refused.detail
        );
        assert_eq!(
            check(GroupProtocol::Consumer, &answers(&[])).status,
            Status::Warn
        );
        let classic = check(GroupProtocol::Classic, &both);
        assert_eq!(classic.status, Status::Ok);
        assert!(
            classic.detail.contains("also serve consumer"),
            "{}",
            classic.detail
        );
        let classic = check(GroupProtocol::Classic, &classic_only);
        assert_eq!(
            (classic.status, classic.detail.as_str()),
            (Status::Ok, "classic")
        );
    }
}
