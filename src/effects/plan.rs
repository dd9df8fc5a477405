//! One event's effects from its rule: pure, and complete before any write.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::{AmountSource, Effects, Mutation, Rule};
use crate::event::{Event, Invalid};

/// Plans `event`'s effects under `rule` (none: merge, as without effects).
///
/// | rule part    | from the event              | refused when (dead-letter reason)                |
/// |--------------|-----------------------------|--------------------------------------------------|
/// | counter      | amount at a pointer, or a constant | field missing (`effect_field_missing`), not a number (`amount_not_numeric`), more decimals than the scale (`amount_excess_decimals`), past 38 digits (`amount_overflow`) |
/// | ledger       | id, seq, type, data fields  | never                                            |
/// | set add/remove | member at a pointer       | field missing (`effect_field_missing`)           |
/// | custom       | the data fields             | never here (Redis runs it)                       |
pub fn plan(event: &Event, rule: Option<&Rule>) -> Result<Effects, Invalid> {
    let Some(rule) = rule else {
        return Ok(Effects::default());
    };
    let missing = |what: String, pointer: &str| Invalid::Effect {
        code: crate::event::Reason::EffectFieldMissing,
        message: format!("{what} reads data{pointer}, which this event does not have"),
    };
    let mut mutations = Vec::new();
    for c in &rule.counters {
        let amount = match &c.amount {
            AmountSource::Constant(a) => *a,
            AmountSource::Pointer(p) => {
                let text = data_value(event, p)
                    .ok_or_else(|| missing(format!("counter {}", c.field), p))?;
                super::Amount::parse(&text, c.scale).map_err(|e| Invalid::Effect {
                    code: e.code(),
                    message: format!("counter {} at data{p}: {e}", c.field),
                })?
            }
        };
        mutations.push(Mutation::Count {
            field: c.field.clone(),
            amount: if c.subtract { amount.negated() } else { amount },
        });
    }
    if rule.changes {
        mutations.extend(change_mutations(event, rule.ledger.as_ref())?);
    } else if let Some(l) = &rule.ledger {
        let mut entry = vec![
            ("id".to_string(), event.id.clone()),
            ("seq".to_string(), event.seq.to_string()),
        ];
        if let Some(kind) = &event.kind {
            entry.push(("type".to_string(), kind.clone()));
        }
        entry.extend(
            event
                .set
                .iter()
                .filter(|(k, _)| l.fields.as_ref().is_none_or(|f| f.contains(k)))
                .cloned(),
        );
        mutations.push(Mutation::Append {
            stream: l.stream.clone(),
            entry,
            max_len: l.max_len.unwrap_or(0),
            max_age_ms: l.max_age.map_or(0, |d| d.as_millis() as u64),
        });
    }
    for s in &rule.sets {
        let member = data_value(event, &s.member)
            .ok_or_else(|| missing(format!("set {}", s.set), &s.member))?;
        let set = s.set.clone();
        mutations.push(if s.remove {
            Mutation::SetRemove { set, member }
        } else {
            Mutation::SetAdd { set, member }
        });
    }
    for c in &rule.custom {
        mutations.push(Mutation::Custom {
            snippet: c.snippet,
            order: c.order,
        });
    }
    Ok(Effects {
        state: rule.state.clone(),
        fields: rule.fields.clone(),
        mutations,
    })
}

/// What an idem change record's `change` says its change did, as this
/// idem's mutations (a rule with `changes = true`): each counter set to its
/// value after, each set member added or removed, each ledger entry
/// appended with its fields (trimmed as the rule's `ledger` says, every
/// stream alike).
/// A record without `change` (a snapshot of an entity with none of these)
/// has none; one whose `change` is not of the documented shape is refused
/// (`change_malformed`), never half applied.
fn change_mutations(
    event: &Event,
    trim: Option<&super::LedgerSpec>,
) -> Result<Vec<Mutation>, Invalid> {
    use serde_json::Value;
    let malformed = |what: &str| Invalid::Effect {
        code: crate::event::Reason::ChangeMalformed,
        message: format!("change.{what} is not as docs/change-stream.md describes it"),
    };
    let object = |what: &str, v: Option<&Value>| match v {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(_) => Err(malformed(what)),
    };
    let mut mutations = Vec::new();
    let change = match &event.change {
        None => return Ok(mutations),
        Some(c @ Value::Object(_)) => c,
        Some(_) => return Err(malformed("")),
    };
    for (field, value) in object("counters", change.get("counters"))?.unwrap_or_default() {
        let value = match value {
            Value::String(s) => Some(s),
            Value::Null => None,
            _ => return Err(malformed(&format!("counters.{field}"))),
        };
        mutations.push(Mutation::SetCounter { field, value });
    }
    for (set, members) in object("sets", change.get("sets"))?.unwrap_or_default() {
        let Value::Object(members) = members else {
            return Err(malformed(&format!("sets.{set}")));
        };
        if !super::is_key_name(&set) {
            return Err(malformed(&format!("sets.{set}")));
        }
        for (member, added) in members {
            let set = set.clone();
            mutations.push(match added {
                Value::Bool(true) => Mutation::SetAdd { set, member },
                Value::Bool(false) => Mutation::SetRemove { set, member },
                _ => return Err(malformed(&format!("sets.{set}.{member}"))),
            });
        }
    }
    for (stream, fields) in object("ledger", change.get("ledger"))?.unwrap_or_default() {
        // An entry has fields (XADD refuses none), and a name of a stream.
        let (Value::Object(fields), true) = (fields, super::is_key_name(&stream)) else {
            return Err(malformed(&format!("ledger.{stream}")));
        };
        if fields.is_empty() {
            return Err(malformed(&format!("ledger.{stream}")));
        }
        let mut entry = Vec::with_capacity(fields.len());
        for (k, v) in fields {
            let Value::String(v) = v else {
                return Err(malformed(&format!("ledger.{stream}.{k}")));
            };
            entry.push((k, v));
        }
        mutations.push(Mutation::Append {
            stream,
            entry,
            max_len: trim.and_then(|l| l.max_len).unwrap_or(0),
            max_age_ms: trim
                .and_then(|l| l.max_age)
                .map_or(0, |d| d.as_millis() as u64),
        });
    }
    Ok(mutations)
}

/// The value at JSON pointer `pointer` inside the event's `data`, as text:
/// a string's content, or a number's exact JSON text (`12.50` stays
/// `12.50`), or an object's compact JSON. `None` where there is nothing.
///
/// | data                          | pointer       | value     |
/// |-------------------------------|---------------|-----------|
/// | `{"amount": 12.50}`           | `/amount`     | `12.50`   |
/// | `{"amount": "12.50"}`         | `/amount`     | `12.50`   |
/// | `{"m": {"v": 1.10}}`          | `/m/v`        | `1.10`    |
/// | `{"m": [3, "x"]}`             | `/m/1`        | `x`       |
/// | `{"a/b": 1}`                  | `/a~1b`       | `1`       |
/// | `{"amount": null}`            | `/amount`     | none      |
pub fn data_value(event: &Event, pointer: &str) -> Option<String> {
    let mut segments = pointer
        .strip_prefix('/')?
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"));
    let first = segments.next()?;
    let mut text = event.set.iter().find(|(k, _)| *k == first)?.1.clone();
    let mut nested = false;
    for segment in segments {
        text = if text.starts_with('{') {
            let map: BTreeMap<String, &RawValue> = serde_json::from_str(&text).ok()?;
            map.get(&segment)?.get().to_string()
        } else if text.starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(&text).ok()?;
            items.get(segment.parse::<usize>().ok()?)?.get().to_string()
        } else {
            return None;
        };
        nested = true;
    }
    if nested && text.starts_with('"') {
        return serde_json::from_str::<String>(&text).ok();
    }
    (!(nested && text == "null")).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::{Amount, CounterSpec, Order, SetSpec};
    use crate::event::Op;

    fn event(set: &[(&str, &str)]) -> Event {
        Event {
            ts: None,
            change: None,
            id: "i".into(),
            entity: "e".into(),
            seq: 7,
            op: Op::Upsert,
            kind: Some("payment.captured".into()),
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unset: vec![],
            fingerprint: 0,
        }
    }

    #[test]
    fn data_values_by_table() {
        let e = event(&[
            ("amount", "12.50"),
            ("m", r#"{"v":1.10,"s":"x y","n":null}"#),
            ("l", r#"[3,"x"]"#),
            ("a/b", "1"),
        ]);
        for (pointer, want) in [
            ("/amount", Some("12.50")),
            ("/m/v", Some("1.10")),
            ("/m/s", Some("x y")),
            ("/m/n", None),
            ("/m/zz", None),
            ("/l/1", Some("x")),
            ("/l/9", None),
            ("/a~1b", Some("1")),
            ("/amount/x", None),
            ("amount", None),
            ("/none", None),
        ] {
            assert_eq!(data_value(&e, pointer).as_deref(), want, "{pointer}");
        }
    }

    fn counter(pointer: &str, scale: u8, subtract: bool) -> CounterSpec {
        CounterSpec {
            field: "balance".into(),
            amount: AmountSource::Pointer(pointer.into()),
            scale,
            subtract,
        }
    }

    #[test]
    fn plans_every_effect_or_refuses_the_whole_event() {
        let rule = Rule {
            topic: "t".into(),
            counters: vec![
                counter("/amount", 2, true),
                CounterSpec {
                    field: "count".into(),
                    amount: AmountSource::Constant(Amount::parse("1", 0).unwrap()),
                    scale: 0,
                    subtract: false,
                },
            ],
            sets: vec![SetSpec {
                set: "tags".into(),
                member: "/tag".into(),
                remove: false,
            }],
            custom: vec![crate::effects::CustomSpec {
                snippet: 0,
                order: Order::Commutative,
            }],
            ..Rule::default()
        };
        let planned = plan(&event(&[("amount", "12.5"), ("tag", "vip")]), Some(&rule)).unwrap();
        assert_eq!(
            planned.mutations,
            vec![
                Mutation::Count {
                    field: "balance".into(),
                    amount: Amount {
                        units: -1250,
                        scale: 2
                    }
                },
                Mutation::Count {
                    field: "count".into(),
                    amount: Amount { units: 1, scale: 0 }
                },
                Mutation::SetAdd {
                    set: "tags".into(),
                    member: "vip".into()
                },
                Mutation::Custom {
                    snippet: 0,
                    order: Order::Commutative
                },
            ]
        );
        for (set, code) in [
            (vec![("tag", "vip")], "effect_field_missing"),
            (
                vec![("amount", "1.005"), ("tag", "x")],
                "amount_excess_decimals",
            ),
            (
                vec![("amount", "\"x\""), ("tag", "x")],
                "amount_not_numeric",
            ),
            (vec![("amount", "true"), ("tag", "x")], "amount_not_numeric"),
            (vec![("amount", "1")], "effect_field_missing"),
        ] {
            let got = plan(&event(&set), Some(&rule)).unwrap_err();
            assert_eq!(got.code(), code, "{set:?}: {got}");
        }
        assert_eq!(plan(&event(&[]), None).unwrap(), Effects::default());
    }

    #[test]
    fn a_change_record_plans_its_counters_sets_and_ledger_entries() {
        let rule = Rule {
            topic: "orders.changes".into(),
            state: crate::effects::StateEffect::Replace,
            changes: true,
            ledger: Some(crate::effects::LedgerSpec {
                stream: "ledger".into(),
                fields: None,
                max_len: Some(10),
                max_age: None,
            }),
            ..Rule::default()
        };
        let with_change = |change: &str| Event {
            change: Some(serde_json::from_str(change).unwrap()),
            ..event(&[("status", "open")])
        };
        let got = plan(
            &with_change(
                r#"{"kind":"applied","counters":{"balance":"12.50","old":null},
                "sets":{"tags":{"gift":true,"rush":false}},
                "ledger":{"ledger":{"id":"e1","amount":"12.50"},"audit":{"id":"e1"}}}"#,
            ),
            Some(&rule),
        )
        .unwrap();
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            got.mutations,
            vec![
                Mutation::SetCounter {
                    field: "balance".into(),
                    value: Some("12.50".into())
                },
                Mutation::SetCounter {
                    field: "old".into(),
                    value: None
                },
                Mutation::SetAdd {
                    set: "tags".into(),
                    member: "gift".into()
                },
                Mutation::SetRemove {
                    set: "tags".into(),
                    member: "rush".into()
                },
                Mutation::Append {
                    stream: "audit".into(),
                    entry: pairs(&[("id", "e1")]),
                    max_len: 10,
                    max_age_ms: 0
                },
                Mutation::Append {
                    stream: "ledger".into(),
                    entry: pairs(&[("amount", "12.50"), ("id", "e1")]),
                    max_len: 10,
                    max_age_ms: 0
                },
            ]
        );
        // A counter's value after is ordered (the last version wins); the
        // set members and entries commute as everywhere.
        assert!(!got.mutations[0].commutes() && got.mutations[2].commutes());
        assert!(plan(&event(&[]), Some(&rule)).unwrap().mutations.is_empty());
        let not_an_object = Event {
            change: Some(serde_json::json!("x")),
            ..event(&[])
        };
        assert_eq!(
            plan(&not_an_object, Some(&rule)).unwrap_err().code(),
            "change_malformed"
        );
        for change in [
            r#"{"counters":[1]}"#,
            r#"{"counters":{"balance":12}}"#,
            r#"{"sets":{"tags":["a"]}}"#,
            r#"{"sets":{"tags":{"a":1}}}"#,
            r#"{"sets":{"a:seq":{"x":true}}}"#,
            r#"{"ledger":{"ledger":{"amount":1}}}"#,
            r#"{"ledger":{"":{"a":"1"}}}"#,
            r#"{"ledger":{"ledger":{}}}"#,
        ] {
            let got = plan(&with_change(change), Some(&rule)).unwrap_err();
            assert_eq!(got.code(), "change_malformed", "{change}: {got}");
        }
    }
}
