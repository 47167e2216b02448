//! The engine's outputs: actions for the controller to carry out (in order, stopping at the
//! first failure), events for humans, and the cluster status.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Lsn;
use super::model::{Memory, SyncSet};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Action {
    /// Write the lease for `holder`, only if it still has `expected_version` (optimistic
    /// concurrency: fails when anyone else wrote it meanwhile).
    AcquireLease {
        holder: String,
        expected_version: String,
    },
    /// Promote `instance`; its agent promotes only when it sees itself as the lease holder.
    Promote { instance: String },
    /// Planned step-down of the lease holder: fast shutdown of postgres, then release the lease.
    Demote { instance: String },
    /// Stop postgres on `instance` immediately: it reports itself primary but does not hold the
    /// lease.
    Fence { instance: String, reason: String },
    /// Re-point a healthy replica's `primary_conninfo` at `primary` (the elected instance's own
    /// address, never a shared service).
    Follow { instance: String, primary: String },
    /// Turn a former primary (or a diverged replica) into a replica of `primary`: checkpoint on
    /// the primary, pg_rewind, start as standby; re-clone if the rewind cannot work.
    Rejoin { instance: String, primary: String },
    /// Apply `synchronous_standby_names` on the primary.
    SetSynchronousStandbys { primary: String, sync: SyncSet },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::AcquireLease { .. } => "acquire-lease",
            Action::Promote { .. } => "promote",
            Action::Demote { .. } => "demote",
            Action::Fence { .. } => "fence",
            Action::Follow { .. } => "follow",
            Action::Rejoin { .. } => "rejoin",
            Action::SetSynchronousStandbys { .. } => "set-synchronous-standbys",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    /// Data may be or has been lost, or safety was traded for availability on request.
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventReason {
    LeaseAcquired,
    FailoverStarted,
    FailoverRefused,
    DataLossAllowed,
    Promoting,
    Fencing,
    SwitchoverStarted,
    SwitchoverWaiting,
    SwitchoverCompleted,
    SwitchoverAbandoned,
    WaitingForLeaseExpiry,
    SyncQuorumChanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub severity: Severity,
    pub reason: EventReason,
    pub message: String,
}

impl Event {
    pub fn info(reason: EventReason, message: impl Into<String>) -> Self {
        Event {
            severity: Severity::Info,
            reason,
            message: message.into(),
        }
    }

    pub fn warning(reason: EventReason, message: impl Into<String>) -> Self {
        Event {
            severity: Severity::Warning,
            reason,
            message: message.into(),
        }
    }

    pub fn critical(reason: EventReason, message: impl Into<String>) -> Self {
        Event {
            severity: Severity::Critical,
            reason,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// No instance holds or can take the lease yet.
    Bootstrapping,
    Healthy,
    /// The primary is fine but some replica is not.
    Degraded,
    /// The holder is unreachable or down; waiting for its lease to expire.
    PrimaryUnavailable,
    FailingOver,
    SwitchingOver,
    /// A failover is needed but no candidate is safe to promote.
    FailoverBlocked,
}

/// Details of a failover decision, for status and the failover report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverChoice {
    pub from: Option<String>,
    pub to: String,
    /// Last known primary flush position minus the candidate's received position, when known.
    pub lsn_gap_bytes: Option<u64>,
    pub data_loss_allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub phase: Phase,
    /// The instance allowed to accept writes (the lease holder), when it is serving.
    pub primary: Option<String>,
    pub message: String,
    /// How long until the old holder's lease counts as expired (while waiting for it).
    pub lease_expires_in: Option<Duration>,
    pub failover: Option<FailoverChoice>,
    /// The primary's flush position (when known) — the reference for lag in bytes.
    pub primary_lsn: Option<Lsn>,
}

/// One round's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub events: Vec<Event>,
    pub status: ClusterStatus,
    /// The memory for the next round.
    pub memory: Memory,
}
