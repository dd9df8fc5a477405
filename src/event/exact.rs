//! The `data` fields of an event exactly as the producer wrote them.
//!
//! Guarantee: a number in `data` is stored as its JSON text, byte for byte
//! (`0.42456890886584453`, `1e2`, `-0`, a 30-digit integer), never through a
//! binary float. Nested objects and arrays are stored as compact JSON with
//! their keys sorted (the form idem has always stored), with their numbers
//! exact too.
//!
//! Why not serde_json's `arbitrary_precision`: it is crate-wide and changes
//! how every `Value` serialises, including the one the fingerprint is
//! computed from (a fingerprint must never change for an event already
//! remembered, or its redelivery becomes a conflict). Instead the decoder
//! keeps its `Value` for the envelope and the fingerprint, and reads the data
//! fields a second time as `RawValue`s, only when they hold a number.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de;
use serde_json::value::RawValue;
use serde_json::Value;

use super::Invalid;

/// Fields to set and fields to remove: one level of JSON merge-patch.
pub type DataFields = (Vec<(String, String)>, Vec<String>);

/// Whether `value` holds a number anywhere (then the exact path is needed).
pub fn contains_number(value: &Value) -> bool {
    match value {
        Value::Number(_) => true,
        Value::Array(items) => items.iter().any(contains_number),
        Value::Object(map) => map.values().any(contains_number),
        _ => false,
    }
}

/// The data object at `pointer` in `text` (already parsed once, so valid
/// JSON), split into fields with their exact texts. `None` when there is no
/// object there.
pub fn data_fields(text: &str, pointer: &str) -> Result<Option<DataFields>, Invalid> {
    let Some(raw) = raw_at(text, pointer)? else {
        return Ok(None);
    };
    let map: BTreeMap<String, &RawValue> = match raw.get().as_bytes().first() {
        Some(b'{') => parse(raw.get())?,
        _ => return Ok(None),
    };
    let mut set = Vec::with_capacity(map.len());
    let mut unset = Vec::new();
    for (k, v) in map {
        match v.get().as_bytes()[0] {
            b'n' => unset.push(k),
            b'"' => set.push((k, parse::<String>(v.get())?)),
            _ => {
                let mut out = String::with_capacity(v.get().len());
                write_canonical(v, &mut out)?;
                set.push((k, out));
            }
        }
    }
    Ok(Some((set, unset)))
}

/// The fields of `map`, the data object at `pointer` in `text` as `Value`
/// parsed it: strings and nulls are taken from it as they are (moved, not
/// read again), and only the other values (numbers, and objects, arrays
/// and literals, which may hold numbers) are read again from `text` for
/// their exact text. What [`data_fields`] gives, with less read twice.
pub fn data_fields_beside(
    text: &str,
    pointer: &str,
    map: serde_json::Map<String, Value>,
) -> Result<DataFields, Invalid> {
    let members = match raw_at(text, pointer)? {
        Some(raw) if raw.get().as_bytes().first() == Some(&b'{') => raw_members(raw.get())?,
        _ => Vec::new(),
    };
    super::split_data_with(map, |k, _| {
        // The last of a repeated key, as `Value` kept it.
        let raw = members
            .iter()
            .rev()
            .find(|(key, _)| key.0 == k)
            .map(|(_, raw)| *raw)
            .ok_or_else(|| Invalid::NotJson(format!("data field {k:?} not found in the text")))?;
        let mut out = String::with_capacity(raw.get().len());
        write_canonical(raw, &mut out)?;
        Ok(out)
    })
}

/// The members of the JSON object `text`, in order, keys borrowed unless
/// escaped.
fn raw_members(text: &str) -> Result<Vec<(Key<'_>, &RawValue)>, Invalid> {
    struct Members;
    impl<'de> de::Visitor<'de> for Members {
        type Value = Vec<(Key<'de>, &'de RawValue)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(key) = map.next_key::<Key<'de>>()? {
                out.push((key, map.next_value()?));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de::Deserializer::deserialize_map(&mut de, Members)
        .and_then(|members| de.end().map(|()| members))
        .map_err(|e| Invalid::NotJson(e.to_string()))
}

/// The raw value at a JSON pointer (RFC 6901), or `None` if absent.
fn raw_at<'a>(text: &'a str, pointer: &str) -> Result<Option<&'a RawValue>, Invalid> {
    if pointer.is_empty() {
        return parse(text).map(Some);
    }
    let mut here = text;
    let mut found = None;
    for token in pointer.split('/').skip(1) {
        let token: Cow<'_, str> = if token.contains('~') {
            Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
        } else {
            Cow::Borrowed(token)
        };
        let next = match here.trim_start().as_bytes().first() {
            Some(b'{') => value_of_key(here, &token)?,
            Some(b'[') => {
                let list: Vec<&RawValue> = parse(here)?;
                token
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| list.get(i).copied())
            }
            _ => None,
        };
        match next {
            Some(v) => {
                here = v.get();
                found = Some(v);
            }
            None => return Ok(None),
        }
    }
    Ok(found)
}

/// The value of `key` in the JSON object `text` (the last, if repeated),
/// the other members skipped: no map is built, no key copied.
fn value_of_key<'a>(text: &'a str, key: &str) -> Result<Option<&'a RawValue>, Invalid> {
    let mut de = serde_json::Deserializer::from_str(text);
    let found = de::Deserializer::deserialize_map(&mut de, ValueOfKey(key))
        .and_then(|found| de.end().map(|()| found))
        .map_err(|e| Invalid::NotJson(e.to_string()))?;
    Ok(found)
}

struct ValueOfKey<'k>(&'k str);

impl<'de> de::Visitor<'de> for ValueOfKey<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(Key(key)) = map.next_key()? {
            if key == self.0 {
                found = Some(map.next_value()?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// An object key, borrowed from the text unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Compact JSON with object keys sorted, numbers and literals as written.
fn write_canonical(raw: &RawValue, out: &mut String) -> Result<(), Invalid> {
    let text = raw.get();
    match text.as_bytes()[0] {
        b'{' => {
            let map: BTreeMap<String, &RawValue> = parse(text)?;
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).expect("a string serialises"));
                out.push(':');
                write_canonical(v, out)?;
            }
            out.push('}');
        }
        b'[' => {
            let list: Vec<&RawValue> = parse(text)?;
            out.push('[');
            for (i, v) in list.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out)?;
            }
            out.push(']');
        }
        b'"' => {
            let s: String = parse(text)?;
            out.push_str(&serde_json::to_string(&s).expect("a string serialises"));
        }
        // A number, true, false or null: its text is already canonical.
        _ => out.push_str(text.trim()),
    }
    Ok(())
}

fn parse<'a, T: serde::Deserialize<'a>>(text: &'a str) -> Result<T, Invalid> {
    serde_json::from_str(text).map_err(|e| Invalid::NotJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields read from the text alone, checked against the fields
    /// read beside the parsed `Value` (the decoder's path).
    fn fields(text: &str) -> DataFields {
        let alone = data_fields(text, "/data").unwrap().unwrap();
        // (`Value` refuses a number past f64, e.g. 1e400: so does the decoder.)
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            let map = value["data"].as_object().unwrap().clone();
            assert_eq!(
                data_fields_beside(text, "/data", map).unwrap(),
                alone,
                "{text}"
            );
        }
        alone
    }

    /// Number texts that a binary float would change, kept byte for byte.
    #[test]
    fn numbers_keep_their_text() {
        for n in [
            "0.42456890886584453",
            "123456789012345678901234567890",
            "12.345678901234567890",
            "1e2",
            "1E+2",
            "-0",
            "0.1",
            "-1.5e-300",
            "18446744073709551616",
            "1e400",
        ] {
            let (set, _) = fields(&format!(r#"{{"data":{{"x":{n}}}}}"#));
            assert_eq!(set, vec![("x".to_string(), n.to_string())], "{n}");
        }
    }

    #[test]
    fn nested_values_are_compact_sorted_and_exact() {
        let (set, unset) = fields(
            r#"{"data":{"n":{ "b" : [1.10, {"z":-0,"a":"é\n"}], "a":true },"gone":null,"s":"text"}}"#,
        );
        assert_eq!(
            set,
            vec![
                (
                    "n".to_string(),
                    r#"{"a":true,"b":[1.10,{"a":"é\n","z":-0}]}"#.to_string()
                ),
                ("s".to_string(), "text".to_string()),
            ]
        );
        assert_eq!(unset, vec!["gone".to_string()]);
    }

    #[test]
    fn pointers_with_escapes_and_arrays() {
        let text = r#"{"a/b":{"l":[0,{"x":1.0}]}}"#;
        let (set, _) = data_fields(text, "/a~1b/l/1").unwrap().unwrap();
        assert_eq!(set, vec![("x".to_string(), "1.0".to_string())]);
        assert!(data_fields(text, "/missing").unwrap().is_none());
        assert!(data_fields(text, "/a~1b/l/0").unwrap().is_none());
    }

    /// Without numbers the exact path writes what `Value` writes.
    #[test]
    fn agrees_with_value_without_numbers() {
        let text = r#"{"data":{"k":{"y":["\u00e9","\"q\""],"x":{"t":false}},"s":"v"}}"#;
        let value: Value = serde_json::from_str(text).unwrap();
        let map = value["data"].as_object().unwrap().clone();
        assert_eq!(fields(text), super::super::split_data(map));
    }

    /// A repeated key means its last value (as the envelope's parser reads
    /// it); a key written with escapes is the key it spells.
    #[test]
    fn the_last_of_a_repeated_key_counts_and_escaped_keys_match() {
        let text = r#" {"data":{"x":1},"pad":[{"data":2}],"data":{"y":2.50}}"#;
        assert_eq!(fields(text).0, vec![("y".to_string(), "2.50".to_string())]);
        let escaped = r#"{"d\u0061ta":{"z":0.10}}"#;
        assert_eq!(
            fields(escaped).0,
            vec![("z".to_string(), "0.10".to_string())]
        );
    }
}
