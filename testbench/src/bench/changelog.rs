//! The changelog phase: one stream run four times through the real `idem`,
//! each on its own topic and key prefix, in the same run: changelog off,
//! on (the relay publishing to `<topic>.changes` meanwhile), on with the
//! changelog topic missing (the relay cannot publish, so the outbox keeps
//! every change and its bytes per entry are measured), and off again (how
//! much the order of the runs moves the figures). docs/change-stream.md.

use super::effects::{payments_stream, run_variant, Setup};
use super::report::EffectsRow;
use super::BenchSpec;

pub async fn measure(spec: &BenchSpec, run_prefix: &str) -> anyhow::Result<Vec<EffectsRow>> {
    let records = payments_stream(spec, run_prefix);
    let mut rows = Vec::new();
    for (i, (name, on, topic_there)) in [
        ("off", false, false),
        ("on, relay publishing", true, true),
        ("on, relay held (topic missing)", true, false),
        ("off again (order check)", false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("{run_prefix}-cl{i}");
        let mut env = Vec::new();
        if on {
            env.push(("IDEM__CHANGELOG__TOPICS", topic.clone()));
            // Every change stays in the outbox when the relay is held.
            env.push(("IDEM__CHANGELOG__MAX_OUTBOX", "100000000".to_string()));
        }
        let setup = Setup {
            env,
            changelog: on,
            changelog_topic: topic_there,
            ..Setup::default()
        };
        let name = format!("changelog {name}");
        rows.push(run_variant(spec, &name, &topic, &records, &setup, &[":state", ":meta"]).await?);
    }
    Ok(rows)
}
