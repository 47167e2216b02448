//! Checking what a failure run did to writes, shared by `pgrs local chaos` and the operator
//! chaos tests: `check` is a pure, Jepsen-style checker of a write history (who acknowledged
//! which write when, and what the final primary holds). No IO here: the writers and the final
//! read belong to the platforms' test drivers; `outcome_of` is how they all classify a failed
//! attempt.

pub mod check;
mod outcome;

#[cfg(test)]
#[path = "check_tests.rs"]
mod check_tests;

pub use check::{
    CheckReport, FinalState, Gap, Promotion, SplitBrainWrite, Term, WriteOutcome, WriteRecord,
    check,
};
pub use outcome::outcome_of;
