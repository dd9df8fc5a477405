//! The event envelope: decoding a Kafka record value into an [`Event`],
//! and the hashes that identify it.
//!
//! Guarantee: decoding is total. Any byte string yields either an `Event` or
//! an [`Invalid`] with a stable reason code; it never panics.

pub mod cloudevents;
pub mod exact;
pub mod reason;
pub mod settings;
pub mod strict;

use serde_json::Value;

pub use reason::Reason;

pub use settings::{EventConfig, EventFormat, FieldMap};

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
    /// The event type (`type` in the envelope or CloudEvents), which
    /// chooses its effects (docs/effects.md).
    pub kind: Option<String>,
    /// Fields to set: strings as they are, other JSON values as their JSON text.
    pub set: Vec<(String, String)>,
    /// Fields to remove (given as `null` in `data`).
    pub unset: Vec<String>,
    /// Hash of the canonical form of the whole record value.
    pub fingerprint: u64,
    /// When the event happened (`ts`, RFC 3339 as written; none from
    /// CloudEvents): not used for decisions, carried into its change record.
    pub ts: Option<String>,
    /// The record's top-level `change` member, when it has one: what an
    /// idem change record says its change did (docs/change-stream.md), read
    /// (and refused unless an object) by a rule with `changes = true`.
    pub change: Option<Value>,
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
    /// A number with a fraction or written as one (`1.0`, `1e3`): JSON
    /// readers differ on whether `1.0` is the integer 1, so idem refuses it.
    #[error(
        "field {field} is {value}, not an integer: write the seq as a whole number (1, not 1.0)"
    )]
    SeqNotInteger { field: String, value: String },
    #[error("field {0} is not an RFC 3339 timestamp")]
    BadTimestamp(String),
    #[error("entity {0:?} starts with `}}`, which would empty its Redis Cluster hash tag")]
    BadEntity(String),
    #[error("record value has a {0} (event.duplicate_keys = \"reject\")")]
    DuplicateKey(String),
    #[error("record key {key:?} is not the entity {entity:?}, so the entity's events can spread over partitions (event.key_mismatch = \"dead_letter\")")]
    KeyMismatch { key: String, entity: String },
    /// The event's declared effects cannot be applied (docs/effects.md).
    #[error("{message}")]
    Effect { code: Reason, message: String },
}

/// A JSON number as a seq: an integer from 0 to 2^64−1. A number written
/// with a fraction or an exponent is not an integer, even `1.0`.
pub(crate) fn seq_number(n: &serde_json::Number, field: &str) -> Result<u64, Invalid> {
    if let Some(seq) = n.as_u64() {
        return Ok(seq);
    }
    let whole_in_range = n
        .as_f64()
        .is_some_and(|v| v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v));
    match n.as_f64() {
        Some(v) if v.fract() != 0.0 || whole_in_range => Err(Invalid::SeqNotInteger {
            field: field.to_string(),
            value: n.to_string(),
        }),
        _ => Err(Invalid::SeqOutOfRange(field.to_string())),
    }
}

impl Invalid {
    /// A stable, machine-readable reason code (documented in docs/event-contract.md).
    pub fn code(&self) -> Reason {
        match self {
            Invalid::EmptyValue => Reason::EmptyValue,
            Invalid::TooLarge { .. } => Reason::TooLarge,
            Invalid::NotUtf8 => Reason::NotUtf8,
            Invalid::NotJson(_) => Reason::NotJson,
            Invalid::NotObject => Reason::NotObject,
            Invalid::MissingField(_) => Reason::MissingField,
            Invalid::EmptyField(_) => Reason::EmptyField,
            Invalid::WrongType { .. } => Reason::WrongType,
            Invalid::SeqOutOfRange(_) | Invalid::SeqNotInteger { .. } => Reason::SeqOutOfRange,
            Invalid::BadTimestamp(_) => Reason::BadTimestamp,
            Invalid::BadEntity(_) => Reason::BadEntity,
            Invalid::DuplicateKey(_) => Reason::DuplicateKey,
            Invalid::KeyMismatch { .. } => Reason::KeyMismatch,
            Invalid::Effect { code, .. } => *code,
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
    // A zero-byte value is no value (a tombstone record or an empty write).
    let value = value.filter(|bytes| !bytes.is_empty());
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
        None => decode_with(value, &cfg.fields, cfg.max_bytes, cfg.reject_duplicate_keys),
        Some(cloudevents::Mode::Binary) => {
            cloudevents::decode_binary(headers, value, cfg.reject_duplicate_keys)
        }
        Some(cloudevents::Mode::Structured) => {
            let bytes = value.ok_or(Invalid::EmptyValue)?;
            let text = std::str::from_utf8(bytes).map_err(|_| Invalid::NotUtf8)?;
            cloudevents::decode_structured(text, cfg.reject_duplicate_keys)
        }
    }
}

/// Decodes one record with its Kafka key: `decode_record`, then the key
/// rule. Returns the result and whether the key is not the entity (or is
/// missing); with `event.key_mismatch = "dead_letter"` such a record is
/// `Invalid::KeyMismatch`. The pipeline, `reconcile` and `dlq redrive` all
/// decide with this one function.
pub fn decode_keyed(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, &[u8])],
    cfg: &EventConfig,
) -> (Result<Event, Invalid>, bool) {
    match decode_record(value, headers, cfg) {
        Ok(e) if key != Some(e.entity.as_bytes()) => {
            if cfg.dead_letter_key_mismatch {
                let key = key.map(String::from_utf8_lossy).unwrap_or_default();
                let entity = e.entity;
                (
                    Err(Invalid::KeyMismatch {
                        key: key.chars().take(256).collect(),
                        entity,
                    }),
                    true,
                )
            } else {
                (Ok(e), true)
            }
        }
        other => (other, false),
    }
}

/// Decodes one record value in idem's envelope (duplicate keys: last wins).
pub fn decode(value: Option<&[u8]>, fields: &FieldMap, max_bytes: usize) -> Result<Event, Invalid> {
    decode_with(value, fields, max_bytes, false)
}

/// Decodes one record value in idem's envelope; `reject_duplicate_keys`
/// makes a repeated object key an `Invalid::DuplicateKey`.
pub fn decode_with(
    value: Option<&[u8]>,
    fields: &FieldMap,
    max_bytes: usize,
    reject_duplicate_keys: bool,
) -> Result<Event, Invalid> {
    let bytes = value.filter(|b| !b.is_empty()).ok_or(Invalid::EmptyValue)?;
    if bytes.len() > max_bytes {
        return Err(Invalid::TooLarge {
            size: bytes.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Invalid::NotUtf8)?;
    let mut root = parse_json(text, reject_duplicate_keys)?;
    if !root.is_object() {
        return Err(Invalid::NotObject);
    }
    let id = required_string(&root, &fields.id)?;
    let entity = required_string(&root, &fields.entity)?;
    let seq = match lookup(&root, &fields.seq) {
        None | Some(Value::Null) => return Err(Invalid::MissingField(fields.seq.clone())),
        Some(Value::Number(n)) => seq_number(n, &fields.seq)?,
        Some(_) => {
            return Err(Invalid::WrongType {
                field: fields.seq.clone(),
                expected: "an unsigned integer",
            })
        }
    };
    let (op, kind) = match lookup(&root, &fields.kind) {
        None | Some(Value::Null) => (Op::Upsert, None),
        Some(Value::String(s)) if s == "delete" => (Op::Delete, Some(s.clone())),
        Some(Value::String(s)) => (Op::Upsert, Some(s.clone())),
        Some(_) => {
            return Err(Invalid::WrongType {
                field: fields.kind.clone(),
                expected: "a string",
            })
        }
    };
    let ts = match lookup(&root, &fields.ts) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if is_rfc3339(s) => Some(s.clone()),
        Some(_) => return Err(Invalid::BadTimestamp(fields.ts.clone())),
    };
    if !is_object_or_absent(lookup(&root, &fields.data)) {
        return Err(Invalid::WrongType {
            field: fields.data.clone(),
            expected: "a JSON object",
        });
    }
    if entity.starts_with('}') {
        return Err(Invalid::BadEntity(entity.to_string()));
    }
    let fingerprint = fingerprint(&root);
    let (id, entity) = (id.to_string(), entity.to_string());
    let change = root.get_mut("change").map(Value::take);
    // The fingerprint is taken: the data fields can now be moved out, not copied.
    let (set, unset) = data_fields(text, &fields.data, root.pointer_mut(&fields.data))?;
    Ok(Event {
        id,
        entity,
        seq,
        op,
        kind,
        set,
        unset,
        fingerprint,
        ts,
        change,
    })
}

/// Whether a `data` member is an object, `null` or absent (no fields).
fn is_object_or_absent(data: Option<&Value>) -> bool {
    matches!(data, None | Some(Value::Null | Value::Object(_)))
}

/// serde_json's private marker key for raw values.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Parses a record value, refusing duplicate keys if asked to.
pub(crate) fn parse_json(text: &str, reject_duplicate_keys: bool) -> Result<Value, Invalid> {
    // serde_json's raw_value feature (used by `exact`) reads an object with
    // this key as the JSON text of its value: refuse it, so a record means
    // what it says, whatever the parser.
    if text.contains(RAW_VALUE_TOKEN) {
        return Err(Invalid::NotJson(format!(
            "the key {RAW_VALUE_TOKEN:?} is reserved"
        )));
    }
    let parsed = if reject_duplicate_keys {
        strict::parse(text)
    } else {
        serde_json::from_str(text)
    };
    parsed.map_err(|e| {
        let message = e.to_string();
        match message.strip_prefix(strict::DUPLICATE_KEY) {
            Some(_) => Invalid::DuplicateKey(message),
            None => Invalid::NotJson(message),
        }
    })
}

/// The fields of the data object `data` (found at `pointer` in `text`).
/// Numbers keep their exact text: when `data` holds one, the fields are
/// read again from `text` (see [`exact`]); otherwise `data` is moved out.
pub(crate) fn data_fields(
    text: &str,
    pointer: &str,
    data: Option<&mut Value>,
) -> Result<exact::DataFields, Invalid> {
    match data.map(Value::take) {
        Some(Value::Object(map)) if map.values().any(exact::contains_number) => {
            exact::data_fields_beside(text, pointer, map)
        }
        Some(Value::Object(map)) => Ok(split_data(map)),
        _ => Ok((Vec::new(), Vec::new())),
    }
}

/// Splits `data` into fields to set (strings as they are, other values as
/// their JSON text) and fields to remove (`null`): one level of merge-patch.
pub(crate) fn split_data(
    map: serde_json::Map<String, Value>,
) -> (Vec<(String, String)>, Vec<String>) {
    let split: Result<_, std::convert::Infallible> =
        split_data_with(map, |_, other| Ok(other.to_string()));
    split.unwrap_or_else(|never| match never {})
}

/// [`split_data`], with the text of each value that is neither a string
/// nor `null` written by `text_of(key, value)`.
pub(crate) fn split_data_with<E>(
    map: serde_json::Map<String, Value>,
    mut text_of: impl FnMut(&str, Value) -> Result<String, E>,
) -> Result<exact::DataFields, E> {
    let mut set = Vec::with_capacity(map.len());
    let mut unset = Vec::new();
    for (k, v) in map {
        match v {
            Value::Null => unset.push(k),
            Value::String(s) => set.push((k, s)),
            other => {
                let text = text_of(&k, other)?;
                set.push((k, text));
            }
        }
    }
    Ok((set, unset))
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

/// RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, with every
/// field in range: month 1–12, the day within its month (leap years by the
/// Gregorian rule), hour ≤ 23, minute ≤ 59, second ≤ 60 (a leap second),
/// offset hour ≤ 23 and minute ≤ 59.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = b.get(range)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return false;
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        number(0..4),
        number(5..7),
        number(8..10),
        number(11..13),
        number(14..16),
        number(17..19),
    ) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
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
        [b'+' | b'-', _, _, b':', _, _] => {
            matches!((number(i + 1..i + 3), number(i + 4..i + 6)), (Some(h), Some(m)) if h <= 23 && m <= 59)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
