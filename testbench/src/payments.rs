//! A payments stream for the effects' tests and benchmark: deposits and
//! withdrawals (integers, 2-decimal amounts, one 30-digit amount) counted
//! into a balance and appended to a ledger, loyalty points from a custom
//! effect, and status updates; with redeliveries and reordering. Plus the
//! config that declares those effects and the oracle of what idem must do.

use std::collections::BTreeMap;
use std::path::Path;

use idem::config::TopicPolicy;
use idem::event::{decode, FieldMap};
use idem::model::{Model, Outcome};
use idem::tools::sample::{Rng, SampleRecord, Shuffler};

/// The 30-digit deposit every stream carries once.
pub const HUGE_AMOUNT: &str = "123456789012345678901234567890.05";

/// The loyalty snippet: a point per whole unit deposited, at most 1000.
/// Commutative: min(cap, p + a + b) whatever the order, for a, b >= 0.
pub const LOYALTY_LUA: &str = r#"-- A point per whole unit deposited, at most 1000 per account.
local points = tonumber(counters.points or "0")
local amount = tonumber(event.data.amount)
if amount == nil then
  error("amount is not a number: " .. tostring(event.data.amount))
end
return { points = math.min(1000, points + math.floor(amount)) }
"#;

/// The points cap of [`LOYALTY_LUA`].
pub const POINTS_CAP: u64 = 1000;

/// The `[[effects]]` of a payments topic, with the loyalty snippet at `snippet`.
pub fn effects_toml(topic: &str, snippet: &Path) -> String {
    format!(
        r#"
[[effects]]
topic = "{topic}"
types = ["deposit"]
fields = ["amount"]
counters = [{{ field = "balance", from = "/amount", scale = 2 }}]
ledger = {{ stream = "ledger", fields = ["amount"], max_len = 100000 }}
custom = [{{ file = "{snippet}", order = "commutative", writes = ["points"] }}]

[[effects]]
topic = "{topic}"
types = ["withdrawal"]
state = "keep"
counters = [{{ field = "balance", from = "/amount", scale = 2, subtract = true }}]
ledger = {{ stream = "ledger", fields = ["amount"], max_len = 100000 }}

[[effects]]
topic = "{topic}"
types = ["status"]
fields = ["status"]
"#,
        snippet = snippet.display()
    )
}

/// Writes the snippet and a config file declaring the effects into `dir`;
/// returns the config file's path.
pub fn write_config(dir: &Path, topic: &str) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let snippet = dir.join("loyalty.lua");
    std::fs::write(&snippet, LOYALTY_LUA)?;
    let config = dir.join("effects.toml");
    std::fs::write(&config, effects_toml(topic, &snippet))?;
    Ok(config)
}

/// How the stream is made.
#[derive(Debug, Clone)]
pub struct PaymentsSpec {
    pub events: usize,
    pub accounts: usize,
    pub duplicate_ratio: f64,
    pub out_of_order_ratio: f64,
    pub seed: u64,
    pub prefix: String,
}

fn amount(rng: &mut Rng) -> String {
    let cents = 1 + rng.below(50_000);
    if rng.chance(0.5) {
        // a JSON number with two decimals
        format!("{}.{:02}", cents / 100, cents % 100)
    } else {
        // an integer, as a JSON string
        format!("\"{}\"", cents / 100 + 1)
    }
}

/// The records in the order they are produced (keyed by account).
pub fn generate(spec: &PaymentsSpec) -> Vec<SampleRecord> {
    let mut rng = Rng::new(spec.seed);
    let accounts = spec.accounts.max(1);
    let mut next_seq = vec![1u64; accounts];
    let mut shuffler = Shuffler::new(
        accounts,
        spec.duplicate_ratio,
        spec.out_of_order_ratio,
        spec.events * 2,
    );
    for i in 0..spec.events {
        let a = rng.below(accounts as u64) as usize;
        let seq = next_seq[a];
        next_seq[a] += 1;
        let entity = format!("{}:acct-{a}", spec.prefix);
        let (kind, data) = match rng.below(20) {
            _ if i == 7 => ("deposit", format!(r#"{{"amount":{HUGE_AMOUNT}}}"#)),
            0..=11 => ("deposit", format!(r#"{{"amount":{}}}"#, amount(&mut rng))),
            12..=16 => (
                "withdrawal",
                format!(r#"{{"amount":{}}}"#, amount(&mut rng)),
            ),
            _ => ("status", format!(r#"{{"status":"s{seq}"}}"#)),
        };
        let value = format!(
            r#"{{"id":"{p}-{i}","entity":"{entity}","seq":{seq},"type":"{kind}","data":{data}}}"#,
            p = spec.prefix
        );
        shuffler.push(
            &mut rng,
            a,
            SampleRecord {
                key: entity,
                value: value.into_bytes(),
            },
        );
    }
    shuffler.finish()
}

/// What idem must hold after `records` on `topic`: the model with the
/// effects applied (in production order, which is each account's order),
/// the outcome counts, and each account's loyalty points (which the model
/// cannot compute, as it does not run Lua).
pub fn oracle(
    records: &[SampleRecord],
    policy: &TopicPolicy,
) -> (Model, BTreeMap<Outcome, u64>, BTreeMap<String, u64>) {
    let (model, decided) = decide_all(records, policy);
    let mut counts = BTreeMap::new();
    let mut points: BTreeMap<String, u64> = BTreeMap::new();
    for (event, outcome) in decided {
        *counts.entry(outcome).or_insert(0) += 1;
        let first_time = matches!(outcome, Outcome::Applied | Outcome::Late | Outcome::Partial);
        if first_time && event.kind.as_deref() == Some("deposit") {
            let amount = idem::effects::data_value(&event, "/amount").expect("amount");
            let whole: u64 = amount
                .split('.')
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(POINTS_CAP);
            let p = points.entry(event.entity.clone()).or_insert(0);
            *p = (*p + whole).min(POINTS_CAP);
        }
    }
    (model, counts, points)
}

/// For each record in production order: does the oracle apply it?
pub fn oracle_applies(records: &[SampleRecord], policy: &TopicPolicy) -> Vec<bool> {
    let (_, decided) = decide_all(records, policy);
    decided
        .iter()
        .map(|(_, o)| *o == Outcome::Applied)
        .collect()
}

/// The model after `records`, and each record's event and outcome.
fn decide_all(
    records: &[SampleRecord],
    policy: &TopicPolicy,
) -> (Model, Vec<(idem::event::Event, Outcome)>) {
    let mut model = Model::default();
    let decided = records
        .iter()
        .map(|r| {
            let event = decode(Some(&r.value), &FieldMap::default(), 1 << 20).expect("valid");
            let planned = policy.plan(&event).expect("plannable");
            let outcome = model.apply_effects(&event, &planned, policy);
            (event, outcome)
        })
        .collect();
    (model, decided)
}
