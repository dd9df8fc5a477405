//! The dead-letter budget: the share of dead-lettered records among the last
//! N records. Past `dlq.max_ratio`, idem stops consuming: a poison flood must
//! not quietly become a dead-letter flood.

use std::collections::VecDeque;

/// A sliding window over the last `window` records.
///
/// | window | max_ratio | recorded (dead?)        | exceeded? |
/// |--------|-----------|-------------------------|-----------|
/// | 4      | 0.5       | no, yes, yes            | no (not full yet) |
/// | 4      | 0.5       | no, yes, yes, no        | no (2/4 = 0.5) |
/// | 4      | 0.5       | no, yes, yes, yes       | yes (3/4) |
/// | 4      | 0.5       | yes ×3, no ×4           | no (window slid) |
#[derive(Debug)]
pub struct DlqBudget {
    window: usize,
    max_ratio: f64,
    recent: VecDeque<bool>,
    dead: usize,
}

impl DlqBudget {
    pub fn new(window: usize, max_ratio: f64) -> Self {
        DlqBudget {
            window: window.max(1),
            max_ratio,
            recent: VecDeque::with_capacity(window.max(1)),
            dead: 0,
        }
    }

    /// Records one record's fate.
    pub fn record(&mut self, dead_lettered: bool) {
        if self.recent.len() == self.window && self.recent.pop_front() == Some(true) {
            self.dead -= 1;
        }
        self.recent.push_back(dead_lettered);
        self.dead += usize::from(dead_lettered);
    }

    /// The share of dead letters in the window.
    pub fn ratio(&self) -> f64 {
        if self.recent.is_empty() {
            0.0
        } else {
            self.dead as f64 / self.recent.len() as f64
        }
    }

    /// True once the window is full and its share is above `max_ratio`.
    pub fn is_exceeded(&self) -> bool {
        self.max_ratio < 1.0 && self.recent.len() == self.window && self.ratio() > self.max_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_by_table() {
        let table: &[(&[bool], bool)] = &[
            (&[false, true, true], false),
            (&[false, true, true, false], false),
            (&[false, true, true, true], true),
            (&[true, true, true, false, false, false, false], false),
        ];
        for (seq, want) in table {
            let mut b = DlqBudget::new(4, 0.5);
            for d in seq.iter() {
                b.record(*d);
            }
            assert_eq!(b.is_exceeded(), *want, "{seq:?}");
        }
        let mut off = DlqBudget::new(2, 1.0);
        off.record(true);
        off.record(true);
        assert!(!off.is_exceeded());
    }
}
