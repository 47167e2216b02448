//! Coordination: who may be primary. The lease contract ([`LeaseStore`]) with an in-process
//! store ([`MemoryLeaseStore`]), its HTTP service and client for local mode ([`lease_router`],
//! [`HttpLeaseStore`]), and the agent-side [`LeaseKeeper`] that renews and fences. The
//! Kubernetes Lease implementation comes with the operator.

mod agent_side;
mod clock;
mod failsafe;
mod http;
mod keeper;
mod kube;
mod lease;
mod memory;
mod watchdog;

#[cfg(test)]
mod fencing_tests;
#[cfg(test)]
mod tests;

pub use self::kube::KubeLeaseStore;
pub use agent_side::{AgentFencing, LeaseArgs, LocalPrimaryState};
pub use clock::FenceInstant;
pub use failsafe::{ConfirmError, Failsafe, membership_refusal};
pub use http::{HttpLeaseStore, lease_router};
pub use keeper::{DEFAULT_START_BUDGET, FenceFn, KeeperMode, KeeperStatus, LeaseKeeper};
pub use lease::{LeaseError, LeaseRecord, LeaseStore, LeaseTimings, TimingsError};
pub use memory::MemoryLeaseStore;
pub use watchdog::{WatchdogCommand, kill_postmaster, run_watchdog, spawn_watchdog};
