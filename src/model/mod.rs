//! The decision rules, once, as pure Rust: what the guard script decides for
//! an event given what Redis remembers about its entity.
//!
//! `src/guard/lua/` implements the same rules inside Redis; this module
//! is the oracle the tests hold it to, and the model `reconcile` uses. Its
//! files match the script's (docs/development.md, "The guard's map"):
//! `entity.rs` the entry (`main.lua`), `decisions.rs` per-entity order
//! (`decisions.lua`, `writes.lua`), `per_field.rs` (`per_field.lua`),
//! `mutations.rs` (`mutations.lua`), `dense.rs` (`dense.lua`), `marks.rs`
//! (`marks.lua`), `outcome.rs` the outcomes (the verdict codes).

mod decisions;
mod dense;
mod entity;
mod marks;
mod mutations;
mod outcome;
mod per_field;

pub use dense::{DenseMark, Seen};
pub use entity::{EntityModel, Model};
pub use marks::{GuardInput, Place};
pub use outcome::{classify, Outcome, Rejection, Verdict};

#[cfg(test)]
mod tests;
