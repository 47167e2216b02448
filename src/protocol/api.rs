//! The agent's HTTP API: paths and JSON bodies. Shared by the agent (server), `AgentClient`,
//! local mode and the operator, so every field is documented and changes to replies are
//! additive only (request bodies refuse unknown fields: a new request field needs agents that
//! know it).
//!
//! Paths (all JSON):
//! - `GET  /healthz` → [`ProbeResponse`] or `503`: liveness (the agent's supervisor and its
//!   status loop run). No token, no SQL: for the kubelet.
//! - `GET  /readyz`  → [`ProbeResponse`] or `503`: readiness (postgres was up and serving as
//!   primary or replica when the agent's own loop last looked, at most a few seconds ago). No
//!   token, no SQL on the request.
//! - `GET  /v1/status`  → [`AgentStatus`], probed live (SQL on the agent's kept session).
//! - `POST /v1/promote` [`PromoteRequest`] → [`ActionResponse`]
//! - `POST /v1/follow`  [`FollowRequest`]  → [`ActionResponse`]
//! - `POST /v1/rejoin`  [`RejoinRequest`]  → [`ActionResponse`] (with `rejoin`)
//! - `POST /v1/stop`    [`StopRequest`]    → [`ActionResponse`]
//! - `POST /v1/start`   (empty body or `{}`) → [`ActionResponse`]
//! - `POST /v1/fence`   [`FenceRequest`]   → [`ActionResponse`]
//! - `POST /v1/restart` (empty body or `{}`) → [`ActionResponse`]: fast stop and start in the
//!   same role (parameters that need a server restart)
//! - `POST /v1/parameters` [`ParametersRequest`] → [`ActionResponse`]: write the user
//!   parameters and reload; `pending_restart` in the status tells what still needs a restart
//! - `POST /v1/checkpoint`, `/v1/synchronous-standby-names`, `/v1/drop-slots`: statements on
//!   the agent's own postgres for controllers without a SQL session
//!   ([`crate::protocol::statements`])
//!
//! `GET /v1/status` and every `POST` need `Authorization: Bearer <token>` (the shared token
//! from the agent's `--token-file`); a missing or wrong token gets `401` with an
//! [`ErrorResponse`], before anything else is looked at. Every error reply carries an
//! [`ErrorResponse`]:
//! - `400`: the body is not JSON, a field has the wrong type, is missing or unknown, or a value
//!   is out of its bounds ([`crate::protocol::validate`]); the message names the field and
//!   nothing was done;
//! - `413`: the body is over [`MAX_BODY_BYTES`]; `415`: the body is not `application/json`;
//! - `409`: the action is not allowed in the current role; `500`: it ran and failed;
//! - `503`: more than the agent's limit of concurrent status and action requests, or a request
//!   over its time limit (a status read 10 s, an action 600 s).
//!
//! Actions are executed one at a time, in arrival order.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::postgres::lsn::Lsn;
/// Re-exported: the probe fills them, the API carries them unchanged.
pub use crate::postgres::probe::{ReplicationPeer, WalReceiver};

pub const STATUS_PATH: &str = "/v1/status";
/// Query parameter of `GET /v1/status`: answer once the agent's [`AgentStatus::change_token`]
/// differs from this one (a long poll), or when [`STATUS_WAIT_TIMEOUT_QUERY`] has passed.
pub const STATUS_WAIT_QUERY: &str = "wait_for_change";
/// Query parameter of `GET /v1/status`: how long a long poll may wait, in milliseconds
/// (capped at [`STATUS_WAIT_MAX`]).
pub const STATUS_WAIT_TIMEOUT_QUERY: &str = "timeout_ms";
/// The longest wait of a status long poll: short against any lease duration.
pub const STATUS_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(3);
pub const PROMOTE_PATH: &str = "/v1/promote";
pub const FOLLOW_PATH: &str = "/v1/follow";
pub const REJOIN_PATH: &str = "/v1/rejoin";
pub const STOP_PATH: &str = "/v1/stop";
pub const START_PATH: &str = "/v1/start";
pub const FENCE_PATH: &str = "/v1/fence";
pub const RESTART_PATH: &str = "/v1/restart";
pub const PARAMETERS_PATH: &str = "/v1/parameters";
/// Liveness, for the kubelet: no token, no SQL.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness, for the kubelet: no token, no SQL on the request.
pub const READYZ_PATH: &str = "/readyz";
/// The largest request body the agent reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the instance is, as far as its agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// postgres runs and is not in recovery: it accepts writes.
    Primary,
    /// postgres runs in recovery (hot standby), streaming or trying to stream from a primary.
    Replica,
    /// Bootstrapping, starting, restarting after a crash, or running an action (rewind, clone).
    Starting,
    /// Stopped on a fencing order; postgres is not restarted until a `follow` or `rejoin`.
    Fenced,
    /// Stopped on request (`/v1/stop`); restarted by `/v1/start`, `follow` or `rejoin`.
    Stopped,
}

/// `GET /v1/status`. Every PostgreSQL-derived field is `None` when postgres is down or the
/// probe failed (`probe_error` says why): unknown is never reported as 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The instance name (`--name`); also the replication slot suffix and `application_name`.
    pub name: String,
    /// The cluster name (`--cluster`).
    pub cluster: String,
    pub role: Role,
    /// The role the agent is driving towards (`primary` or `replica`); differs from `role` while
    /// starting, stopped or fenced.
    pub intended_role: Role,
    /// postgres accepted a connection during this status request.
    pub postgres_up: bool,
    /// postmaster process id, when the agent's child is running.
    pub postgres_pid: Option<u32>,
    /// TCP port postgres listens on.
    pub postgres_port: u16,
    /// `pg_control_system().system_identifier` (as a decimal string: it does not fit a JSON
    /// double), read from the running server or, when down, from `pg_controldata`.
    pub system_identifier: Option<String>,
    /// Current timeline: `pg_control_checkpoint().timeline_id` on a primary (after the
    /// post-promotion checkpoint), the WAL receiver's `received_tli` on a streaming replica.
    pub timeline: Option<u32>,
    /// `pg_is_in_recovery()`.
    pub in_recovery: Option<bool>,
    /// Primary only: `pg_current_wal_lsn()`.
    pub current_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_receive_lsn()` (flushed by the WAL receiver).
    pub receive_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<Lsn>,
    /// Replica only: `pg_last_xact_replay_timestamp()`: commit time of the last replayed
    /// transaction (not "now" on an idle primary: compare LSNs to know whether it is caught up).
    pub last_replay_timestamp: Option<DateTime<Utc>>,
    /// Primary only: one row per connected WAL sender (`pg_stat_replication`).
    pub replication: Vec<ReplicationPeer>,
    /// Replica only: `pg_stat_wal_receiver`, `None` when no receiver runs.
    pub wal_receiver: Option<WalReceiver>,
    /// The upstream a replica is configured to stream from (`primary_conninfo`).
    pub upstream: Option<Upstream>,
    pub data_dir: DataDirHealth,
    /// How postgres was restarted after crashes since the agent started.
    pub crash_restarts: u32,
    /// The last rejoin, if any: which path ran (rewind or re-clone) and when.
    pub last_rejoin: Option<RejoinReport>,
    /// Why the agent is fenced, when `role` is `fenced`.
    pub fence_reason: Option<String>,
    /// Last error of the supervisor or of an action, for humans.
    pub last_error: Option<String>,
    /// Why the SQL probe failed, when postgres should be up but could not be queried.
    pub probe_error: Option<String>,
    /// When this status was computed (agent clock).
    pub observed_at: DateTime<Utc>,
    /// Digest of the user parameters the agent has applied (written and reloaded), from its
    /// parameters file or `POST /v1/parameters`; `None` when it manages no parameters file.
    #[serde(default)]
    pub parameters_hash: Option<String>,
    /// Parameters whose new value waits for a server restart (`pg_settings.pending_restart`);
    /// `None` when postgres could not be asked.
    #[serde(default)]
    pub pending_restart: Option<Vec<String>>,
    /// The value each of `pending_restart` still runs with (`pg_settings.setting`, in the
    /// parameter's base unit), so that a controller can tell a raise from a lowering.
    #[serde(default)]
    pub pending_restart_running: Option<std::collections::BTreeMap<String, String>>,
    /// The lease-store-outage failsafe on this agent; `None` without lease fencing.
    #[serde(default)]
    pub failsafe: Option<crate::protocol::failsafe::FailsafeStatus>,
    /// The PostgreSQL major the agent runs postgres with (its binaries' `postgres --version`).
    #[serde(default)]
    pub postgres_major: Option<u32>,
    /// A major-version upgrade this agent ran when it started (`--upgrade-from`).
    #[serde(default)]
    pub major_upgrade: Option<MajorUpgradeReport>,
}

/// What the agent's major-version upgrade of its data directory did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MajorUpgradeReport {
    pub from: u32,
    pub to: u32,
    pub outcome: MajorUpgradeOutcome,
    /// pg_upgrade's own words when it refused or failed.
    #[serde(default)]
    pub message: Option<String>,
    /// How long pg_upgrade (check and upgrade) took.
    #[serde(default)]
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MajorUpgradeOutcome {
    /// The primary's data directory was upgraded with pg_upgrade and runs on the new major.
    Upgraded,
    /// A replica set its old data directory aside and was cloned from the upgraded primary.
    Recloned,
    /// `pg_upgrade --check` refused: nothing was changed; postgres runs on the old major.
    CheckFailed,
    /// pg_upgrade failed after its check: the old directory was restored; postgres runs on
    /// the old major.
    Failed,
}

/// Where a replica streams from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// Physical slot on the upstream (`primary_slot_name`), if any.
    pub slot: Option<String>,
}

/// Health of the data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataDirHealth {
    pub path: String,
    /// The directory exists.
    pub exists: bool,
    /// It contains `PG_VERSION` (an initialized cluster).
    pub initialized: bool,
    /// Contents of `PG_VERSION`.
    pub pg_version: Option<String>,
    /// `standby.signal` is present.
    pub standby_signal: bool,
    /// Free bytes on its filesystem.
    pub free_bytes: Option<u64>,
}

/// Which way a former primary was brought back as a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejoinPath {
    /// `pg_rewind` succeeded and the instance streams from the new primary.
    Rewind,
    /// `pg_rewind` failed or the rewound instance did not stream; it was re-cloned with
    /// `pg_basebackup` into a fresh directory, which then replaced the old one.
    Reclone,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejoinReport {
    pub path: RejoinPath,
    /// Why `pg_rewind` was not enough, when the path is `reclone`.
    pub rewind_failure: Option<String>,
    pub upstream: Upstream,
    pub finished_at: DateTime<Utc>,
}

/// `POST /v1/promote`: make a replica a primary (`pg_promote`, then a CHECKPOINT so the control
/// file and `pg_rewind` see the new timeline). Refused (409) unless the role is `replica`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Seconds to wait for the promotion to finish (default 60).
    #[serde(default)]
    pub wait_seconds: Option<u64>,
}

/// `POST /v1/follow`: stream from another primary. A running replica gets its `primary_conninfo`
/// rewritten and a reload (following the new timeline: `recovery_target_timeline = latest`); a
/// stopped or fenced instance is started as a standby. Refused (409) on a running primary: a
/// former primary must `rejoin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowRequest {
    pub host: String,
    pub port: u16,
    /// Physical slot to use on the new primary; default `pgrs_<name>`, created if missing.
    #[serde(default)]
    pub slot: Option<String>,
}

/// `POST /v1/rejoin`: turn a former primary (running, stopped or fenced) into a replica of
/// `host:port`: stop, CHECKPOINT on the new primary, `pg_rewind`, re-render the configuration,
/// start as a standby and verify it streams; else re-clone. The response's `rejoin` says which
/// path ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejoinRequest {
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub slot: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// SIGINT: roll back sessions, checkpoint, exit (bounded; escalates to immediate).
    #[default]
    Fast,
    /// SIGQUIT: exit at once, crash recovery at next start.
    Immediate,
}

/// `POST /v1/stop`: stop postgres and keep it stopped (role `stopped`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    #[serde(default)]
    pub mode: StopMode,
}

/// `POST /v1/fence`: immediate stop, role `fenced`, no restart until `follow` or `rejoin`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceRequest {
    /// Recorded in the status (`fence_reason`) and the logs.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/parameters`: the complete set of user parameters (name → value), replacing the
/// previous set. Agent-owned names are refused (409).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParametersRequest {
    pub parameters: std::collections::BTreeMap<String, String>,
}

/// Reply to every successful action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionResponse {
    /// What was done, for humans.
    pub message: String,
    /// Set by `rejoin`: which path ran.
    #[serde(default)]
    pub rejoin: Option<RejoinReport>,
    /// The status right after the action.
    pub status: AgentStatus,
}

/// `GET /healthz` and `GET /readyz` when the answer is yes (a no is `503` with an
/// [`ErrorResponse`] saying why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResponse {
    /// `ok`.
    pub status: String,
    /// The role postgres had at the agent's last look (`starting` while it is not up).
    pub role: Role,
    /// The role the agent drives towards.
    pub intended_role: Role,
    /// How old that look is, in milliseconds.
    pub observed_ms_ago: u64,
}

/// Body of every error reply (400, 401, 409, 413, 415, 500, 503).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

impl AgentStatus {
    /// What a status long poll waits for a change of: the role and the role the agent drives
    /// towards, whether postgres answers, the timeline, the upstream, fencing and crash
    /// restarts (not the LSNs, which move with every write).
    pub fn change_token(&self) -> String {
        let role = |r: Role| serde_json::to_string(&r).unwrap_or_default();
        format!(
            "{}/{}/{}/{}/{}/{}/{}",
            role(self.role),
            role(self.intended_role),
            self.postgres_up,
            self.timeline.map_or("-".to_string(), |t| t.to_string()),
            self.upstream
                .as_ref()
                .map_or("-".to_string(), |u| format!("{}:{}", u.host, u.port)),
            self.fence_reason.is_some(),
            self.crash_restarts,
        )
        .replace('"', "")
    }
}
