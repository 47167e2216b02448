//! `PgReplicaSet.status`: what the operator observed. Written only by the operator (status
//! subresource). Unknown values are absent, never 0: a standby whose lag cannot be computed has
//! no `lagBytes`/`lagSeconds`, one that is caught up has 0.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types set in `status.conditions`.
pub mod condition {
    /// A primary serves writes and every desired instance is ready.
    pub const READY: &str = "Ready";
    /// Every standby streams from the current primary.
    pub const REPLICATION_HEALTHY: &str = "ReplicationHealthy";
    /// Some standby is behind by more than `spec.monitoring.lagAlertSeconds`.
    pub const LAG_HIGH: &str = "LagHigh";
    /// A failover is needed but no candidate is safe to promote.
    pub const FAILOVER_BLOCKED: &str = "FailoverBlocked";
    /// The spec was rejected by the operator's own validation (see the message).
    pub const SPEC_VALID: &str = "SpecValid";
    /// Every instance runs the current `spec.parameters` (reloaded, or restarted when a
    /// parameter needs it); False while a rollout is under way (the reason says which step).
    pub const PARAMETERS_APPLIED: &str = "ParametersApplied";
    /// Some instance is fenced on request (annotation `pgrs.dev/fence`).
    pub const FENCED: &str = "Fenced";
    /// True while the primary cannot renew its Lease (the API server is unreachable from it)
    /// and serves on the confirmations of every member (`spec.failover.failsafe`).
    pub const SERVING_ON_FAILSAFE: &str = "ServingOnFailsafe";
}

/// The cluster phase shown by `kubectl get pgrs`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Objects are being created; no instance runs yet.
    Pending,
    /// The first primary is being initialized, or no instance holds the Lease yet.
    Bootstrapping,
    /// A primary serves writes and every standby streams from it.
    Healthy,
    /// The primary serves writes but some standby is missing, lagging or not streaming.
    Degraded,
    /// The Lease holder is unreachable or down: waiting for its Lease to expire.
    PrimaryUnavailable,
    /// A standby is being promoted.
    FailingOver,
    /// A planned switchover is in progress.
    SwitchingOver,
    /// A failover is needed but no candidate is safe to promote (see conditions and events).
    FailoverBlocked,
    /// The spec is invalid for the operator (see the `SpecValid` condition); nothing is changed.
    Invalid,
}

impl From<crate::engine::Phase> for Phase {
    fn from(phase: crate::engine::Phase) -> Self {
        use crate::engine::Phase as Engine;
        match phase {
            Engine::Bootstrapping => Phase::Bootstrapping,
            Engine::Healthy => Phase::Healthy,
            Engine::Degraded => Phase::Degraded,
            Engine::PrimaryUnavailable => Phase::PrimaryUnavailable,
            Engine::FailingOver => Phase::FailingOver,
            Engine::SwitchingOver => Phase::SwitchingOver,
            Engine::FailoverBlocked => Phase::FailoverBlocked,
        }
    }
}

/// Observed state of a `PgReplicaSet`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgReplicaSetStatus {
    /// Cluster phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The instance allowed to accept writes: the holder of the Lease `<name>-primary`, which
    /// the `<name>-rw` Service selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,

    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready instances over desired instances, for example `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Largest lag among the standbys, for humans (for example `128 KiB, 0.4s`); absent when
    /// unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<String>,

    /// Ready, ReplicationHealthy, LagHigh, FailoverBlocked, SpecValid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// One entry per instance (pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,

    /// The most recent failover or switchover, with the time of each step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,

    /// The PostgreSQL major the cluster runs: `spec.postgresVersion` once an upgrade to it
    /// completed, the old major while it runs or after it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_version: Option<u32>,

    /// The last major-version upgrade (raised `spec.postgresVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_upgrade: Option<MajorUpgradeStatus>,
}

/// A major-version upgrade: the primary is upgraded with pg_upgrade while writes stop, then
/// the replicas are cloned from it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MajorUpgradeStatus {
    /// The major the cluster ran when the upgrade started.
    pub from: u32,
    /// The major of `spec.postgresVersion`.
    pub to: u32,
    /// Where the upgrade is.
    pub phase: MajorUpgradePhase,
    /// The instance whose data directory is upgraded (the primary when the upgrade started).
    pub primary: String,
    /// The image of the old major (its binaries are copied into the upgraded pods).
    pub from_image: String,
    /// The pods as they were when the upgrade started (name → UID): each is restarted once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pods: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the upgraded primary reported itself up on the new major.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_upgraded_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Why it failed (pg_upgrade's words), or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The value of the annotation `pgrs.dev/retry-upgrade` when it failed: a new value retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_token: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MajorUpgradePhase {
    /// Writes are stopped; the primary's pod restarts on the new image and runs pg_upgrade.
    UpgradingPrimary,
    /// The primary serves on the new major; the replicas restart and are cloned from it.
    RecloningReplicas,
    /// Every instance runs the new major.
    Completed,
    /// pg_upgrade refused or failed: the cluster runs the old major, nothing was lost.
    Failed,
}

/// The role of an instance as its agent reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceRole {
    /// Accepts writes.
    Primary,
    /// Hot standby.
    Replica,
    /// Bootstrapping, starting, or running an action (rewind, clone).
    Starting,
    /// Stopped on a fencing order.
    Fenced,
    /// Stopped on request.
    Stopped,
    /// The agent did not answer.
    Unknown,
}

/// How the primary treats a standby (`pg_stat_replication.sync_state`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    Async,
    Potential,
    Sync,
    Quorum,
}

/// One instance as last observed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Instance (pod) name.
    pub name: String,
    /// The group the instance belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Role reported by the instance's agent.
    pub role: InstanceRole,
    /// postgres accepts connections and the agent answered.
    pub ready: bool,
    /// Current PostgreSQL timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// WAL position: current LSN on the primary, replay LSN on a standby (`X/Y`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Primary's current LSN minus this standby's replay LSN; absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// Replay delay in seconds; 0 when caught up (even on an idle primary), absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// How the primary treats this standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_state: Option<SyncState>,
    /// When the operator last got an answer from this instance's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
}

/// The most recent change of primary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// Why: for example `PrimaryUnreachable`, `PrimaryPodDeleted`, `Switchover`.
    pub reason: String,
    /// When the loss of the primary (or the switchover request) was detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected_at: Option<Time>,
    /// When the old primary was known to be stopped (fenced or its Lease expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_at: Option<Time>,
    /// When the new primary reported itself promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<Time>,
    /// When `<name>-rw` selected the new primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_switched_at: Option<Time>,
    /// The former primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The new primary.
    pub to: String,
    /// Bytes of WAL the new primary was behind the last known primary position; absent when
    /// unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn_gap_bytes: Option<u64>,
}
