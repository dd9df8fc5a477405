//! The decoder never panics and never accepts what the contract rejects:
//! at least 100,000 generated inputs per run (structured mutations of valid
//! events, random JSON, random bytes, CloudEvents in both modes).
//! Longer runs: IDEM_PROPTEST_CASES=10000000 cargo test --release --test decoder_props

use idem::config::Config;
use idem::event::decode_record;
use idem::event::EventFormat;
use idem::tools::sample::Rng;

fn cases() -> usize {
    std::env::var("IDEM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
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

fn random_json(rng: &mut Rng, depth: u32) -> String {
    match rng.below(if depth > 3 { 5 } else { 8 }) {
        0 => "null".into(),
        1 => format!("{}", rng.next_u64() as i64),
        2 => format!("\"{}\"", "é".repeat(rng.below(4) as usize)),
        3 => format!("{}", rng.next_u64()),
        4 => "1.25".into(),
        5 => format!("[{}]", random_json(rng, depth + 1)),
        _ => format!("{{\"k{}\":{}}}", rng.below(3), random_json(rng, depth + 1)),
    }
}

fn input(rng: &mut Rng) -> Vec<u8> {
    let valid = format!(
        r#"{{"id":"e{}","entity":"ent{}","seq":{},"type":"upsert","ts":"2026-11-26T12:00:00Z","data":{{"a":1,"b":"x"}}}}"#,
        rng.below(1000),
        rng.below(10),
        rng.below(1 << 20)
    );
    match rng.below(6) {
        0 => valid.into_bytes(),
        1 => {
            // Byte flips, truncation and insertion on a valid event.
            let mut b = valid.into_bytes();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !b.is_empty() => {
                        let i = rng.below(b.len() as u64) as usize;
                        b[i] = rng.next_u64() as u8;
                    }
                    1 => b.truncate(rng.below(b.len() as u64 + 1) as usize),
                    _ => {
                        let i = rng.below(b.len() as u64 + 1) as usize;
                        b.splice(
                            i..i,
                            PIECES[rng.below(PIECES.len() as u64) as usize].bytes(),
                        );
                    }
                }
            }
            b
        }
        2 => {
            // Valid shape, random types in the fields.
            format!(
                r#"{{"id":{},"entity":{},"seq":{},"type":{},"data":{},"ts":{}}}"#,
                random_json(rng, 0),
                random_json(rng, 0),
                random_json(rng, 0),
                random_json(rng, 0),
                random_json(rng, 0),
                random_json(rng, 0)
            )
            .into_bytes()
        }
        3 => (0..rng.below(64))
            .map(|_| PIECES[rng.below(PIECES.len() as u64) as usize])
            .collect::<String>()
            .into_bytes(),
        4 => (0..rng.below(128)).map(|_| rng.next_u64() as u8).collect(),
        _ => random_json(rng, 0).into_bytes(),
    }
}

#[test]
fn decoder_never_panics_and_accepted_events_honour_the_contract() {
    let mut config = Config::defaults().event;
    config.max_bytes = 4096;
    let mut rng = Rng::new(0xDEC0DE);
    let n = cases();
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for i in 0..n {
        let bytes = input(&mut rng);
        config.format = [
            EventFormat::Auto,
            EventFormat::Idem,
            EventFormat::CloudEvents,
        ][i % 3];
        let ce_headers: Vec<(&str, &[u8])> = match rng.below(4) {
            0 => vec![("content-type", b"application/cloudevents+json")],
            1 => vec![
                ("ce_specversion", b"1.0"),
                ("ce_id", b"x"),
                ("ce_source", b"/s"),
                ("ce_type", b"t"),
                ("ce_subject", b"e"),
                ("ce_sequence", if rng.below(2) == 0 { b"12" } else { b"-1" }),
            ],
            _ => vec![],
        };
        let value = if rng.below(50) == 0 {
            None
        } else {
            Some(bytes.as_slice())
        };
        match decode_record(value, &ce_headers, &config) {
            Ok(e) => {
                accepted += 1;
                assert!(
                    !e.id.is_empty() && !e.entity.is_empty(),
                    "accepted an event without identity: {e:?}"
                );
                assert!(value.is_some_and(|v| v.len() <= 4096) || ce_headers.len() > 1);
            }
            Err(invalid) => {
                rejected += 1;
                assert!(idem::dlq::REASONS.contains(&invalid.code()));
            }
        }
    }
    assert_eq!(accepted + rejected, n);
    assert!(
        accepted > n / 20 && rejected > n / 20,
        "both paths exercised: {accepted} accepted, {rejected} rejected"
    );
}

/// A random JSON number text: a double in one of Rust's forms, or up to 40
/// digits with an optional fraction and exponent (magnitudes stay within a
/// double's range: beyond ±1.8e308 the record is not_json, as documented).
fn number_text(rng: &mut Rng) -> String {
    let double = loop {
        let x = f64::from_bits(rng.next_u64());
        if x.is_finite() {
            break x;
        }
    };
    let digits = |rng: &mut Rng, n: u64| -> String {
        (0..n)
            .map(|_| char::from(b'0' + rng.below(10) as u8))
            .collect()
    };
    match rng.below(5) {
        0 => format!("{double:e}"),
        1 => format!("{double:.17e}"),
        2 => format!("{}", double.abs() % 1e6),
        _ => {
            let sign = if rng.below(2) == 0 { "" } else { "-" };
            let int = match rng.below(40) {
                0 => "0".to_string(),
                n => format!("{}{}", 1 + rng.below(9), digits(rng, n)),
            };
            let frac = match rng.below(3) {
                0 => {
                    let n = 1 + rng.below(30);
                    format!(".{}", digits(rng, n))
                }
                _ => String::new(),
            };
            let exp = match rng.below(4) {
                0 => format!(
                    "{}{}",
                    ["e", "E", "e+", "e-"][rng.below(4) as usize],
                    1 + rng.below(250)
                ),
                _ => String::new(),
            };
            format!("{sign}{int}{frac}{exp}")
        }
    }
}

/// Property: any number in `data` is stored as its exact text, top level or
/// nested, and the fingerprint is the one computed over serde_json's value
/// (as idem always did, so remembered events stay duplicates).
#[test]
fn numbers_in_data_keep_their_exact_text() {
    let config = Config::defaults().event;
    let mut rng = Rng::new(0x0DD5);
    for _ in 0..cases() / 10 {
        let n = number_text(&mut rng);
        let text = format!(r#"{{"id":"a","entity":"e","seq":1,"data":{{"x":{n},"l":[{n}]}}}}"#);
        let e = decode_record(Some(text.as_bytes()), &[], &config)
            .unwrap_or_else(|err| panic!("{text}: {err}"));
        assert_eq!(
            e.set,
            vec![
                ("l".to_string(), format!("[{n}]")),
                ("x".to_string(), n.clone())
            ],
            "{text}"
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e.fingerprint, idem::event::fingerprint(&value), "{text}");
    }
}
