//! The decoder's tables: accepted envelopes, every rejection reason,
//! fingerprints and timestamps.

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

/// A seq written as a decimal is refused as not an integer (the same
/// reason code), not as out of range; a big or negative one stays out of range.
#[test]
fn a_seq_written_as_a_decimal_is_said_not_to_be_an_integer() {
    let says = |seq: &str| match dec(&format!(r#"{{"id":"a","entity":"e","seq":{seq}}}"#)) {
        Err(e) => (e.code(), e.to_string()),
        Ok(e) => panic!("{seq} decoded to {}", e.seq),
    };
    for seq in ["1.0", "1.5", "1e3", "-0.5"] {
        let (code, text) = says(seq);
        assert_eq!(code, "seq_out_of_range");
        assert!(text.contains("not an integer"), "{seq}: {text}");
    }
    for seq in ["-1", "18446744073709551616", "1e30"] {
        let (code, text) = says(seq);
        assert_eq!(code, "seq_out_of_range");
        assert!(text.contains("from 0 to"), "{seq}: {text}");
    }
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
            got.as_ref().map_err(|e| e.code().as_str()).err(),
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
fn serde_json_raw_value_marker_is_refused() {
    let text = r#"{"$serde_json::private::RawValue":"{\"id\":\"a\",\"entity\":\"e\",\"seq\":1}"}"#;
    for strict in [false, true] {
        let got = decode_with(Some(text.as_bytes()), &FieldMap::default(), 1024, strict);
        assert_eq!(got.unwrap_err().code(), "not_json");
    }
}

/// The key rule, as the pipeline, reconcile and redrive apply it.
#[test]
fn decode_keyed_by_table() {
    let value = br#"{"id":"a","entity":"acct:1","seq":1}"#;
    let mut cfg = crate::config::Config::defaults().event;
    for (key, dead_letter, ok, mismatch) in [
        (Some(&b"acct:1"[..]), false, true, false),
        (Some(&b"acct:1"[..]), true, true, false),
        (Some(&b"user-7"[..]), false, true, true),
        (None, false, true, true),
        (Some(&b"user-7"[..]), true, false, true),
        (None, true, false, true),
    ] {
        cfg.dead_letter_key_mismatch = dead_letter;
        let (got, mismatched) = decode_keyed(key, Some(value), &[], &cfg);
        assert_eq!(got.is_ok(), ok, "{key:?} {dead_letter}");
        assert_eq!(mismatched, mismatch, "{key:?} {dead_letter}");
        if !ok {
            assert_eq!(got.unwrap_err().code(), "key_mismatch");
        }
    }
}

#[test]
fn zero_byte_value_is_empty_not_json() {
    assert_eq!(dec("").unwrap_err().code(), "empty_value");
    let cfg = crate::config::Config::defaults().event;
    assert_eq!(
        decode_record(Some(b""), &[], &cfg).unwrap_err().code(),
        "empty_value"
    );
}

#[test]
fn duplicate_keys_win_last_or_are_refused() {
    let text = br#"{"id":"a","entity":"e","seq":1,"data":{"amount":1,"amount":100}}"#;
    let lax = decode_with(Some(text), &FieldMap::default(), 1024, false).unwrap();
    assert_eq!(lax.set, vec![("amount".to_string(), "100".to_string())]);
    let strict = decode_with(Some(text), &FieldMap::default(), 1024, true).unwrap_err();
    assert_eq!(strict.code(), "duplicate_key");
    assert!(strict.to_string().contains("\"amount\""), "{strict}");
    // Without duplicates both agree, fingerprint included.
    let clean = br#"{"id":"a","entity":"e","seq":1,"data":{"x":[1.5,{"y":2}]}}"#;
    assert_eq!(
        decode_with(Some(clean), &FieldMap::default(), 1024, false),
        decode_with(Some(clean), &FieldMap::default(), 1024, true)
    );
}

/// The fingerprint of that record as idem computed it before numbers
/// were kept exact: it must never change.
const GOLDEN_FINGERPRINT: u64 = 0xc6b8_344b_7e1b_7f1b;

/// The fingerprint keeps the normalisation of earlier versions (numbers
/// as serde_json re-serialises them), so an event remembered before the
/// exact-number change is still a duplicate when redelivered after it.
#[test]
fn fingerprint_is_stable_across_the_exact_number_change() {
    let e =
        dec(r#"{"id":"a","entity":"e","seq":1,"data":{"p":0.42456890886584453,"n":1e2}}"#).unwrap();
    // As the previous version computed it: over serde_json's Value.
    let value: Value = serde_json::from_str(
        r#"{"id":"a","entity":"e","seq":1,"data":{"p":0.4245689088658446,"n":100.0}}"#,
    )
    .unwrap();
    assert_eq!(e.fingerprint, fingerprint(&value));
    assert_eq!(e.fingerprint, GOLDEN_FINGERPRINT);
    assert_eq!(
        e.set,
        vec![
            ("n".to_string(), "1e2".to_string()),
            ("p".to_string(), "0.42456890886584453".to_string())
        ]
    );
}

/// `event.max_bytes` is inclusive: a value of exactly that size is read.
#[test]
fn max_bytes_boundary() {
    let text = br#"{"id":"a","entity":"e","seq":1}"#;
    let n = text.len();
    assert!(decode(Some(text), &FieldMap::default(), n).is_ok());
    assert_eq!(
        decode(Some(text), &FieldMap::default(), n - 1)
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
    let b =
        dec("{ \"data\" : {\"y\":\"z\", \"x\":1},\n \"seq\":1, \"entity\":\"e\", \"id\":\"a\" }")
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
        "2024-02-29T23:59:60Z",
        "2000-02-29T00:00:00+23:59",
        "2026-01-02 03:04:05Z",
        "2023-02-28T00:00:00Z",
        "2024-04-30T00:00:00Z",
        "2024-12-31T23:59:59.123456789z",
        "1600-02-29T00:00:00Z",
    ] {
        assert!(is_rfc3339(ok), "{ok}");
    }
    // Full length, one thing wrong: each separator, digit and range check
    // on its own.
    for bad in [
        "2026x01-02T03:04:05Z",
        "2026-01x02T03:04:05Z",
        "2026-01-02x03:04:05Z",
        "2026-01-02T03x04:05Z",
        "2026-01-02T03:04x05Z",
        "20a6-01-02T03:04:05Z",
        "2026-0a-02T03:04:05Z",
        "2026-01-0aT03:04:05Z",
        "2026-01-02T0a:04:05Z",
        "2026-01-02T03:0a:05Z",
        "2026-01-02T03:04:0aZ",
        "1900-02-29T00:00:00Z",
        "2024-01-00T00:00:00Z",
        "2024-06-31T00:00:00Z",
        "2024-01-32T00:00:00Z",
        "2026-01-02T03:04:05Zx",
        "2026-01-02T03:04:05.123",
        "2026-01-02T03:04:05+1:000",
        "2026-01-02T03:04:05+ab:00",
        "2026-01-02T03:04:05+01:ab",
        "2026-01-02T03:04:05+01-00",
        "2026-01-02T03:04:05 01:00",
    ] {
        assert!(!is_rfc3339(bad), "{bad}");
    }
    for bad in [
        "2026-01-02",
        "2026-01-02T03:04:05",
        "2026-01-02T03:04:05.Z",
        "20260102T030405Z",
        "2026-01-02T03:04:05+0100",
        "2024-13-45T99:99:99Z",
        "2024-00-10T00:00:00Z",
        "2023-02-29T00:00:00Z",
        "2100-02-29T00:00:00Z",
        "2024-04-31T00:00:00Z",
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:60:00Z",
        "2024-01-01T00:00:61Z",
        "2024-01-01T00:00:00+24:00",
        "2024-01-01T00:00:00+01:60",
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

/// The size limit holds for CloudEvents too (checked before the format is
/// chosen): a value of exactly `max_bytes` is read, one byte more is not.
#[test]
fn max_bytes_boundary_in_every_format() {
    let headers: [(&str, &[u8]); 6] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"x"),
        ("ce_source", b"/s"),
        ("ce_type", b"t"),
        ("ce_subject", b"e"),
        ("ce_sequence", b"12"),
    ];
    let value = br#"{"a":1}"#;
    for format in [EventFormat::CloudEvents, EventFormat::Auto] {
        let mut cfg = crate::config::Config::defaults().event;
        cfg.format = format;
        cfg.max_bytes = value.len();
        let e = decode_record(Some(value), &headers, &cfg).unwrap();
        assert_eq!((e.entity.as_str(), e.seq), ("e", 12));
        cfg.max_bytes = value.len() - 1;
        let err = decode_record(Some(value), &headers, &cfg).unwrap_err();
        assert_eq!(
            err,
            Invalid::TooLarge {
                size: value.len(),
                max: value.len() - 1
            }
        );
    }
}

/// Data without numbers takes the fast path (the parsed map moved out);
/// strings stay as they are, other values become their JSON text, `null`
/// removes the field.
#[test]
fn data_without_numbers_is_split_from_the_parsed_map() {
    let e = dec(r#"{"id":"a","entity":"e","seq":1,"data":{"s":"paid","b":true,"o":{"k":"v"},"l":["x"],"gone":null}}"#).unwrap();
    let mut set = e.set.clone();
    set.sort();
    assert_eq!(
        set,
        vec![
            ("b".to_string(), "true".to_string()),
            ("l".to_string(), r#"["x"]"#.to_string()),
            ("o".to_string(), r#"{"k":"v"}"#.to_string()),
            ("s".to_string(), "paid".to_string()),
        ]
    );
    assert_eq!(e.unset, vec!["gone".to_string()]);
}

/// A number nested in an array or an object keeps its exact text too
/// (serde_json would print `1.1` and `100000000000000000000` as a double).
#[test]
fn nested_numbers_keep_their_exact_text() {
    // One record per container kind, so that a number found only inside an
    // array, or only inside an object, is each enough to keep the exact text.
    for (data, field, text) in [
        (r#"{"l":[1.10]}"#, "l", "[1.10]"),
        (
            r#"{"o":{"k":100000000000000000000}}"#,
            "o",
            r#"{"k":100000000000000000000}"#,
        ),
    ] {
        let e = dec(&format!(
            r#"{{"id":"a","entity":"e","seq":1,"data":{data}}}"#
        ))
        .unwrap();
        assert_eq!(e.set, vec![(field.to_string(), text.to_string())], "{data}");
    }
}
