//! One outbox entry as the guard script wrote it (`write_change` in
//! guard.lua), and the Kafka record the relay makes of it. Pure: stream
//! fields in, key, value and headers out.

use redis::Value;

/// A change waiting in an outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stream entry's id, which the relay deletes once published.
    pub stream_id: String,
    pub entity: String,
    /// The entity's change version (dense: 1, 2, 3, …).
    pub version: u64,
    /// The change record, published as it is (JSON, docs/changelog.md).
    pub record: Vec<u8>,
    /// Where the event that made the change was read.
    pub topic: String,
    pub partition: Option<i32>,
    pub offset: i64,
    /// When the guard applied it (Redis clock, ms since the Unix epoch).
    pub applied_ms: u64,
}

impl Entry {
    /// The change's id, the same on every copy: `<entity>#<version>`.
    pub fn change_id(&self) -> String {
        format!("{}#{}", self.entity, self.version)
    }

    /// The record's headers: the change id under `id` (as Debezium's outbox
    /// router names it) and provenance under `idem.*`.
    pub fn headers(&self, group: &str, form: Form) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("id", self.change_id()),
            ("idem.entity", self.entity.clone()),
            ("idem.version", self.version.to_string()),
            ("idem.form", form.as_str().to_string()),
            ("idem.source.topic", self.topic.clone()),
            ("idem.source.offset", self.offset.to_string()),
            ("idem.group", group.to_string()),
            ("idem.applied_ms", self.applied_ms.to_string()),
        ];
        if let Some(p) = self.partition {
            h.push(("idem.source.partition", p.to_string()));
        }
        h
    }

    /// The record published in place of one too large for the changelog
    /// topic: the same id, entity and version (so the versions stay dense
    /// and a chained idem's mark moves on), no state. The next change of the
    /// entity carries its whole state again.
    pub fn reference(&self, max_bytes: usize) -> Vec<u8> {
        serde_json::json!({
            "id": self.change_id(),
            "entity": self.entity,
            "seq": self.version,
            "type": REFERENCE_TYPE,
            "data": {},
            "change": {
                "reference": {
                    "reason": "too_large",
                    "bytes": self.record.len(),
                    "max_bytes": max_bytes,
                }
            }
        })
        .to_string()
        .into_bytes()
    }
}

/// The `type` of a change record whose change was too large to publish.
pub const REFERENCE_TYPE: &str = "idem.change-reference";

/// What a published record holds (header `idem.form`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Change,
    Reference,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Change => "change",
            Form::Reference => "change-reference",
        }
    }
}

/// The entries of an `XRANGE` reply; an entry the script did not write (a
/// field missing) is an error naming it, never skipped.
pub fn parse_entries(reply: Value) -> Result<Vec<Entry>, String> {
    let rows: Vec<(String, Vec<Vec<u8>>)> =
        redis::from_redis_value(&reply).map_err(|e| format!("not an XRANGE reply: {e}"))?;
    rows.into_iter()
        .map(|(stream_id, fields)| parse_entry(stream_id, fields))
        .collect()
}

fn parse_entry(stream_id: String, fields: Vec<Vec<u8>>) -> Result<Entry, String> {
    let get = |name: &[u8]| -> Option<Vec<u8>> {
        let at = fields.chunks(2).position(|kv| kv[0] == name)?;
        fields.get(2 * at + 1).cloned()
    };
    let text = |v: Option<Vec<u8>>| v.and_then(|b| String::from_utf8(b).ok());
    let missing = |what: &str| format!("outbox entry {stream_id} has no valid `{what}`");
    let entity = text(get(b"e")).ok_or_else(|| missing("e"))?;
    let version = text(get(b"v"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("v"))?;
    let record = get(b"r").ok_or_else(|| missing("r"))?;
    let topic = text(get(b"t")).ok_or_else(|| missing("t"))?;
    let partition = text(get(b"p")).and_then(|p| p.parse().ok());
    let offset = text(get(b"o")).and_then(|o| o.parse().ok()).unwrap_or(-1);
    let applied_ms = text(get(b"at")).and_then(|a| a.parse().ok()).unwrap_or(0);
    Ok(Entry {
        stream_id,
        entity,
        version,
        record,
        topic,
        partition,
        offset,
        applied_ms,
    })
}

/// The stream id's milliseconds (`<ms>-<n>`): when the entry was written.
pub fn written_ms(stream_id: &str) -> Option<u64> {
    stream_id.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(rows: &[(&str, &[(&str, &str)])]) -> Value {
        Value::Array(
            rows.iter()
                .map(|(id, fields)| {
                    Value::Array(vec![
                        Value::BulkString(id.as_bytes().to_vec()),
                        Value::Array(
                            fields
                                .iter()
                                .flat_map(|(k, v)| {
                                    [
                                        Value::BulkString(k.as_bytes().to_vec()),
                                        Value::BulkString(v.as_bytes().to_vec()),
                                    ]
                                })
                                .collect(),
                        ),
                    ])
                })
                .collect(),
        )
    }

    #[test]
    fn entries_are_read_with_every_field_and_a_broken_one_is_named() {
        let fields = [
            ("e", "orders:1"),
            ("v", "7"),
            ("r", "{}"),
            ("t", "orders"),
            ("p", "2"),
            ("o", "41"),
            ("at", "1700000000123"),
        ];
        let entries = parse_entries(reply(&[("1700000000123-0", &fields)])).unwrap();
        assert_eq!(
            entries,
            [Entry {
                stream_id: "1700000000123-0".into(),
                entity: "orders:1".into(),
                version: 7,
                record: b"{}".to_vec(),
                topic: "orders".into(),
                partition: Some(2),
                offset: 41,
                applied_ms: 1_700_000_000_123,
            }]
        );
        assert_eq!(entries[0].change_id(), "orders:1#7");
        assert_eq!(written_ms("1700000000123-0"), Some(1_700_000_000_123));
        let err = parse_entries(reply(&[("5-0", &fields[..1])])).unwrap_err();
        assert_eq!(err, "outbox entry 5-0 has no valid `v`");
        // A change of a record without a place in a log (no partition).
        let unplaced = [fields[0], fields[1], fields[2], fields[3], ("p", "")];
        assert_eq!(
            parse_entries(reply(&[("6-0", &unplaced)])).unwrap()[0].partition,
            None
        );
    }

    #[test]
    fn headers_carry_the_change_id_and_where_it_came_from() {
        let entry = Entry {
            stream_id: "1-0".into(),
            entity: "a".into(),
            version: 3,
            record: vec![b'x'; 10],
            topic: "orders".into(),
            partition: Some(1),
            offset: 9,
            applied_ms: 5,
        };
        let h = entry.headers("g", Form::Change);
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("id"), Some("a#3"));
        assert_eq!(get("idem.form"), Some("change"));
        assert_eq!(get("idem.source.partition"), Some("1"));
        assert_eq!(get("idem.group"), Some("g"));
        let reference: serde_json::Value = serde_json::from_slice(&entry.reference(4)).unwrap();
        assert_eq!(reference["id"], "a#3");
        assert_eq!(reference["seq"], 3);
        assert_eq!(reference["type"], REFERENCE_TYPE);
        assert_eq!(reference["change"]["reference"]["bytes"], 10);
    }
}
