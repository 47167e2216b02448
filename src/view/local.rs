//! The status document local mode publishes each round (`GET /v1/cluster`): what the
//! dashboard, `/metrics` and `pgrs local status` read.

use serde::{Deserialize, Serialize};

use crate::engine::{Lsn, Phase};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub pg_port: u16,
    pub agent_port: u16,
    /// The agent answered recently.
    pub reachable: bool,
    /// `primary`, `replica`, `starting`, `fenced`, `stopped`; `None` when unreachable.
    pub role: Option<String>,
    pub postgres_up: bool,
    pub timeline: Option<u32>,
    pub current_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Primary's current LSN minus this replica's replay LSN; `None` when unknown.
    pub lag_bytes: Option<u64>,
    /// Replay lag in seconds from the primary's `pg_stat_replication`; 0 when caught up on an
    /// idle primary; `None` when unknown (never reported as 0 then).
    pub lag_seconds: Option<f64>,
    pub sync_state: Option<String>,
    pub upstream: Option<String>,
    pub agent_pid: Option<i32>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseStatus {
    pub holder: Option<String>,
    pub version: String,
    /// Time left before the controller would count the lease as expired (its own clock):
    /// the lease duration minus how long it has been unchanged.
    pub expires_in_ms: Option<u64>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub at: chrono::DateTime<chrono::Utc>,
    pub severity: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalStatus {
    pub cluster: String,
    pub phase: Phase,
    pub message: String,
    /// The serving primary (lease holder), if any.
    pub primary: Option<String>,
    pub lease: LeaseStatus,
    pub write_endpoint: String,
    pub sync: bool,
    pub nodes: Vec<NodeStatus>,
    pub events: Vec<EventRecord>,
    /// The last failover or switchover decided by the engine (candidate, LSN gap).
    #[serde(default)]
    pub last_failover: Option<crate::engine::FailoverChoice>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}
