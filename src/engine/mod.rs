//! The failover engine: pure decisions, no IO, no clock, no tokio.
//!
//! Input: the observed cluster, the lease as observed (with "unchanged since" on the observer's
//! monotonic clock, as a value), the spec, the controller's memory and `now`. Output: actions
//! (take over the lease, promote, demote, fence, follow, rejoin, set synchronous standbys),
//! events and the cluster status. See `docs/failover.md` for the rules and why they are safe.

mod actions;
mod candidate;
mod decide;
mod former;
mod model;
mod switchover;
mod sync;

#[cfg(test)]
mod safety_tests;
#[cfg(test)]
mod tests;

pub use crate::postgres::lsn::Lsn;
pub use actions::{
    Action, ClusterStatus, Decision, Event, EventReason, FailoverChoice, Phase, Severity,
};
pub use candidate::{
    Candidate, Refusal, choose_failover_candidate, promotable_replicas, quorum_position,
};
pub use decide::decide;
pub use former::track_former_primaries;
pub use model::{
    DataDurability, EngineInput, EngineSpec, InstanceObservation, LeaseView, Memory, MonoTime,
    ObservedRole, PrimaryRecord, ReplicationMode, SwitchoverPlan, SyncSet, SyncState,
};
pub use switchover::{SwitchoverError, check_target, plan_switchover};
pub use sync::{desired_sync, record_after_confirmation, widen};
