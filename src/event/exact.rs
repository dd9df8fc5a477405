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

use std::collections::BTreeMap;

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

/// The raw value at a JSON pointer (RFC 6901), or `None` if absent.
fn raw_at<'a>(text: &'a str, pointer: &str) -> Result<Option<&'a RawValue>, Invalid> {
    let mut here: &RawValue = parse(text)?;
    if pointer.is_empty() {
        return Ok(Some(here));
    }
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        let next = match here.get().as_bytes().first() {
            Some(b'{') => {
                let mut map: BTreeMap<String, &RawValue> = parse(here.get())?;
                map.remove(&token)
            }
            Some(b'[') => {
                let list: Vec<&RawValue> = parse(here.get())?;
                token
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| list.get(i).copied())
            }
            _ => None,
        };
        match next {
            Some(v) => here = v,
            None => return Ok(None),
        }
    }
    Ok(Some(here))
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

    fn fields(text: &str) -> DataFields {
        data_fields(text, "/data").unwrap().unwrap()
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
}
