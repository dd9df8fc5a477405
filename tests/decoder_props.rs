//! The decoder never panics and never accepts what the contract rejects:
//! 100,000 generated inputs per run (structured mutations of valid events,
//! random JSON, random bytes, CloudEvents in both modes), generated and
//! shrunk by proptest: a failure is reported as a minimal input.
//! Longer runs: IDEM_PROPTEST_CASES=10000000 cargo test --release --test decoder_props

use idem::config::Config;
use idem::event::decode_record;
use idem::event::{EventConfig, EventFormat};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};

fn cases() -> u32 {
    std::env::var("IDEM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// A runner with a fixed seed, so a failure in CI happens again on any
/// machine; proptest prints the shrunk input. No persistence file: tests
/// run from a clean tree.
fn runner(cases: u32) -> TestRunner {
    let config = RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

const PIECES: [&str; 24] = [
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"id\"",
    "\"entity\"",
    "\"seq\"",
    "\"data\"",
    "\"type\"",
    "\"ts\"",
    "\"delete\"",
    "null",
    "true",
    "-1",
    "18446744073709551616",
    "1e400",
    "\"\\u0000\"",
    "\"x\"",
    "0",
    "\"2026-01-01T00:00:00Z\"",
    "{\"a\":{\"b\":[1,{}]}}",
    "\"\\ud800\"",
];

fn piece() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(&PIECES[..])
}

/// Random JSON text, nested up to four levels.
fn json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (0usize..4).prop_map(|n| format!("\"{}\"", "é".repeat(n))),
        Just("1.25".to_string()),
    ];
    leaf.prop_recursive(4, 32, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|v| format!("[{v}]")),
            (0u8..3, inner).prop_map(|(k, v)| format!("{{\"k{k}\":{v}}}")),
        ]
    })
}

fn valid_event() -> impl Strategy<Value = String> {
    (0u32..1000, 0u32..10, 0u32..(1 << 20)).prop_map(|(id, entity, seq)| {
        format!(
            r#"{{"id":"e{id}","entity":"ent{entity}","seq":{seq},"type":"upsert","ts":"2026-11-26T12:00:00Z","data":{{"a":1,"b":"x"}}}}"#
        )
    })
}

/// One edit of a valid event: a flipped byte, a truncation or an inserted piece.
#[derive(Debug, Clone)]
enum Edit {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, &'static str),
}

fn edit(bytes: &mut Vec<u8>, e: &Edit) {
    match e {
        Edit::Flip(i, b) if !bytes.is_empty() => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Edit::Flip(..) => {}
        Edit::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
        Edit::Insert(i, p) => {
            let i = i.index(bytes.len() + 1);
            bytes.splice(i..i, p.bytes());
        }
    }
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec(
        prop_oneof![
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
            any::<prop::sample::Index>().prop_map(Edit::Truncate),
            (any::<prop::sample::Index>(), piece()).prop_map(|(i, p)| Edit::Insert(i, p)),
        ],
        1..=4,
    );
    prop_oneof![
        valid_event().prop_map(String::into_bytes),
        (valid_event(), edits).prop_map(|(valid, edits)| {
            let mut bytes = valid.into_bytes();
            edits.iter().for_each(|e| edit(&mut bytes, e));
            bytes
        }),
        // Valid shape, random types in the fields.
        prop::collection::vec(json(), 6).prop_map(|f| {
            format!(
                r#"{{"id":{},"entity":{},"seq":{},"type":{},"data":{},"ts":{}}}"#,
                f[0], f[1], f[2], f[3], f[4], f[5]
            )
            .into_bytes()
        }),
        prop::collection::vec(piece(), 0..64).prop_map(|p| p.concat().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..128),
        json().prop_map(String::into_bytes),
    ]
}

type Headers = Vec<(&'static str, &'static [u8])>;

fn headers() -> impl Strategy<Value = Headers> {
    let binary = |sequence: &'static [u8]| -> Headers {
        vec![
            ("ce_specversion", b"1.0"),
            ("ce_id", b"x"),
            ("ce_source", b"/s"),
            ("ce_type", b"t"),
            ("ce_subject", b"e"),
            ("ce_sequence", sequence),
        ]
    };
    prop_oneof![
        2 => Just(vec![]),
        1 => Just(vec![("content-type", &b"application/cloudevents+json"[..])]),
        1 => prop_oneof![Just(binary(b"12")), Just(binary(b"-1"))],
    ]
}

fn format() -> impl Strategy<Value = EventFormat> {
    prop_oneof![
        Just(EventFormat::Auto),
        Just(EventFormat::Idem),
        Just(EventFormat::CloudEvents),
    ]
}

#[test]
fn decoder_never_panics_and_accepted_events_honour_the_contract() {
    let base = EventConfig {
        max_bytes: 4096,
        ..Config::defaults().event
    };
    let n = cases();
    let (accepted, rejected) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    // One record in fifty has no value at all (a tombstone).
    let record = (input(), headers(), format(), 0u8..50);
    runner(n)
        .run(&record, |(bytes, headers, format, tombstone)| {
            let config = EventConfig {
                format,
                ..base.clone()
            };
            let value = (tombstone != 0).then_some(bytes.as_slice());
            match decode_record(value, &headers, &config) {
                Ok(e) => {
                    accepted.set(accepted.get() + 1);
                    prop_assert!(
                        !e.id.is_empty() && !e.entity.is_empty(),
                        "accepted an event without identity: {e:?}"
                    );
                    prop_assert!(value.is_some_and(|v| v.len() <= 4096) || headers.len() > 1);
                }
                Err(invalid) => {
                    // The reason is typed; its message must say something.
                    rejected.set(rejected.get() + 1);
                    prop_assert!(!invalid.to_string().is_empty(), "{:?}", invalid.code());
                }
            }
            Ok(())
        })
        .unwrap();
    let (accepted, rejected) = (accepted.get(), rejected.get());
    assert!(accepted + rejected >= n);
    assert!(
        accepted > n / 20 && rejected > n / 20,
        "both paths exercised: {accepted} accepted, {rejected} rejected"
    );
}

/// A JSON number text: a double in one of Rust's forms, or up to 40 digits
/// with an optional fraction and exponent (magnitudes stay within a double's
/// range: beyond ±1.8e308 the record is not_json, as documented).
fn number_text() -> impl Strategy<Value = String> {
    let double = any::<f64>().prop_filter("finite", |x| x.is_finite());
    let decimal = (
        prop_oneof![Just(""), Just("-")],
        prop_oneof![Just("0".to_string()), "[1-9][0-9]{1,39}"],
        prop_oneof![2 => Just(String::new()), 1 => "\\.[0-9]{1,30}"],
        prop_oneof![
            3 => Just(String::new()),
            1 => ("e|E|e\\+|e-", 1u32..=250).prop_map(|(e, n)| format!("{e}{n}")),
        ],
    )
        .prop_map(|(sign, int, frac, exp)| format!("{sign}{int}{frac}{exp}"));
    prop_oneof![
        1 => double.clone().prop_map(|x| format!("{x:e}")),
        1 => double.clone().prop_map(|x| format!("{x:.17e}")),
        1 => double.prop_map(|x| format!("{}", x.abs() % 1e6)),
        2 => decimal,
    ]
}

/// Property: any number in `data` is stored as its exact text, top level or
/// nested, and the fingerprint is the one computed over serde_json's value
/// (as idem always did, so remembered events stay duplicates).
#[test]
fn numbers_in_data_keep_their_exact_text() {
    let config = Config::defaults().event;
    runner(cases() / 10)
        .run(&number_text(), |n| {
            let text = format!(r#"{{"id":"a","entity":"e","seq":1,"data":{{"x":{n},"l":[{n}]}}}}"#);
            let e = decode_record(Some(text.as_bytes()), &[], &config)
                .map_err(|err| TestCaseError::fail(format!("{text}: {err}")))?;
            prop_assert_eq!(
                &e.set,
                &vec![
                    ("l".to_string(), format!("[{n}]")),
                    ("x".to_string(), n.clone())
                ],
                "{}",
                text
            );
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(e.fingerprint, idem::event::fingerprint(&value), "{}", text);
            Ok(())
        })
        .unwrap();
}
