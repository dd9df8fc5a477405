//! One outbox entry as `add_outbox_entry` wrote it (entry.lua beside this
//! file: the one writer, for the guard's changes and the snapshot's), and
//! the Kafka record the relay makes of it. Pure: stream fields in, key,
//! value and headers out.

use redis::Value;
use serde_json::{Map, Value as JsonValue};

/// A change waiting in an outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stream entry's id, which the relay deletes once published.
    pub stream_id: String,
    pub entity: String,
    /// The entity's change version (dense: 1, 2, 3, …).
    pub version: u64,
    /// The change record, published as it is (JSON, docs/change-stream.md).
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
    let missing = |what: &str| format!("outbox entry {stream_id} has no valid `{what}`");
    let mut pairs = fields.chunks_exact(2).map(|kv| (&kv[0][..], &kv[1][..]));
    // The fixed fields, up to `n` (entry.lua).
    let mut fixed: Vec<(&[u8], &[u8])> = Vec::new();
    let mut state_pairs = None;
    for (k, v) in pairs.by_ref() {
        if k == b"n" {
            state_pairs = std::str::from_utf8(v)
                .ok()
                .and_then(|n| n.parse::<usize>().ok());
            break;
        }
        fixed.push((k, v));
    }
    let get = |name: &[u8]| fixed.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let text = |name: &[u8]| get(name).and_then(|v| std::str::from_utf8(v).ok());
    let entity = text(b"e").ok_or_else(|| missing("e"))?.to_string();
    let version: u64 = text(b"v")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("v"))?;
    let topic = text(b"t").ok_or_else(|| missing("t"))?.to_string();
    let state_pairs = state_pairs.ok_or_else(|| missing("n"))?;
    // cjson passes bytes through as they are: read them as the pairs are
    // read, invalid UTF-8 replaced, so one odd value never stops the outbox.
    let mut data: Map<String, JsonValue> = match get(b"dj") {
        Some(json) => serde_json::from_str(&lossy(json)).map_err(|_| missing("dj"))?,
        None => Map::new(),
    };
    for (k, v) in pairs.by_ref().take(state_pairs) {
        data.insert(lossy(k), JsonValue::String(lossy(v)));
    }
    let mut change = Map::new();
    change.insert(
        "kind".into(),
        text(b"k").ok_or_else(|| missing("k"))?.into(),
    );
    if let Some(event) = event_of(&text).map_err(missing)? {
        change.insert("event".into(), event);
    }
    for (k, v) in pairs {
        add_effect(&mut change, k, v);
    }
    // Effects too many to pass as pairs: one JSON list [k1, v1, k2, v2, …].
    if let Some(json) = get(b"fj") {
        let flat: Vec<String> = serde_json::from_str(&lossy(json)).map_err(|_| missing("fj"))?;
        for kv in flat.chunks_exact(2) {
            add_effect(&mut change, kv[0].as_bytes(), kv[1].as_bytes());
        }
    }
    let record = serde_json::json!({
        "id": format!("{entity}#{version}"),
        "entity": entity,
        "seq": version,
        "type": text(b"ty").ok_or_else(|| missing("ty"))?,
        "data": data,
        "change": change,
    });
    Ok(Entry {
        stream_id: stream_id.clone(),
        version,
        record: record.to_string().into_bytes(),
        topic,
        partition: text(b"p").and_then(|p| p.parse().ok()),
        offset: text(b"o").and_then(|o| o.parse().ok()).unwrap_or(-1),
        applied_ms: text(b"at").and_then(|a| a.parse().ok()).unwrap_or(0),
        entity,
    })
}

/// The source event of a change (`ei`, `es`, `et`, `ts`); none for a
/// snapshot. An error names the missing field.
fn event_of<'a>(
    text: &impl Fn(&[u8]) -> Option<&'a str>,
) -> Result<Option<JsonValue>, &'static str> {
    let Some(id) = text(b"ei") else {
        return Ok(None);
    };
    let seq = text(b"es").ok_or("es")?;
    let mut event = Map::new();
    event.insert("id".into(), id.into());
    event.insert(
        "seq".into(),
        seq.parse::<u64>()
            .map_or_else(|_| seq.into(), JsonValue::from),
    );
    if let Some(t) = text(b"et") {
        event.insert("type".into(), t.into());
    }
    if let Some(ts) = text(b"ts") {
        event.insert("ts".into(), ts.into());
    }
    Ok(Some(event.into()))
}

/// One effect pair of an entry into the record's `change`: `c<counter>`
/// its value after, `C<counter>` removed (null), `s+<set>` / `s-<set>` a
/// member added (true) or removed (false), `l<stream>\0<field>` a field of
/// the ledger entry appended.
fn add_effect(change: &mut Map<String, JsonValue>, k: &[u8], v: &[u8]) {
    match k {
        [b'c', name @ ..] => insert(change, "counters", lossy(name), lossy(v).into()),
        [b'C', name @ ..] => insert(change, "counters", lossy(name), JsonValue::Null),
        [b's', b'+', set @ ..] => insert_in(change, "sets", lossy(set), lossy(v), true.into()),
        [b's', b'-', set @ ..] => insert_in(change, "sets", lossy(set), lossy(v), false.into()),
        [b'l', rest @ ..] => {
            let at = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let (stream, field) = (&rest[..at], rest.get(at + 1..).unwrap_or_default());
            insert_in(
                change,
                "ledger",
                lossy(stream),
                lossy(field),
                lossy(v).into(),
            );
        }
        _ => {}
    }
}

/// `change[kind][name] = value`.
fn insert(change: &mut Map<String, JsonValue>, kind: &str, name: String, value: JsonValue) {
    if let JsonValue::Object(of_kind) = change
        .entry(kind)
        .or_insert_with(|| JsonValue::Object(Map::new()))
    {
        of_kind.insert(name, value);
    }
}

/// `change[kind][name][key] = value`.
fn insert_in(
    change: &mut Map<String, JsonValue>,
    kind: &str,
    name: String,
    key: String,
    value: JsonValue,
) {
    if let JsonValue::Object(of_kind) = change
        .entry(kind)
        .or_insert_with(|| JsonValue::Object(Map::new()))
    {
        if let JsonValue::Object(inner) = of_kind
            .entry(name)
            .or_insert_with(|| JsonValue::Object(Map::new()))
        {
            inner.insert(key, value);
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
            ("t", "orders"),
            ("p", "2"),
            ("o", "41"),
            ("at", "1700000000123"),
            ("k", "late"),
            ("ty", "idem.change"),
            ("ei", "evt-9"),
            ("es", "12"),
            ("et", "deposit"),
            ("ts", "2026-12-04T01:02:03Z"),
            ("n", "2"),
            // The state pairs: names that look like the fixed fields' are data.
            ("status", "paid"),
            ("e", "x"),
            ("cbalance", "4210"),
            ("Cold", ""),
            ("s+tags", "gift"),
            ("s-tags", "rush"),
            ("lmoves\0amount", "42.10"),
            ("lmoves\0seq", "12"),
        ];
        let entries = parse_entries(reply(&[("1700000000123-0", &fields)])).unwrap();
        let record: serde_json::Value = serde_json::from_slice(&entries[0].record).unwrap();
        assert_eq!(
            record,
            serde_json::json!({
                "id": "orders:1#7", "entity": "orders:1", "seq": 7, "type": "idem.change",
                "data": { "status": "paid", "e": "x" },
                "change": {
                    "kind": "late",
                    "event": { "id": "evt-9", "seq": 12, "type": "deposit", "ts": "2026-12-04T01:02:03Z" },
                    "counters": { "balance": "4210", "old": null },
                    "sets": { "tags": { "gift": true, "rush": false } },
                    "ledger": { "moves": { "amount": "42.10", "seq": "12" } },
                }
            })
        );
        assert_eq!(
            entries[0],
            Entry {
                stream_id: "1700000000123-0".into(),
                entity: "orders:1".into(),
                version: 7,
                record: entries[0].record.clone(),
                topic: "orders".into(),
                partition: Some(2),
                offset: 41,
                applied_ms: 1_700_000_000_123,
            }
        );
        assert_eq!(entries[0].change_id(), "orders:1#7");
        assert_eq!(written_ms("1700000000123-0"), Some(1_700_000_000_123));
        let err = parse_entries(reply(&[("5-0", &fields[..1])])).unwrap_err();
        assert_eq!(err, "outbox entry 5-0 has no valid `v`");
        // A snapshot: no event, no partition; a large state as one JSON field.
        let snapshot = [
            fields[0],
            fields[1],
            fields[2],
            ("p", ""),
            ("o", "-1"),
            ("k", "snapshot"),
            ("ty", "delete"),
            ("dj", r#"{"a":"1"}"#),
            ("fj", r#"["s+tags","gift","cbalance","5"]"#),
            ("n", "0"),
        ];
        let entry = &parse_entries(reply(&[("6-0", &snapshot)])).unwrap()[0];
        assert_eq!(entry.partition, None);
        let record: serde_json::Value = serde_json::from_slice(&entry.record).unwrap();
        assert_eq!(record["type"], "delete");
        assert_eq!(record["data"], serde_json::json!({ "a": "1" }));
        assert_eq!(
            record["change"],
            serde_json::json!({
                "kind": "snapshot",
                "sets": { "tags": { "gift": true } },
                "counters": { "balance": "5" },
            })
        );
        let no_count = &snapshot[..snapshot.len() - 1];
        assert_eq!(
            parse_entries(reply(&[("7-0", no_count)])).unwrap_err(),
            "outbox entry 7-0 has no valid `n`"
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
