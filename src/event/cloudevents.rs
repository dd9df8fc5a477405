//! CloudEvents 1.0 input, structured mode (`application/cloudevents+json`)
//! and binary mode (`ce_*` headers, the value is the data).
//!
//! Mapping (documented in docs/event-contract.md):
//! - identity: CloudEvents identifies an event by `source` + `id`, so idem's
//!   event id is `"<source> <id>"` (a URI reference cannot contain a space,
//!   so the pair is unambiguous);
//! - entity: `subject` (required by idem);
//! - sequence: the `sequence` extension, a u64 as a JSON number or a decimal string;
//! - delete: a `type` equal to `delete` or ending in `.delete` / `.deleted`;
//! - data: `data`, a JSON object (or absent).

use serde_json::{Map, Value};

use super::exact::DataFields;
use super::{data_fields, fingerprint, parse_json, Event, Invalid, Op};

/// The content type of structured-mode records.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Whether a record's headers mark it as CloudEvents, and in which mode.
pub fn detect(headers: &[(&str, &[u8])]) -> Option<Mode> {
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-type")
            && v.starts_with(STRUCTURED_CONTENT_TYPE.as_bytes())
        {
            return Some(Mode::Structured);
        }
    }
    headers
        .iter()
        .any(|(k, _)| *k == "ce_specversion")
        .then_some(Mode::Binary)
}

/// How a CloudEvent is carried in a Kafka record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Structured,
    Binary,
}

/// Decodes a structured-mode record value.
pub fn decode_structured(text: &str, reject_duplicate_keys: bool) -> Result<Event, Invalid> {
    let mut root = parse_json(text, reject_duplicate_keys)?;
    let Value::Object(map) = &root else {
        return Err(Invalid::NotObject);
    };
    let attrs = Attributes {
        specversion: string_attr(map, "specversion")?,
        id: string_attr(map, "id")?,
        source: string_attr(map, "source")?,
        kind: string_attr(map, "type")?,
        subject: string_attr(map, "subject")?,
        sequence: sequence_attr(map.get("sequence"), "sequence")?,
    };
    let fp = fingerprint(&root);
    if !matches!(
        root.get("data"),
        None | Some(Value::Null | Value::Object(_))
    ) {
        return Err(wrong_type("data", "a JSON object"));
    }
    let data = data_fields(text, "/data", root.get_mut("data"))?;
    attrs.into_event(data, fp)
}

/// Decodes a binary-mode record: attributes in `ce_*` headers, data in the value.
pub fn decode_binary(
    headers: &[(&str, &[u8])],
    value: Option<&[u8]>,
    reject_duplicate_keys: bool,
) -> Result<Event, Invalid> {
    let header = |name: &str| -> Result<String, Invalid> {
        let raw = headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| Invalid::MissingField(name.to_string()))?;
        let s = std::str::from_utf8(raw).map_err(|_| Invalid::NotUtf8)?;
        if s.is_empty() {
            return Err(Invalid::EmptyField(name.to_string()));
        }
        Ok(s.to_string())
    };
    let sequence_text = header("ce_sequence")?;
    let attrs = Attributes {
        specversion: header("ce_specversion")?,
        id: header("ce_id")?,
        source: header("ce_source")?,
        kind: header("ce_type")?,
        subject: header("ce_subject")?,
        sequence: sequence_attr(Some(&Value::String(sequence_text)), "ce_sequence")?,
    };
    let text = match value {
        None | Some(b"") => None,
        Some(bytes) => Some(std::str::from_utf8(bytes).map_err(|_| Invalid::NotUtf8)?),
    };
    let data = match text {
        None => Value::Null,
        Some(text) => parse_json(text, reject_duplicate_keys)?,
    };
    // The fingerprint covers the attributes and the data, as structured mode's does.
    let mut canonical = Map::new();
    for (k, v) in headers {
        if let (Some(name), Ok(v)) = (k.strip_prefix("ce_"), std::str::from_utf8(v)) {
            canonical.insert(name.to_string(), Value::String(v.to_string()));
        }
    }
    canonical.insert("data".into(), data);
    let mut canonical = Value::Object(canonical);
    let fp = fingerprint(&canonical);
    if !matches!(
        canonical.get("data"),
        None | Some(Value::Null | Value::Object(_))
    ) {
        return Err(wrong_type("data", "a JSON object"));
    }
    let data = data_fields(text.unwrap_or("null"), "", canonical.get_mut("data"))?;
    attrs.into_event(data, fp)
}

struct Attributes {
    specversion: String,
    id: String,
    source: String,
    kind: String,
    subject: String,
    sequence: u64,
}

impl Attributes {
    fn into_event(self, (set, unset): DataFields, fingerprint: u64) -> Result<Event, Invalid> {
        if self.subject.starts_with('}') {
            return Err(Invalid::BadEntity(self.subject));
        }
        if !self.specversion.starts_with("1.") {
            return Err(wrong_type("specversion", "\"1.0\""));
        }
        let op = if self.kind == "delete"
            || self.kind.ends_with(".delete")
            || self.kind.ends_with(".deleted")
        {
            Op::Delete
        } else {
            Op::Upsert
        };
        Ok(Event {
            id: format!("{} {}", self.source, self.id),
            entity: self.subject,
            seq: self.sequence,
            op,
            kind: Some(self.kind),
            set,
            unset,
            fingerprint,
            ts: None,
            change: None,
        })
    }
}

fn wrong_type(field: &str, expected: &'static str) -> Invalid {
    Invalid::WrongType {
        field: field.to_string(),
        expected,
    }
}

fn string_attr(map: &Map<String, Value>, name: &str) -> Result<String, Invalid> {
    match map.get(name) {
        None | Some(Value::Null) => Err(Invalid::MissingField(name.to_string())),
        Some(Value::String(s)) if s.is_empty() => Err(Invalid::EmptyField(name.to_string())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(wrong_type(name, "a non-empty string")),
    }
}

fn sequence_attr(value: Option<&Value>, name: &str) -> Result<u64, Invalid> {
    match value {
        None | Some(Value::Null) => Err(Invalid::MissingField(name.to_string())),
        Some(Value::Number(n)) => super::seq_number(n, name),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse()
            .map_err(|_| Invalid::SeqOutOfRange(name.to_string())),
        Some(Value::String(s)) if s.starts_with('-') => {
            Err(Invalid::SeqOutOfRange(name.to_string()))
        }
        Some(_) => Err(wrong_type(
            name,
            "an unsigned integer (number or decimal string)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_and_binary_modes_map_the_same_way() {
        let s = decode_structured(
            r#"{"specversion":"1.0","id":"e1","source":"/orders","type":"com.shop.order.updated","subject":"orders:42","sequence":"7","data":{"status":"paid","total":12.50}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            (s.id.as_str(), s.entity.as_str(), s.seq, s.op),
            ("/orders e1", "orders:42", 7, Op::Upsert)
        );
        assert_eq!(
            s.set,
            vec![
                ("status".to_string(), "paid".to_string()),
                ("total".to_string(), "12.50".to_string())
            ]
        );
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce_specversion", b"1.0"),
            ("ce_id", b"e1"),
            ("ce_source", b"/orders"),
            ("ce_type", b"com.shop.order.deleted"),
            ("ce_subject", b"orders:42"),
            ("ce_sequence", b"8"),
        ];
        assert_eq!(detect(&headers), Some(Mode::Binary));
        let b = decode_binary(&headers, None, false).unwrap();
        assert_eq!((b.id.as_str(), b.seq, b.op), ("/orders e1", 8, Op::Delete));
        let ct: Vec<(&str, &[u8])> = vec![(
            "content-type",
            b"application/cloudevents+json; charset=utf-8",
        )];
        assert_eq!(detect(&ct), Some(Mode::Structured));
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn missing_or_bad_attributes_are_invalid() {
        let table = [
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","sequence":1}"#,
                "missing_field",
            ),
            (
                r#"{"specversion":"1.0","id":"","source":"s","type":"t","subject":"x","sequence":1}"#,
                "empty_field",
            ),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"x","sequence":"-1"}"#,
                "seq_out_of_range",
            ),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"x","sequence":"abc"}"#,
                "wrong_type",
            ),
            (
                r#"{"specversion":"0.3","id":"e","source":"s","type":"t","subject":"x","sequence":1}"#,
                "wrong_type",
            ),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"x","sequence":1,"data":"str"}"#,
                "wrong_type",
            ),
        ];
        for (input, code) in table {
            assert_eq!(
                decode_structured(input, false).unwrap_err().code(),
                code,
                "{input}"
            );
        }
        let headers: Vec<(&str, &[u8])> = vec![("ce_specversion", b"1.0"), ("ce_id", b"e")];
        assert_eq!(
            decode_binary(&headers, None, false).unwrap_err().code(),
            "missing_field"
        );
    }

    #[test]
    fn detection_by_table() {
        type Headers<'a> = &'a [(&'a str, &'a [u8])];
        let table: &[(Headers, Option<Mode>)] = &[
            (&[], None),
            (
                &[("content-type", b"application/cloudevents+json")],
                Some(Mode::Structured),
            ),
            (
                &[(
                    "Content-Type",
                    b"application/cloudevents+json; charset=utf-8",
                )],
                Some(Mode::Structured),
            ),
            (&[("content-type", b"application/json")], None),
            (&[("x-type", b"application/cloudevents+json")], None),
            (&[("traceparent", b"00-1-2-01")], None),
            (&[("ce_id", b"x")], None),
            (&[("ce_specversion", b"1.0")], Some(Mode::Binary)),
            (
                &[
                    ("content-type", b"application/json"),
                    ("ce_specversion", b"1.0"),
                ],
                Some(Mode::Binary),
            ),
        ];
        for (headers, want) in table {
            assert_eq!(detect(headers), *want, "{headers:?}");
        }
    }

    /// `type` "delete", or ending in ".delete" or ".deleted", deletes.
    #[test]
    fn delete_types_by_table() {
        for (kind, op) in [
            ("delete", Op::Delete),
            ("order.delete", Op::Delete),
            ("order.deleted", Op::Delete),
            ("order.deletes", Op::Upsert),
            ("deleted", Op::Upsert),
            ("order.updated", Op::Upsert),
        ] {
            let headers: [(&str, &[u8]); 6] = [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"x"),
                ("ce_source", b"/s"),
                ("ce_type", kind.as_bytes()),
                ("ce_subject", b"e"),
                ("ce_sequence", b"3"),
            ];
            let e = decode_binary(&headers, Some(br#"{"a":"b"}"#), false).unwrap();
            assert_eq!(e.op, op, "{kind}");
        }
    }
}
