//! The `[[effects]]` tables: what they say, and their validation into an
//! [`EffectsConfig`] (docs/effects.md). Keys in errors are like
//! `effects[1].counters[0].scale`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{parse_duration, ConfigError};
use crate::effects::decimal::MAX_SCALE;
use crate::effects::{
    Amount, AmountSource, CounterSpec, CustomSpec, EffectsConfig, LedgerSpec, Order, Rule, SetSpec,
    Snippet, StateEffect, StateOrder,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    topic: String,
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    fields: Option<Vec<String>>,
    #[serde(default)]
    counters: Vec<RawCounter>,
    #[serde(default)]
    ledger: Option<RawLedger>,
    #[serde(default)]
    set_add: Vec<RawSet>,
    #[serde(default)]
    set_remove: Vec<RawSet>,
    #[serde(default)]
    custom: Vec<RawCustom>,
    #[serde(default)]
    changes: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCounter {
    field: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    scale: i64,
    #[serde(default)]
    subtract: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    fields: Option<Vec<String>>,
    #[serde(default)]
    max_len: i64,
    #[serde(default)]
    max_age: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    set: String,
    from: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustom {
    file: String,
    order: String,
    writes: Vec<String>,
}

fn invalid(key: String, value: impl std::fmt::Display, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// Validates every rule, then the rules together (see [`check_convergence`])
/// and with the state's order mode: an ordered custom effect reads the
/// state, which under `per_field` is not one point in seq order, so it is
/// refused there.
pub(super) fn validate(
    raw: Vec<RawRule>,
    state_order: StateOrder,
    dense_seq_topics: &[String],
) -> Result<EffectsConfig, ConfigError> {
    let mut out = EffectsConfig {
        state_order,
        ..EffectsConfig::default()
    };
    let mut declared: BTreeSet<(String, String)> = BTreeSet::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("effects[{i}].{k}");
        if r.topic.is_empty() {
            return Err(invalid(key("topic"), "", "the name of a consumed topic"));
        }
        let types = if r.types.is_empty() {
            vec![String::new()]
        } else {
            r.types.clone()
        };
        for t in types {
            if !declared.insert((r.topic.clone(), t.clone())) {
                let what = if t.is_empty() { "every type" } else { &t };
                return Err(invalid(
                    key("types"),
                    what,
                    "one rule per topic and event type (this one has two)",
                ));
            }
        }
        let rule = validate_rule(i, r, &mut out.snippets)?;
        out.rules.push(rule);
    }
    check_convergence(&out)?;
    if let Some(i) = out
        .rules
        .iter()
        .position(|r| r.changes && !dense_seq_topics.contains(&r.topic))
    {
        return Err(invalid(
            format!("effects[{i}].changes"),
            "true",
            &format!("a topic in dedupe.dense_seq_topics (add \"{}\"): a change's seq is its dense version, so a copy read again after the dedupe window is recognised by it instead of counted again", out.rules[i].topic),
        ));
    }
    if state_order == StateOrder::PerField {
        if let Some(i) = out.rules.iter().position(|r| r.changes) {
            return Err(invalid(
                format!("effects[{i}].changes"),
                "true",
                "false under state.order = \"per_field\" (a change record's versions are one order per entity: set state.order = \"per_entity\")",
            ));
        }
        for (i, r) in out.rules.iter().enumerate() {
            if let Some(c) = r.custom.iter().position(|c| c.order == Order::Ordered) {
                return Err(invalid(
                    format!("effects[{i}].custom[{c}].order"),
                    "ordered",
                    "\"commutative\" under state.order = \"per_field\" (an ordered custom effect reads the state as of its seq, which per-field order does not keep; or set state.order = \"per_entity\")",
                ));
            }
        }
    }
    Ok(out)
}

fn validate_rule(i: usize, r: RawRule, snippets: &mut Vec<Snippet>) -> Result<Rule, ConfigError> {
    let key = |k: &str| format!("effects[{i}].{k}");
    if r.changes {
        check_change_rule(&key, &r)?;
    }
    let default_state = if r.changes { "replace" } else { "merge" };
    let state = match r.state.as_deref().unwrap_or(default_state) {
        "merge" => StateEffect::Merge,
        "replace" => StateEffect::Replace,
        "keep" => StateEffect::Keep,
        other => {
            return Err(invalid(
                key("state"),
                other,
                "\"merge\", \"replace\" or \"keep\"",
            ))
        }
    };
    let mut counters = Vec::new();
    for (c, raw) in r.counters.into_iter().enumerate() {
        counters.push(counter(&key(&format!("counters[{c}]")), raw)?);
    }
    let ledger = r.ledger.map(|l| ledger(&key("ledger"), l)).transpose()?;
    let mut sets = Vec::new();
    for (list, remove) in [(r.set_add, false), (r.set_remove, true)] {
        let name = if remove { "set_remove" } else { "set_add" };
        for (s, raw) in list.into_iter().enumerate() {
            let k = key(&format!("{name}[{s}]"));
            if !crate::effects::is_key_name(&raw.set) {
                return Err(invalid(
                    format!("{k}.set"),
                    &raw.set,
                    "a set name without `:` (`<set>:seq` is the set's own seq hash)",
                ));
            }
            sets.push(SetSpec {
                set: raw.set,
                member: pointer(&format!("{k}.from"), raw.from)?,
                remove,
            });
        }
    }
    let custom = customs(&key("custom"), r.custom, snippets)?;
    Ok(Rule {
        topic: r.topic,
        types: r.types,
        state,
        fields: r.fields,
        counters,
        ledger,
        sets,
        custom,
        changes: r.changes,
    })
}

/// A rule for idem change records (`changes = true`) takes its effects from
/// each record's `change`, and its state from `data`, the whole state
/// after: so it declares none of its own, and replaces the state. Its
/// `ledger` table only says how to trim the stream it names.
fn check_change_rule(key: &dyn Fn(&str) -> String, r: &RawRule) -> Result<(), ConfigError> {
    let why = "absent in a rule with `changes = true` (each change record brings its counters, sets and ledger entries)";
    if r.types.is_empty() {
        return Err(invalid(
            key("types"),
            "[]",
            "the change types, like [\"idem.change\", \"delete\"] (a reference, idem.change-reference, carries no state: give it its own rule with state = \"keep\")",
        ));
    }
    if r.ledger.is_none() {
        return Err(invalid(
            key("ledger"),
            "absent",
            "ledger = { max_len = N } and/or max_age: how the copy trims every ledger stream the changes append to (a ledger is always trimmed)",
        ));
    }
    let declared = [
        (
            "ledger.stream",
            r.ledger.as_ref().is_some_and(|l| l.stream.is_some()),
        ),
        ("counters", !r.counters.is_empty()),
        ("set_add", !r.set_add.is_empty()),
        ("set_remove", !r.set_remove.is_empty()),
        ("custom", !r.custom.is_empty()),
        ("fields", r.fields.is_some()),
        (
            "ledger.fields",
            r.ledger.as_ref().is_some_and(|l| l.fields.is_some()),
        ),
    ];
    if let Some((name, _)) = declared.iter().find(|(_, given)| *given) {
        return Err(invalid(key(name), "given", why));
    }
    match r.state.as_deref() {
        None | Some("replace") => Ok(()),
        Some(other) => Err(invalid(
            key("state"),
            other,
            "\"replace\" (or absent) with `changes = true`: a change's data is the entity's whole state after it",
        )),
    }
}

fn customs(
    key: &str,
    raw: Vec<RawCustom>,
    snippets: &mut Vec<Snippet>,
) -> Result<Vec<CustomSpec>, ConfigError> {
    let mut custom = Vec::new();
    for (c, raw) in raw.into_iter().enumerate() {
        let k = format!("{key}[{c}]");
        let order = match raw.order.as_str() {
            "ordered" => Order::Ordered,
            "commutative" => Order::Commutative,
            other => {
                return Err(invalid(
                    format!("{k}.order"),
                    other,
                    "\"ordered\" (applies only when newer) or \"commutative\" (once per event, any order)",
                ))
            }
        };
        if raw.writes.is_empty() || raw.writes.iter().any(String::is_empty) {
            return Err(invalid(
                format!("{k}.writes"),
                "[]",
                "the field names the snippet may return",
            ));
        }
        let source = std::fs::read_to_string(&raw.file).map_err(|e| {
            invalid(
                format!("{k}.file"),
                &raw.file,
                &format!("a readable Lua file ({e})"),
            )
        })?;
        snippets.push(Snippet {
            file: raw.file,
            source,
            writes: raw.writes,
        });
        custom.push(CustomSpec {
            snippet: snippets.len() - 1,
            order,
        });
    }
    Ok(custom)
}

fn pointer(key: &str, text: String) -> Result<String, ConfigError> {
    if text.starts_with('/') && text.len() > 1 {
        Ok(text)
    } else {
        Err(invalid(
            key.to_string(),
            text,
            "a JSON pointer into the event's data, like \"/amount\"",
        ))
    }
}

fn counter(key: &str, raw: RawCounter) -> Result<CounterSpec, ConfigError> {
    if raw.field.is_empty() {
        return Err(invalid(format!("{key}.field"), "", "a field name"));
    }
    let scale = u8::try_from(raw.scale)
        .ok()
        .filter(|s| *s <= MAX_SCALE)
        .ok_or_else(|| {
            invalid(
                format!("{key}.scale"),
                raw.scale,
                "the number of decimals kept, 0 to 37 (e.g. 2 for cents)",
            )
        })?;
    let amount =
        match (raw.from, raw.by) {
            (Some(from), None) => AmountSource::Pointer(pointer(&format!("{key}.from"), from)?),
            (None, Some(by)) => AmountSource::Constant(Amount::parse(&by, scale).map_err(|e| {
                invalid(
                    format!("{key}.by"),
                    &by,
                    &format!("a decimal amount at the counter's scale ({e})"),
                )
            })?),
            _ => return Err(invalid(
                key.to_string(),
                "from and by",
                "exactly one of `from` (a JSON pointer into data) and `by` (a constant like \"1\")",
            )),
        };
    Ok(CounterSpec {
        field: raw.field,
        amount,
        scale,
        subtract: raw.subtract,
    })
}

fn ledger(key: &str, raw: RawLedger) -> Result<LedgerSpec, ConfigError> {
    let stream = raw.stream.unwrap_or_else(|| "ledger".to_string());
    if !crate::effects::is_key_name(&stream) {
        return Err(invalid(
            format!("{key}.stream"),
            &stream,
            "a stream name without `:`",
        ));
    }
    let max_len = match raw.max_len {
        0 => None,
        n if n > 0 => Some(n as u64),
        n => {
            return Err(invalid(
                format!("{key}.max_len"),
                n,
                "a positive number of entries",
            ))
        }
    };
    let max_age = match raw.max_age.as_str() {
        "" => None,
        text => Some(
            parse_duration(text)
                // Past ten years, `now - max_age` could go below the epoch.
                .filter(|d| !d.is_zero() && d.as_secs() <= 3650 * 86_400)
                .ok_or_else(|| {
                    invalid(
                        format!("{key}.max_age"),
                        text,
                        "a duration like \"30d\", at most 3650d",
                    )
                })?,
        ),
    };
    if max_len.is_none() && max_age.is_none() {
        return Err(invalid(
            key.to_string(),
            "no max_len, no max_age",
            "max_len (entries) or max_age (like \"30d\"), or both: a ledger is trimmed",
        ));
    }
    Ok(LedgerSpec {
        stream,
        fields: raw.fields,
        max_len,
        max_age,
    })
}

/// Refuses rules that cannot converge or are ambiguous. Per topic
/// (entities are shared across rules of a topic, and across topics that
/// write one entity, so field names are checked across all rules):
///
/// | combination                                                   | why refused |
/// |---------------------------------------------------------------|-------------|
/// | a counter field also in an ordered write (`fields`, an ordered custom effect's `writes`) | one name, an ordered and a commutative writer |
/// | a counter field also in a commutative custom effect's `writes` | idem cannot know the snippet commutes with addition |
/// | one counter field with two scales                             | one stored form per counter |
/// | one rule counting a field twice, or adding and removing in one set | two decisions on one value in one step |
pub(super) fn check_convergence(cfg: &EffectsConfig) -> Result<(), ConfigError> {
    let mut scales: BTreeMap<&str, u8> = BTreeMap::new();
    let mut ordered: BTreeSet<&str> = BTreeSet::new();
    let mut custom_commutative: BTreeSet<&str> = BTreeSet::new();
    for (i, r) in cfg.rules.iter().enumerate() {
        ordered.extend(r.fields.iter().flatten().map(String::as_str));
        let mut written = BTreeSet::new();
        for c in &r.custom {
            if let Some(f) = cfg.snippets[c.snippet]
                .writes
                .iter()
                .find(|w| !written.insert(w.as_str()))
            {
                return Err(invalid(format!("effects[{i}].custom"), f, "each field written by one custom effect per rule (two would overwrite each other)"));
            }
        }
        for c in &r.custom {
            let writes = cfg.snippets[c.snippet].writes.iter().map(String::as_str);
            match c.order {
                Order::Ordered => ordered.extend(writes),
                Order::Commutative => custom_commutative.extend(writes),
            }
        }
    }
    for (i, r) in cfg.rules.iter().enumerate() {
        let mut in_rule = BTreeSet::new();
        for (c, counter) in r.counters.iter().enumerate() {
            let key = format!("effects[{i}].counters[{c}].field");
            let field = counter.field.as_str();
            if ordered.contains(field) {
                return Err(invalid(key, field, "a field no ordered effect writes (it is in some rule's `fields` or an ordered custom effect's `writes`; an ordered and a commutative writer of one field cannot converge)"));
            }
            if custom_commutative.contains(field) {
                return Err(invalid(key, field, "a field no custom effect writes (a counter and a snippet on one field converge only if the snippet commutes with addition, which idem cannot check)"));
            }
            if *scales.entry(field).or_insert(counter.scale) != counter.scale {
                return Err(invalid(
                    key,
                    field,
                    "one scale per counter field across all rules (its stored form)",
                ));
            }
            if !in_rule.insert(field) {
                return Err(invalid(key, field, "each counter field once per rule"));
            }
        }
        let adds: BTreeSet<&str> = r
            .sets
            .iter()
            .filter(|s| !s.remove)
            .map(|s| s.set.as_str())
            .collect();
        if let Some(s) = r
            .sets
            .iter()
            .find(|s| s.remove && adds.contains(s.set.as_str()))
        {
            return Err(invalid(
                format!("effects[{i}].set_remove"),
                &s.set,
                "a set this rule does not also add to",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use crate::config::{Config, ConfigError};
    use crate::effects::{AmountSource, Order, StateEffect, StateOrder};

    /// Loads `[[effects]]` text (with `SNIPPET` standing for a readable Lua file).
    pub(in crate::config) fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "idem-effects-{}-{:x}",
            std::process::id(),
            crate::event::id_hash(text)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let snippet = dir.join("s.lua");
        std::fs::write(&snippet, "return {}").unwrap();
        let path = dir.join("c.toml");
        let text = text.replace("SNIPPET", &snippet.display().to_string());
        std::fs::write(&path, text).unwrap();
        let out = Config::load(Some(&path), &HashMap::new());
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    #[test]
    fn a_full_rule_loads() {
        let c = load(
            r#"
[[effects]]
topic = "payments"
types = ["payment.captured"]
fields = ["status"]
counters = [{ field = "balance", from = "/amount", scale = 2 }, { field = "n", by = "1" }]
ledger = { fields = ["amount"], max_len = 1000, max_age = "30d" }
set_add = [{ set = "tags", from = "/tag" }]
custom = [{ file = "SNIPPET", order = "commutative", writes = ["points"] }]

[[effects]]
topic = "payments"
state = "keep"
"#,
        )
        .unwrap();
        let e = &c.effects;
        let rule = e.rule_for("payments", Some("payment.captured")).unwrap();
        assert_eq!(
            rule.counters[0].amount,
            AmountSource::Pointer("/amount".into())
        );
        assert_eq!(rule.counters[1].scale, 0);
        assert_eq!(rule.ledger.as_ref().unwrap().stream, "ledger");
        assert_eq!(rule.custom[0].order, Order::Commutative);
        assert_eq!(e.snippets[0].source, "return {}");
        let other = e.rule_for("payments", Some("payment.refunded")).unwrap();
        assert_eq!(other.state, StateEffect::Keep);
        assert!(e.rule_for("orders", Some("payment.captured")).is_none());
        assert!(load("").unwrap().effects.rules.is_empty());
        let chained_config = load(
            "[dedupe]\ndense_seq_topics = [\"o.changes\"]\n[[effects]]\ntopic = \"o.changes\"\ntypes = [\"idem.change\"]\nchanges = true\nledger = { max_len = 9 }\n",
        )
        .unwrap();
        let chained = &chained_config.effects;
        let rule = chained.rule_for("o.changes", Some("idem.change")).unwrap();
        assert!(rule.changes);
        assert_eq!(rule.state, StateEffect::Replace);
        assert_eq!(rule.ledger.as_ref().unwrap().max_len, Some(9));
        assert!(chained_config.policy("o.changes").has_commutative());
        assert!(!chained_config.policy("orders").has_commutative());
    }

    /// Each refusal names its key.
    #[test]
    fn refusals_name_their_key() {
        let rule = |body: &str| format!("[[effects]]\ntopic = \"t\"\n{body}\n");
        // A valid rule for change records, plus `body`.
        let change_rule = |body: &str| {
            format!("[dedupe]\ndense_seq_topics = [\"t\"]\n[[effects]]\ntopic = \"t\"\ntypes = [\"idem.change\"]\nchanges = true\nledger = {{ max_len = 5 }}\n{body}\n")
        };
        let table = [
            (rule("state = \"upsert\""), "effects[0].state"),
            (rule("counters = [{ field = \"b\" }]"), "effects[0].counters[0]"),
            (rule("counters = [{ field = \"b\", from = \"/a\", by = \"1\" }]"), "effects[0].counters[0]"),
            (rule("counters = [{ field = \"b\", from = \"a\" }]"), "effects[0].counters[0].from"),
            (rule("counters = [{ field = \"b\", by = \"0.5\" }]"), "effects[0].counters[0].by"),
            (rule("counters = [{ field = \"b\", from = \"/a\", scale = 38 }]"), "effects[0].counters[0].scale"),
            (rule("ledger = { stream = \"l\" }"), "effects[0].ledger"),
            (rule("ledger = { max_len = 5, max_age = \"soon\" }"), "effects[0].ledger.max_age"),
            (rule("set_add = [{ set = \"s\", from = \"\" }]"), "effects[0].set_add[0].from"),
            (rule("set_add = [{ set = \"s:seq\", from = \"/m\" }]"), "effects[0].set_add[0].set"),
            (rule("ledger = { max_len = 5, max_age = \"36500d\" }"), "effects[0].ledger.max_age"),
            (rule("custom = [{ file = \"SNIPPET\", order = \"ordered\", writes = [\"x\"] }, { file = \"SNIPPET\", order = \"ordered\", writes = [\"x\"] }]"), "effects[0].custom"),
            (rule("custom = [{ file = \"/nonexistent.lua\", order = \"ordered\", writes = [\"x\"] }]"), "effects[0].custom[0].file"),
            (rule("custom = [{ file = \"SNIPPET\", order = \"sometimes\", writes = [\"x\"] }]"), "effects[0].custom[0].order"),
            (rule("custom = [{ file = \"SNIPPET\", order = \"ordered\", writes = [] }]"), "effects[0].custom[0].writes"),
            (format!("{}{}", rule(""), rule("")), "effects[1].types"),
            // cannot converge
            (rule("fields = [\"balance\"]\ncounters = [{ field = \"balance\", from = \"/a\" }]"), "effects[0].counters[0].field"),
            (rule("counters = [{ field = \"p\", from = \"/a\" }]\ncustom = [{ file = \"SNIPPET\", order = \"commutative\", writes = [\"p\"] }]"), "effects[0].counters[0].field"),
            (format!("{}types = [\"a\"]\n{}", rule("counters = [{ field = \"b\", from = \"/a\", scale = 2 }]"), rule("types = [\"b\"]\ncounters = [{ field = \"b\", from = \"/a\" }]")), "effects[1].counters[0].field"),
            (rule("counters = [{ field = \"b\", by = \"1\" }, { field = \"b\", by = \"2\" }]"), "effects[0].counters[1].field"),
            (rule("set_add = [{ set = \"s\", from = \"/m\" }]\nset_remove = [{ set = \"s\", from = \"/m\" }]"), "effects[0].set_remove"),
            // a rule for change records takes its effects from each record
            (change_rule("state = \"merge\""), "effects[0].state"),
            (change_rule("counters = [{ field = \"b\", by = \"1\" }]"), "effects[0].counters"),
            (change_rule("set_add = [{ set = \"s\", from = \"/m\" }]"), "effects[0].set_add"),
            (change_rule("fields = [\"a\"]"), "effects[0].fields"),
            (rule("changes = true\ntypes = [\"idem.change\"]\nledger = { fields = [\"a\"], max_len = 5 }"), "effects[0].ledger.fields"),
            (rule("changes = true\ntypes = [\"idem.change\"]\nledger = { stream = \"l\", max_len = 5 }"), "effects[0].ledger.stream"),
            (rule("changes = true\ntypes = [\"idem.change\"]\nledger = { max_age = \"\" }"), "effects[0].ledger"),
            (rule("changes = true\ntypes = [\"idem.change\"]"), "effects[0].ledger"),
            (rule("changes = true\nledger = { max_len = 5 }"), "effects[0].types"),
            (format!("[dedupe]\ndense_seq_topics = []\n{}", rule("changes = true\ntypes = [\"idem.change\"]\nledger = { max_len = 5 }")), "effects[0].changes"),
            (format!("[state]\norder = \"per_field\"\n{}", change_rule("")), "effects[0].changes"),
            // per-field order reads no state as of a seq
            (format!("[state]\norder = \"per_field\"\n{}", rule("custom = [{ file = \"SNIPPET\", order = \"commutative\", writes = [\"p\"] }, { file = \"SNIPPET\", order = \"ordered\", writes = [\"x\"] }]")), "effects[0].custom[1].order"),
        ];
        for (text, key) in table {
            match load(&text).map_err(|e| e.first().clone()) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("{text}: expected a refusal of {key}, got {other:?}"),
            }
        }
    }

    /// `state.order` reaches every topic's policy; a commutative custom
    /// effect is accepted under per-field order.
    #[test]
    fn the_state_order_is_every_topics_policy() {
        let text = "[state]\norder = \"per_field\"\n[[effects]]\ntopic = \"t\"\ncustom = [{ file = \"SNIPPET\", order = \"commutative\", writes = [\"p\"] }]\n";
        let c = load(text).unwrap();
        assert_eq!(c.effects.state_order, StateOrder::PerField);
        for topic in ["t", "other"] {
            assert!(c.policy(topic).per_field(), "{topic}");
        }
        assert!(!load("").unwrap().policy("t").per_field());
        match load("[state]\norder = \"by_field\"\n").map_err(|e| e.first().clone()) {
            Err(ConfigError::Refused { key, message }) => {
                assert_eq!(key, "state.order");
                assert!(message.contains("`per_entity` or `per_field`"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
