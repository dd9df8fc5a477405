//! The guard script held to the pure model (`idem::model`) on random
//! sequences against a real Redis: every verdict and every entity's state.

mod common;

use std::time::Duration;

use common::*;
use idem::event::{Event, Op};
use idem::guard::{Guard, GuardInput};
use idem::model::Model;
use idem::store::progress::ProgressStore;
use idem::store::KeyLayout;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random short sequences over a few entities, with redelivered copies,
/// reordering, conflicts, deletes and field removals.
fn random_sequence(rng: &mut StdRng, tag: &str) -> Vec<Event> {
    let entities = 1 + rng.random_range(0..3) as usize;
    let mut out: Vec<Event> = Vec::new();
    for i in 0..(2 + rng.random_range(0..12)) {
        let roll = rng.random_range(0..10);
        if roll < 2 && !out.is_empty() {
            // A redelivered copy.
            let copy = out[rng.random_range(0..out.len() as u64) as usize].clone();
            out.push(copy);
            continue;
        }
        if roll == 2 && !out.is_empty() {
            // The same id with another payload.
            let mut c = out[rng.random_range(0..out.len() as u64) as usize].clone();
            c.fingerprint ^= 0x5555;
            c.set.push(("conflict".into(), "1".into()));
            out.push(c);
            continue;
        }
        let e = rng.random_range(0..entities as u64);
        let op = if roll == 3 { Op::Delete } else { Op::Upsert };
        let mut set = Vec::new();
        let mut unset = Vec::new();
        if op == Op::Upsert {
            for f in 0..rng.random_range(0..4) {
                set.push((
                    format!("f{}", (f + rng.random_range(0..3)) % 4),
                    format!("v{i}"),
                ));
            }
            if rng.random_range(0..4) == 0 {
                unset.push(format!("f{}", rng.random_range(0..4)));
                set.retain(|(k, _)| !unset.contains(k));
            }
        }
        out.push(Event {
            id: format!("{tag}-{i}"),
            entity: format!("{tag}:{e}"),
            seq: rng.random_range(0..8),
            op,
            set,
            unset,
            fingerprint: rng.random::<u64>(),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_script_matches_the_model_on_random_sequences() {
    const SEQUENCES: usize = 10_000;
    let prefix = unique("diff");
    let conn = redis_conn(&redis_url()).await;
    let mut rng = StdRng::seed_from_u64(0xD1FF);
    let mut checked_events = 0;
    let window = Duration::from_secs(3600);
    let epoch = ProgressStore::new(conn.clone(), KeyLayout::new(&prefix))
        .establish_epoch()
        .await
        .expect("epoch");
    for round in 0..(SEQUENCES / 100) {
        // 100 sequences per round trip; each sequence has its own entities.
        let events_per_script = 1 + rng.random_range(0..40) as usize;
        let mut guard = Guard::new(
            conn.clone(),
            KeyLayout::new(&prefix),
            events_per_script,
            epoch.clone(),
        );
        let sequences: Vec<Vec<Event>> = (0..100)
            .map(|s| random_sequence(&mut rng, &format!("r{round}s{s}")))
            .collect();
        let all: Vec<&Event> = sequences.iter().flatten().collect();
        let inputs: Vec<GuardInput<'_>> = all
            .iter()
            .map(|event| GuardInput { event, window })
            .collect();
        let verdicts = guard.apply(&inputs).await.unwrap();
        let mut model = Model::default();
        for (event, verdict) in all.iter().zip(&verdicts) {
            let want = model.apply(event);
            assert_eq!(verdict.outcome, want, "outcome of {event:?}");
        }
        checked_events += all.len();
        let views = read_entities(&redis_url(), &prefix, model.entities.keys()).await;
        for (name, want) in &model.entities {
            let got = &views[name];
            assert_eq!(
                (
                    got.seq,
                    got.deleted,
                    got.applied,
                    &got.state,
                    got.last_id.as_ref()
                ),
                (
                    want.seq,
                    want.deleted,
                    want.applied,
                    &want.state,
                    want.last_id.as_ref()
                ),
                "state of {name}"
            );
        }
    }
    eprintln!("differential: {SEQUENCES} sequences, {checked_events} events, Lua == model");
}
