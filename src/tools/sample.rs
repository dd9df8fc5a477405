//! A deterministic event generator: unique ids, per-entity sequences, and
//! configurable rates of redelivered duplicates, out-of-order arrivals and
//! deletes. Used by the demo, the benchmark and the tests (with the model in
//! `crate::model` as oracle).

/// A small, fast, seedable PRNG (splitmix64): reproducible runs from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    /// Distinct intents (events with their own id).
    pub events: usize,
    pub entities: usize,
    /// Fraction of all produced records that are redelivered copies.
    pub duplicate_ratio: f64,
    /// Fraction of intents that arrive before their entity's previous event.
    pub out_of_order_ratio: f64,
    /// Fraction of intents that delete their entity.
    pub delete_ratio: f64,
    /// Approximate size of each event's `data` padding, in bytes.
    pub data_bytes: usize,
    pub seed: u64,
    /// Prefix of ids and entities, so runs never collide.
    pub prefix: String,
    /// Skew of entity popularity: the k-th most popular entity is picked
    /// with probability proportional to 1/k^s (Zipf). `None`: uniform.
    pub zipf: Option<f64>,
}

impl Default for SampleSpec {
    fn default() -> Self {
        SampleSpec {
            events: 1000,
            entities: 100,
            duplicate_ratio: 0.2,
            out_of_order_ratio: 0.05,
            delete_ratio: 0.0,
            data_bytes: 16,
            seed: 1,
            prefix: "sample".into(),
            zipf: None,
        }
    }
}

/// One record to produce: keyed by entity, as producers should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRecord {
    pub key: String,
    pub value: Vec<u8>,
}

/// A stream being built in production order: each record pushed may swap
/// places with its entity's previous one (arriving out of order) and be
/// followed by redelivered copies of recent records.
pub struct Shuffler {
    out: Vec<SampleRecord>,
    /// Index in `out` of each entity's latest record that may still be swapped.
    last_of: Vec<Option<usize>>,
    out_of_order_ratio: f64,
    copy_chance: f64,
}

impl Shuffler {
    pub fn new(
        entities: usize,
        duplicate_ratio: f64,
        out_of_order_ratio: f64,
        capacity: usize,
    ) -> Shuffler {
        Shuffler {
            out: Vec::with_capacity(capacity),
            last_of: vec![None; entities],
            out_of_order_ratio,
            copy_chance: if duplicate_ratio >= 1.0 {
                1.0
            } else {
                duplicate_ratio / (1.0 - duplicate_ratio)
            },
        }
    }

    /// Appends `record` of entity number `entity`.
    pub fn push(&mut self, rng: &mut Rng, entity: usize, record: SampleRecord) {
        let out = &mut self.out;
        out.push(record);
        let idx = out.len() - 1;
        match self.last_of[entity] {
            Some(j) if rng.chance(self.out_of_order_ratio) => {
                out.swap(j, idx);
                // Both have moved; neither is swapped again.
                self.last_of[entity] = None;
            }
            _ => self.last_of[entity] = Some(idx),
        }
        while rng.chance(self.copy_chance.min(0.95)) {
            let back = rng.below(out.len().min(200) as u64) as usize;
            let copy = out[out.len() - 1 - back].clone();
            out.push(copy);
            if !rng.chance(0.2) {
                break;
            }
        }
    }

    pub fn finish(self) -> Vec<SampleRecord> {
        self.out
    }
}

/// How the entity of each event is picked.
enum EntityPicker {
    Uniform(u64),
    /// Cumulative probabilities of entity 0 (the most popular), 1, ...
    Zipf(Vec<f64>),
}

impl EntityPicker {
    fn new(entities: usize, zipf: Option<f64>) -> EntityPicker {
        let Some(s) = zipf else {
            return EntityPicker::Uniform(entities as u64);
        };
        let weights: Vec<f64> = (1..=entities).map(|k| (k as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        EntityPicker::Zipf(cdf)
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        match self {
            EntityPicker::Uniform(n) => rng.below(*n) as usize,
            EntityPicker::Zipf(cdf) => {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
            }
        }
    }
}

/// Generates the records in the order they are to be produced.
pub fn generate(spec: &SampleSpec) -> Vec<SampleRecord> {
    let mut rng = Rng::new(spec.seed);
    let entities = spec.entities.max(1);
    let picker = EntityPicker::new(entities, spec.zipf);
    let mut next_seq = vec![1u64; entities];
    let mut shuffler = Shuffler::new(
        entities,
        spec.duplicate_ratio,
        spec.out_of_order_ratio,
        spec.events * 2,
    );
    let pad = "x".repeat(spec.data_bytes);
    for i in 0..spec.events {
        let e = picker.pick(&mut rng);
        let seq = next_seq[e];
        next_seq[e] += 1;
        let entity = format!("{}:{e}", spec.prefix);
        let value = if rng.chance(spec.delete_ratio) {
            format!(
                r#"{{"id":"{p}-{i}","entity":"{entity}","seq":{seq},"type":"delete","ts":"2026-11-26T12:00:00Z"}}"#,
                p = spec.prefix
            )
        } else {
            format!(
                r#"{{"id":"{p}-{i}","entity":"{entity}","seq":{seq},"type":"upsert","ts":"2026-11-26T12:00:00Z","data":{{"n":{i},"f{k}":"v{seq}","pad":"{pad}"}}}}"#,
                p = spec.prefix,
                k = i % 4
            )
        };
        shuffler.push(
            &mut rng,
            e,
            SampleRecord {
                key: entity,
                value: value.into_bytes(),
            },
        );
    }
    shuffler.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode, FieldMap};
    use crate::model::{Model, Outcome};

    #[test]
    fn generation_is_reproducible_and_has_the_requested_mix() {
        let spec = SampleSpec {
            events: 20_000,
            entities: 50,
            duplicate_ratio: 0.3,
            out_of_order_ratio: 0.1,
            delete_ratio: 0.02,
            ..SampleSpec::default()
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        let mut model = Model::default();
        let mut counts = std::collections::HashMap::new();
        for r in &a {
            let e = decode(Some(&r.value), &FieldMap::default(), 1 << 20).unwrap();
            *counts.entry(model.apply(&e)).or_insert(0usize) += 1;
        }
        let dup = counts[&Outcome::Duplicate] as f64 / a.len() as f64;
        assert!((0.25..0.36).contains(&dup), "duplicate share {dup}");
        assert!(counts[&Outcome::Stale] > 500, "{counts:?}");
        assert_eq!(counts[&Outcome::Applied] + counts[&Outcome::Stale], 20_000);
    }

    #[test]
    fn zipf_makes_the_first_entities_the_hot_ones() {
        let spec = SampleSpec {
            events: 50_000,
            entities: 10_000,
            duplicate_ratio: 0.0,
            out_of_order_ratio: 0.0,
            zipf: Some(1.1),
            ..SampleSpec::default()
        };
        let records = generate(&spec);
        let hits = |key: &str| records.iter().filter(|r| r.key == key).count() as f64;
        let share = hits("sample:0") / records.len() as f64;
        // 1 / H(10000, 1.1) = 0.151: the hottest entity takes about 15%.
        assert!((0.14..0.165).contains(&share), "hottest share {share}");
        // 1/k^1.1: the tenth is 10^1.1 = 12.6 times rarer than the first.
        let ratio = hits("sample:0") / hits("sample:9");
        assert!((10.0..16.0).contains(&ratio), "first / tenth {ratio}");
        let uniform = generate(&SampleSpec { zipf: None, ..spec });
        let top = uniform.iter().filter(|r| r.key == "sample:0").count();
        assert!(top < 30, "uniform: entity 0 has {top} of 50,000");
    }
}
