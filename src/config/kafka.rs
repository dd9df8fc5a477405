//! `[kafka]`: the brokers, the group, the topics and the client's security,
//! decoded as they are read; the checks that span keys run after.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::forms::{both_or_neither, secret_file};
use super::{values, Config, ConfigError, Secret};

/// librdkafka keys that idem fixes because they protect the delivery guarantee.
const FIXED_LIBRDKAFKA_KEYS: [&str; 13] = [
    "enable.auto.offset.store",
    "enable.auto.commit",
    "bootstrap.servers",
    "group.id",
    // Security settings have their own keys, so that passwords can come from files.
    "security.protocol",
    "sasl.mechanisms",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
];

/// librdkafka keys that the consumer protocol (KIP-848) moves to the broker
/// or renames, each with what to use instead.
const MOVED_BY_CONSUMER_PROTOCOL: [(&str, &str); 3] = [
    (
        "session.timeout.ms",
        "the broker's group.consumer.session.timeout.ms sets it",
    ),
    (
        "heartbeat.interval.ms",
        "the broker's group.consumer.heartbeat.interval.ms sets it",
    ),
    (
        "partition.assignment.strategy",
        "the broker assigns (group.consumer.assignors); name one of its assignors with kafka.librdkafka.\"group.remote.assignor\"",
    ),
];

/// Kafka connection and group settings (`[kafka]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    #[doc = key_doc!("kafka", "brokers")]
    #[serde(deserialize_with = "values::brokers")]
    pub brokers: String,
    #[doc = key_doc!("kafka", "group_id")]
    #[serde(deserialize_with = "values::non_empty")]
    pub group_id: String,
    #[doc = key_doc!("kafka", "topics")]
    #[serde(deserialize_with = "values::topics")]
    pub topics: Vec<String>,
    #[doc = key_doc!("kafka", "auto_offset_reset")]
    #[serde(deserialize_with = "values::choice")]
    pub auto_offset_reset: OffsetReset,
    #[doc = key_doc!("kafka", "commit_interval")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub commit_interval: Duration,
    #[doc = key_doc!("kafka", "session_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub session_timeout: Duration,
    #[doc = key_doc!("kafka", "revoke_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub revoke_timeout: Duration,
    #[doc = key_doc!("kafka", "request_timeout")]
    #[serde(deserialize_with = "values::positive_duration")]
    pub request_timeout: Duration,
    #[doc = key_doc!("kafka", "group_instance_id")]
    #[serde(deserialize_with = "values::optional_trimmed")]
    pub group_instance_id: Option<String>,
    #[doc = key_doc!("kafka", "group_protocol")]
    #[serde(deserialize_with = "values::choice")]
    pub group_protocol: GroupProtocol,
    #[doc = key_doc!("kafka", "security_protocol")]
    #[serde(deserialize_with = "values::choice")]
    pub security_protocol: SecurityProtocol,
    #[doc = key_doc!("kafka", "sasl_mechanism")]
    #[serde(deserialize_with = "values::choice")]
    pub sasl_mechanism: SaslMechanism,
    #[doc = key_doc!("kafka", "sasl_username")]
    pub sasl_username: String,
    #[doc = key_doc!("kafka", "sasl_password")]
    #[serde(deserialize_with = "values::secret")]
    pub sasl_password: Option<Secret>,
    #[doc = key_doc!("kafka", "sasl_password_file")]
    pub sasl_password_file: String,
    #[doc = key_doc!("kafka", "ssl_ca_location")]
    #[serde(deserialize_with = "values::ca_location")]
    pub ssl_ca_location: String,
    #[doc = key_doc!("kafka", "ssl_certificate_location")]
    #[serde(deserialize_with = "values::readable_file")]
    pub ssl_certificate_location: String,
    #[doc = key_doc!("kafka", "ssl_key_location")]
    #[serde(deserialize_with = "values::readable_file")]
    pub ssl_key_location: String,
    #[doc = key_doc!("kafka", "ssl_key_password")]
    #[serde(deserialize_with = "values::secret")]
    pub ssl_key_password: Option<Secret>,
    #[doc = key_doc!("kafka", "ssl_key_password_file")]
    pub ssl_key_password_file: String,
    #[doc = key_doc!("kafka", "librdkafka")]
    #[serde(default, deserialize_with = "dotted_settings")]
    pub librdkafka: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// The default settings pointed at `brokers`: the tests' and the test
    /// bench's own clients (plaintext, no credentials).
    pub fn for_brokers(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_string(),
            ..Config::defaults().kafka
        }
    }

    /// The checks that span keys; secrets given as files are read here.
    pub(super) fn checked(mut self) -> Result<KafkaConfig, ConfigError> {
        if self.security_protocol.uses_sasl() && self.sasl_username.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.sasl_username",
                "",
                "a user name (kafka.security_protocol is a sasl protocol)",
            ));
        }
        both_or_neither(
            (
                "kafka.ssl_certificate_location",
                &self.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &self.ssl_key_location),
        )?;
        if let Some(key) = self
            .librdkafka
            .keys()
            .find(|key| FIXED_LIBRDKAFKA_KEYS.contains(&key.as_str()))
        {
            return Err(ConfigError::invalid(
                &format!("kafka.librdkafka.{key}"),
                key,
                "a librdkafka key idem does not fix (this one protects the delivery guarantee or has its own idem key)",
            ));
        }
        self.check_group_protocol()?;
        if let Some(s) = secret_file("kafka.sasl_password_file", &self.sasl_password_file)? {
            self.sasl_password = Some(s);
        }
        if let Some(s) = secret_file("kafka.ssl_key_password_file", &self.ssl_key_password_file)? {
            self.ssl_key_password = Some(s);
        }
        Ok(self)
    }
}

impl KafkaConfig {
    /// The protocol has a key of its own, and under the consumer protocol
    /// the keys it moves to the broker are refused, each naming the setting
    /// that replaces it (librdkafka would refuse them too, less clearly).
    fn check_group_protocol(&self) -> Result<(), ConfigError> {
        if let Some(value) = self.librdkafka.get("group.protocol") {
            return Err(ConfigError::invalid(
                "kafka.librdkafka.group.protocol",
                value,
                "no value here: the protocol has its own key, kafka.group_protocol (\"classic\" or \"consumer\")",
            ));
        }
        if self.group_protocol == GroupProtocol::Consumer {
            for (key, instead) in MOVED_BY_CONSUMER_PROTOCOL {
                if let Some(value) = self.librdkafka.get(key) {
                    return Err(ConfigError::invalid(
                        &format!("kafka.librdkafka.{key}"),
                        value,
                        &format!("no value under kafka.group_protocol = \"consumer\": {instead}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Warnings for idem keys that the consumer protocol leaves unused, when
    /// the user set them (`explicit`: the keys a file or the environment set).
    pub(super) fn group_protocol_warnings(
        &self,
        explicit: &std::collections::BTreeSet<String>,
    ) -> Vec<String> {
        if self.group_protocol != GroupProtocol::Consumer
            || !explicit.contains("kafka.session_timeout")
        {
            return Vec::new();
        }
        vec![format!(
            "kafka.session_timeout = {:?} is not used under kafka.group_protocol = \"consumer\": \
             the broker's group.consumer.session.timeout.ms (45 s unless the broker says otherwise) decides \
             how long the group waits for a silent instance. Remove the key, or set the broker's",
            super::forms::format_duration(self.session_timeout)
        )]
    }
}

/// The `kafka.librdkafka` table as dotted keys (`[kafka.librdkafka.fetch]
/// max.bytes = 1` is `fetch.max.bytes`), each value a string, number or boolean.
fn dotted_settings<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    fn flatten_into(
        key: &str,
        value: serde_json::Value,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    flatten_into(&format!("{key}.{k}"), v, out)?;
                }
            }
            serde_json::Value::String(s) => {
                out.insert(key.to_string(), s);
            }
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                out.insert(key.to_string(), value.to_string());
            }
            other => {
                return Err(format!(
                    "got {other} for {key:?}, expected a string, number or boolean"
                ))
            }
        }
        Ok(())
    }
    let table = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        flatten_into(&key, value, &mut out).map_err(serde::de::Error::custom)?;
    }
    Ok(out)
}

/// The consumer group protocol (`kafka.group_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    Classic,
    Consumer,
}

impl GroupProtocol {
    /// librdkafka's `group.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// Where a group without committed offsets starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// How idem talks to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the connection is encrypted (librdkafka then loads the TLS files).
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether the client authenticates with SASL (a user name and mechanism).
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// The SASL mechanism (librdkafka's `sasl.mechanisms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}
