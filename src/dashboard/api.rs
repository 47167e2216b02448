//! The JSON shape of `GET /api/clusters` (documented in `docs/dashboard.md`). Versioned by
//! [`API_VERSION`]: fields may be added within a version; renaming or removing one, or changing
//! its meaning, needs a new version. Unknown values are `null`, never 0.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::Phase;

/// The value of [`ClustersResponse::api_version`].
pub const API_VERSION: &str = "pgrs.dev/dashboard/v1";

/// Where the data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `pgrs local`: one cluster, observed by the local controller.
    Local,
    /// `pgrs operator`: every `PgReplicaSet` it manages, from their status and Leases.
    Operator,
}

/// `GET /api/clusters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClustersResponse {
    pub api_version: String,
    pub source: Source,
    pub generated_at: DateTime<Utc>,
    pub clusters: Vec<ClusterView>,
    /// Why the list may be incomplete (for example the API server did not answer).
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    /// Kubernetes namespace; `null` in local mode.
    pub namespace: Option<String>,
    /// `null` when the operator has not written a status yet.
    pub phase: Option<Phase>,
    pub message: Option<String>,
    /// The serving primary (the lease holder, once it serves writes).
    pub primary: Option<String>,
    /// `async` or `sync`; `null` when not known.
    pub replication_mode: Option<String>,
    /// Where clients write (local mode: the forwarding endpoint).
    pub write_endpoint: Option<String>,
    pub lease: LeaseView,
    pub nodes: Vec<NodeView>,
    /// The last failovers and switchovers this server saw, newest first.
    pub failovers: Vec<FailoverView>,
    pub lag_history: LagHistoryView,
    /// When the data shown was observed (local: the controller's last round; operator: now).
    pub observed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseView {
    pub holder: Option<String>,
    /// Time left before the lease counts as expired unless renewed, as of `observedAt`.
    pub expires_in_ms: Option<u64>,
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    /// `primary`, `replica`, `starting`, `fenced`, `stopped`, `unreachable` or `unknown`.
    pub role: String,
    /// postgres accepts connections and the node serves its role.
    pub ready: bool,
    pub timeline: Option<u32>,
    /// WAL positions as `X/Y`.
    pub current_lsn: Option<String>,
    pub receive_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    /// Primary's current LSN minus this replica's replay LSN; `null` when unknown (and on the
    /// primary).
    pub lag_bytes: Option<u64>,
    /// Replay delay; 0 when caught up, `null` when unknown.
    pub lag_seconds: Option<f64>,
    /// `async`, `potential`, `sync` or `quorum` as the primary reports it.
    pub sync_state: Option<String>,
    /// The node this replica streams from.
    pub upstream: Option<String>,
    /// When the node last answered.
    pub last_seen: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverView {
    /// `Failover`, `Switchover`, or the operator's reason (`PrimaryUnreachable`, ...).
    pub reason: String,
    pub from: Option<String>,
    pub to: String,
    /// Loss of the primary (or the switchover request) detected.
    pub detected_at: Option<DateTime<Utc>>,
    /// The old primary known stopped.
    pub fenced_at: Option<DateTime<Utc>>,
    /// Promotion of the new primary ordered or reported.
    pub promoted_at: Option<DateTime<Utc>>,
    /// The new primary serves writes (local) or the `-rw` Service selects it (operator).
    pub completed_at: Option<DateTime<Utc>>,
    /// `completedAt - detectedAt`.
    pub duration_ms: Option<u64>,
    pub lsn_gap_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LagHistoryView {
    pub window_seconds: u64,
    pub series: Vec<LagSeries>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LagSeries {
    pub node: String,
    /// Oldest first.
    pub points: Vec<LagPoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LagPoint {
    pub at: DateTime<Utc>,
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}
