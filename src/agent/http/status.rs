//! `GET /v1/status`: the status document, probed live on the supervisor's kept session; with
//! `?wait_for_change=<token>&timeout_ms=<n>` a long poll that answers as soon as the status'
//! change token differs (a promotion or demotion finished) or after at most 3 s.

use std::path::Path;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::Utc;

use super::{ApiError, HttpState};
use crate::agent::supervisor::{Phase, SupervisorHandle};
use crate::protocol::api::{AgentStatus, DataDirHealth, Role, STATUS_WAIT_MAX};

fn data_dir_health(path: &Path) -> DataDirHealth {
    let free_bytes = nix::sys::statvfs::statvfs(path)
        .ok()
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()));
    DataDirHealth {
        path: path.display().to_string(),
        exists: path.is_dir(),
        initialized: path.join("PG_VERSION").is_file(),
        pg_version: std::fs::read_to_string(path.join("PG_VERSION"))
            .ok()
            .map(|v| v.trim().to_string()),
        standby_signal: path.join("standby.signal").is_file(),
        free_bytes,
    }
}

/// Builds the status document, probing postgres live when it should be running.
pub async fn build_status(supervisor: &SupervisorHandle) -> AgentStatus {
    let state = supervisor.state();
    let config = supervisor.config();
    let mut status = AgentStatus {
        name: config.name().to_string(),
        cluster: config.cluster.clone(),
        role: match state.phase {
            Phase::Fenced => Role::Fenced,
            Phase::Stopped => Role::Stopped,
            Phase::Starting | Phase::Running => Role::Starting,
        },
        intended_role: state.intended_role,
        postgres_up: false,
        postgres_pid: state.pid,
        postgres_port: config.settings.port,
        system_identifier: state.system_identifier.clone(),
        timeline: None,
        in_recovery: None,
        current_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        last_replay_timestamp: None,
        replication: Vec::new(),
        wal_receiver: None,
        upstream: state.upstream.clone(),
        data_dir: data_dir_health(&config.data_dir),
        crash_restarts: state.crash_restarts,
        last_rejoin: state.last_rejoin.clone(),
        fence_reason: state.fence_reason.clone(),
        last_error: state.last_error.clone(),
        probe_error: None,
        observed_at: Utc::now(),
        parameters_hash: state.parameters_hash.clone(),
        pending_restart: None,
        pending_restart_running: None,
        failsafe: None,
        postgres_major: Some(config.binaries.major()),
        major_upgrade: state.major_upgrade.clone(),
    };
    if state.phase != Phase::Running {
        return status;
    }
    match supervisor.probe(Duration::from_secs(2)).await {
        Ok(probe) => {
            status.postgres_up = true;
            status.role = if probe.in_recovery {
                Role::Replica
            } else {
                Role::Primary
            };
            status.system_identifier = Some(probe.system_identifier);
            status.timeline = probe.timeline;
            status.in_recovery = Some(probe.in_recovery);
            status.current_lsn = probe.current_lsn;
            status.receive_lsn = probe.receive_lsn;
            status.replay_lsn = probe.replay_lsn;
            status.last_replay_timestamp = probe.last_replay_timestamp;
            status.replication = probe.replication;
            status.wal_receiver = probe.wal_receiver;
            if let Ok(pending) = supervisor.pending_restart(Duration::from_secs(2)).await {
                status.pending_restart = Some(pending.iter().map(|(n, _)| n.clone()).collect());
                status.pending_restart_running = Some(pending.into_iter().collect());
            }
        }
        Err(error) => status.probe_error = Some(error.to_string()),
    }
    status
}

/// `?wait_for_change=<token>&timeout_ms=<n>`: a long poll (see [`AgentStatus::change_token`]).
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct StatusQuery {
    wait_for_change: Option<String>,
    timeout_ms: Option<u64>,
}

/// How often a long poll looks again (a status is one SQL round trip on the kept session).
const LONG_POLL_INTERVAL: Duration = Duration::from_millis(20);

pub(super) async fn status(
    State(state): State<HttpState>,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<AgentStatus>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid status query: {}", rejection.body_text()),
        )
    })?;
    let mut status = state.status().await;
    let Some(token) = query.wait_for_change else {
        return Ok(Json(status));
    };
    let wait = Duration::from_millis(query.timeout_ms.unwrap_or(0)).min(STATUS_WAIT_MAX);
    let deadline = tokio::time::Instant::now() + wait;
    while status.change_token() == token && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(LONG_POLL_INTERVAL).await;
        status = state.status().await;
    }
    Ok(Json(status))
}
