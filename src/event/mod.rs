//! The event envelope: decoding a Kafka record value into an [`Event`],
//! and the hashes that identify it.
//!
//! Guarantee: decoding is total. Any byte string yields either an `Event` or
//! an [`Invalid`] with a stable reason code; it never panics.

pub mod cloudevents;

use serde_json::Value;

use crate::config::{EventConfig, EventFormat};

/// JSON pointers (RFC 6901) to the envelope fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMap {
    pub id: String,
    pub entity: String,
    pub seq: String,
    pub kind: String,
    pub data: String,
    pub ts: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            id: "/id".into(),
            entity: "/entity".into(),
            seq: "/seq".into(),
            kind: "/type".into(),
            data: "/data".into(),
            ts: "/ts".into(),
        }
    }
}

/// What an applied event does to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Merge `data`'s top-level fields into the state (JSON merge-patch, one level).
    Upsert,
    /// Replace the state with a tombstone that keeps the sequence.
    Delete,
}

/// A decoded event: one intent on one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub entity: String,
    pub seq: u64,
    pub op: Op,
    /// Fields to set: strings as they are, other JSON values as their JSON text.
    pub set: Vec<(String, String)>,
    /// Fields to remove (given as `null` in `data`).
    pub unset: Vec<String>,
    /// Hash of the canonical form of the whole record value.
    pub fingerprint: u64,
}

/// Why a record is not a valid event. The code is part of the public contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("record has no value")]
    EmptyValue,
    #[error("record value is {size} bytes, more than event.max_bytes = {max}")]
    TooLarge { size: usize, max: usize },
    #[error("record value is not UTF-8")]
    NotUtf8,
    #[error("record value is not JSON: {0}")]
    NotJson(String),
    #[error("record value is not a JSON object")]
    NotObject,
    #[error("required field {0} is missing")]
    MissingField(String),
    #[error("required field {0} is an empty string")]
    EmptyField(String),
    #[error("field {field} must be {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("field {0} must be an integer from 0 to 18446744073709551615")]
    SeqOutOfRange(String),
    #[error("field {0} is not an RFC 3339 timestamp")]
    BadTimestamp(String),
    #[error("entity {0:?} starts with `}}`, which would empty its Redis Cluster hash tag")]
    BadEntity(String),
}

impl Invalid {
    /// A stable, machine-readable reason code (documented in docs/event-contract.md).
    pub fn code(&self) -> &'static str {
        match self {
            Invalid::EmptyValue => "empty_value",
            Invalid::TooLarge { .. } => "too_large",
            Invalid::NotUtf8 => "not_utf8",
            Invalid::NotJson(_) => "not_json",
            Invalid::NotObject => "not_object",
            Invalid::MissingField(_) => "missing_field",
            Invalid::EmptyField(_) => "empty_field",
            Invalid::WrongType { .. } => "wrong_type",
            Invalid::SeqOutOfRange(_) => "seq_out_of_range",
            Invalid::BadTimestamp(_) => "bad_timestamp",
            Invalid::BadEntity(_) => "bad_entity",
        }
    }
}

/// Decodes one record in the configured format: CloudEvents (structured or
/// binary) or idem's envelope. `headers` are the record's headers.
pub fn decode_record(
    value: Option<&[u8]>,
    headers: &[(&str, &[u8])],
    cfg: &EventConfig,
) -> Result<Event, Invalid> {
    if let Some(bytes) = value {
        if bytes.len() > cfg.max_bytes {
            return Err(Invalid::TooLarge {
                size: bytes.len(),
                max: cfg.max_bytes,
            });
        }
    }
    let mode = match cfg.format {
        EventFormat::Idem => None,
        EventFormat::Auto => cloudevents::detect(headers),
        EventFormat::CloudEvents => {
            Some(cloudevents::detect(headers).unwrap_or(cloudevents::Mode::Structured))
        }
    };
    match mode {
        None => decode(value, &cfg.fields, cfg.max_bytes),
        Some(cloudevents::Mode::Binary) => cloudevents::decode_binary(headers, value),
        Some(cloudevents::Mode::Structured) => {
            let bytes = value.ok_or(Invalid::EmptyValue)?;
            let text = std::str::from_utf8(bytes).map_err(|_| Invalid::NotUtf8)?;
            cloudevents::decode_structured(text)
        }
    }
}

/// Decodes one record value in idem's envelope.
pub fn decode(value: Option<&[u8]>, fields: &FieldMap, max_bytes: usize) -> Result<Event, Invalid> {
    let bytes = value.ok_or(Invalid::EmptyValue)?;
    if bytes.len() > max_bytes {
        return Err(Invalid::TooLarge {
            size: bytes.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Invalid::NotUtf8)?;
    let mut root: Value =
        serde_json::from_str(text).map_err(|e| Invalid::NotJson(e.to_string()))?;
    if !root.is_object() {
        return Err(Invalid::NotObject);
    }
    let id = required_string(&root, &fields.id)?;
    let entity = required_string(&root, &fields.entity)?;
    let seq = match lookup(&root, &fields.seq) {
        None | Some(Value::Null) => return Err(Invalid::MissingField(fields.seq.clone())),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| Invalid::SeqOutOfRange(fields.seq.clone()))?,
        Some(_) => {
            return Err(Invalid::WrongType {
                field: fields.seq.clone(),
                expected: "an unsigned integer",
            })
        }
    };
    let op = match lookup(&root, &fields.kind) {
        None | Some(Value::Null) => Op::Upsert,
        Some(Value::String(s)) if s == "delete" => Op::Delete,
        Some(Value::String(_)) => Op::Upsert,
        Some(_) => {
            return Err(Invalid::WrongType {
                field: fields.kind.clone(),
                expected: "a string",
            })
        }
    };
    match lookup(&root, &fields.ts) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if is_rfc3339(s) => {}
        Some(_) => return Err(Invalid::BadTimestamp(fields.ts.clone())),
    }
    match lookup(&root, &fields.data) {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(Invalid::WrongType {
                field: fields.data.clone(),
                expected: "a JSON object",
            })
        }
    }
    if entity.starts_with('}') {
        return Err(Invalid::BadEntity(entity.to_string()));
    }
    let fingerprint = fingerprint(&root);
    let (id, entity) = (id.to_string(), entity.to_string());
    // The fingerprint is taken: the data fields can now be moved out, not copied.
    let (set, unset) = match root.pointer_mut(&fields.data).map(Value::take) {
        Some(Value::Object(map)) => split_data(map),
        _ => (Vec::new(), Vec::new()),
    };
    Ok(Event {
        id,
        entity,
        seq,
        op,
        set,
        unset,
        fingerprint,
    })
}

/// Splits `data` into fields to set (strings as they are, other values as
/// their JSON text) and fields to remove (`null`): one level of merge-patch.
pub(crate) fn split_data(
    map: serde_json::Map<String, Value>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut set = Vec::with_capacity(map.len());
    let mut unset = Vec::new();
    for (k, v) in map {
        match v {
            Value::Null => unset.push(k),
            Value::String(s) => set.push((k, s)),
            other => set.push((k, other.to_string())),
        }
    }
    (set, unset)
}

/// `Value::pointer` without its per-token allocation in the common case
/// (no `~` escapes in the pointer).
fn lookup<'a>(root: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.contains('~') {
        return root.pointer(pointer);
    }
    let mut target = root;
    for token in pointer.split('/').skip(1) {
        target = match target {
            Value::Object(map) => map.get(token)?,
            Value::Array(list) => list.get(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(target)
}

fn required_string<'a>(root: &'a Value, pointer: &str) -> Result<&'a str, Invalid> {
    match lookup(root, pointer) {
        None | Some(Value::Null) => Err(Invalid::MissingField(pointer.to_string())),
        Some(Value::String(s)) if s.is_empty() => Err(Invalid::EmptyField(pointer.to_string())),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Invalid::WrongType {
            field: pointer.to_string(),
            expected: "a non-empty string",
        }),
    }
}

/// FNV-1a, 64 bit: stable across versions and platforms, which a stored
/// fingerprint needs (std's hasher makes no such promise).
#[derive(Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

impl std::io::Write for Fnv64 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hash of the canonical JSON form: object keys sorted, no whitespace.
/// Two records that differ only in key order or spacing have the same fingerprint.
pub fn fingerprint(value: &Value) -> u64 {
    // serde_json's Map is a BTreeMap (no `preserve_order`), so serialising
    // writes keys sorted and without whitespace: that is the canonical form.
    let mut hasher = Fnv64::default();
    serde_json::to_writer(&mut hasher, value).expect("writing to a hasher cannot fail");
    hasher.finish()
}

/// The 8-byte key under which an id is remembered in the dedupe window.
pub fn id_hash(id: &str) -> u64 {
    let mut h = Fnv64::default();
    h.update(id.as_bytes());
    h.finish()
}

/// A light RFC 3339 check: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Result<Event, Invalid> {
        decode(Some(s.as_bytes()), &FieldMap::default(), 1024)
    }

    #[test]
    fn decodes_a_full_event() {
        let e = dec(r#"{"id":"e1","entity":"orders:1","seq":7,"type":"upsert","ts":"2026-01-02T03:04:05.123Z","data":{"status":"paid","total":12.5,"gone":null,"tags":["a"]}}"#).unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.entity, "orders:1");
        assert_eq!(e.seq, 7);
        assert_eq!(e.op, Op::Upsert);
        assert_eq!(
            e.set,
            vec![
                ("status".to_string(), "paid".to_string()),
                ("tags".to_string(), "[\"a\"]".to_string()),
                ("total".to_string(), "12.5".to_string()),
            ]
        );
        assert_eq!(e.unset, vec!["gone".to_string()]);
    }

    #[test]
    fn delete_and_missing_data() {
        let e = dec(r#"{"id":"e1","entity":"x","seq":0,"type":"delete"}"#).unwrap();
        assert_eq!(e.op, Op::Delete);
        assert!(e.set.is_empty() && e.unset.is_empty());
    }

    /// Truth table of rejected inputs and their reason codes.
    #[test]
    fn invalid_inputs_by_table() {
        let table: &[(&[u8], &str)] = &[
            (b"{\"id\":\"a\",\"entity\":\"e\",\"seq\":1", "not_json"),
            (b"\xff\xfe\x00garbage", "not_utf8"),
            (b"[1,2]", "not_object"),
            (b"\"str\"", "not_object"),
            (br#"{"entity":"e","seq":1}"#, "missing_field"),
            (br#"{"id":null,"entity":"e","seq":1}"#, "missing_field"),
            (br#"{"id":"","entity":"e","seq":1}"#, "empty_field"),
            (br#"{"id":"a","entity":"","seq":1}"#, "empty_field"),
            (br#"{"id":5,"entity":"e","seq":1}"#, "wrong_type"),
            (br#"{"id":"a","entity":{},"seq":1}"#, "wrong_type"),
            (br#"{"id":"a","entity":"e"}"#, "missing_field"),
            (br#"{"id":"a","entity":"e","seq":"1"}"#, "wrong_type"),
            (br#"{"id":"a","entity":"e","seq":-1}"#, "seq_out_of_range"),
            (
                br#"{"id":"a","entity":"e","seq":18446744073709551616}"#,
                "seq_out_of_range",
            ),
            (br#"{"id":"a","entity":"e","seq":1.5}"#, "seq_out_of_range"),
            (br#"{"id":"a","entity":"e","seq":1,"type":3}"#, "wrong_type"),
            (
                br#"{"id":"a","entity":"e","seq":1,"data":[1]}"#,
                "wrong_type",
            ),
            (
                br#"{"id":"a","entity":"e","seq":1,"data":"x"}"#,
                "wrong_type",
            ),
            (
                br#"{"id":"a","entity":"e","seq":1,"ts":"yesterday"}"#,
                "bad_timestamp",
            ),
            (
                br#"{"id":"a","entity":"e","seq":1,"ts":17}"#,
                "bad_timestamp",
            ),
        ];
        for (input, code) in table {
            let got = decode(Some(input), &FieldMap::default(), 1024);
            assert_eq!(
                got.as_ref().map_err(Invalid::code).err(),
                Some(*code),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            decode(None, &FieldMap::default(), 10).unwrap_err().code(),
            "empty_value"
        );
        let big = format!(
            r#"{{"id":"a","entity":"e","seq":1,"data":{{"x":"{}"}}}}"#,
            "y".repeat(100)
        );
        assert_eq!(
            decode(Some(big.as_bytes()), &FieldMap::default(), 64)
                .unwrap_err()
                .code(),
            "too_large"
        );
    }

    #[test]
    fn largest_seq_is_accepted() {
        let e = dec(r#"{"id":"a","entity":"e","seq":18446744073709551615}"#).unwrap();
        assert_eq!(e.seq, u64::MAX);
    }

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace() {
        let a = dec(r#"{"id":"a","entity":"e","seq":1,"data":{"x":1,"y":"z"}}"#).unwrap();
        let b = dec(
            "{ \"data\" : {\"y\":\"z\", \"x\":1},\n \"seq\":1, \"entity\":\"e\", \"id\":\"a\" }",
        )
        .unwrap();
        let c = dec(r#"{"id":"a","entity":"e","seq":1,"data":{"x":2,"y":"z"}}"#).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(id_hash(""), 0xcbf29ce484222325);
        assert_eq!(id_hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(id_hash("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn field_mapping_uses_pointers() {
        let fields = FieldMap {
            id: "/meta/eventId".into(),
            entity: "/meta/key".into(),
            seq: "/meta/version".into(),
            kind: "/op".into(),
            data: "/after".into(),
            ts: "/meta/at".into(),
        };
        let e = decode(
            Some(br#"{"meta":{"eventId":"x","key":"k","version":3},"op":"delete","after":{}}"#),
            &fields,
            1024,
        )
        .unwrap();
        assert_eq!(
            (e.id.as_str(), e.entity.as_str(), e.seq, e.op),
            ("x", "k", 3, Op::Delete)
        );
    }

    #[test]
    fn lookup_matches_json_pointer_semantics() {
        let v: Value = serde_json::from_str(r#"{"a":{"b/c":1,"d~e":2,"l":[10,20]},"":3}"#).unwrap();
        for p in [
            "/a/b~1c", "/a/d~0e", "/a/l/1", "/a/l/9", "/", "/x", "/a/l/x", "",
        ] {
            assert_eq!(lookup(&v, p), v.pointer(p), "{p}");
        }
    }

    #[test]
    fn rfc3339_by_table() {
        for ok in [
            "2026-01-02T03:04:05Z",
            "2026-01-02T03:04:05.5+01:00",
            "2026-01-02t03:04:05-00:00",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "2026-01-02",
            "2026-01-02T03:04:05",
            "2026-01-02T03:04:05.Z",
            "20260102T030405Z",
            "2026-01-02T03:04:05+0100",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn decoder_survives_arbitrary_bytes() {
        // A cheap deterministic sweep; the property test in tests/ goes further.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x & 0xff) as u8
                })
                .collect();
            let _ = decode(Some(&bytes), &FieldMap::default(), 4096);
        }
    }
}
