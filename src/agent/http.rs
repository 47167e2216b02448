//! The agent's HTTP server (axum): `GET /v1/status` open to all, every action behind the
//! bearer token. Paths and bodies are in [`crate::protocol::api`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;

use crate::agent::instance::Secret;
use crate::agent::supervisor::{ActionError, ActionOutcome, Phase, SupervisorHandle};
use crate::coordination::Failsafe;
use crate::protocol::api::{
    ActionResponse, AgentStatus, DataDirHealth, ErrorResponse, FENCE_PATH, FOLLOW_PATH,
    FenceRequest, FollowRequest, PROMOTE_PATH, PromoteRequest, REJOIN_PATH, RejoinRequest, Role,
    START_PATH, STATUS_PATH, STOP_PATH, StopRequest, Upstream,
};
use crate::protocol::failsafe::{
    ConfirmRequest, ConfirmResponse, FAILSAFE_CONFIRM_PATH, FAILSAFE_MEMBERS_PATH,
    FailsafeMembersRequest, FailsafeStatus,
};

#[derive(Clone)]
pub struct HttpState {
    pub supervisor: SupervisorHandle,
    pub token: Arc<Secret>,
    /// With lease fencing: the lease-store-outage failsafe.
    pub failsafe: Option<Arc<Failsafe>>,
}

pub fn router(state: HttpState) -> Router {
    let actions = Router::new()
        .route(PROMOTE_PATH, post(promote))
        .route(FOLLOW_PATH, post(follow))
        .route(REJOIN_PATH, post(rejoin))
        .route(STOP_PATH, post(stop))
        .route(START_PATH, post(start))
        .route(FENCE_PATH, post(fence))
        .route(crate::protocol::api::RESTART_PATH, post(restart))
        .route(crate::protocol::api::PARAMETERS_PATH, post(parameters))
        .route(FAILSAFE_MEMBERS_PATH, post(failsafe_members))
        .route(FAILSAFE_CONFIRM_PATH, post(failsafe_confirm))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(STATUS_PATH, get(status))
        .merge(actions)
        .with_state(state)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorResponse { error: self.1 })).into_response()
    }
}

impl From<ActionError> for ApiError {
    fn from(error: ActionError) -> Self {
        let code = if error.is_refusal() {
            StatusCode::CONFLICT
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError(code, error.to_string())
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn tokens_match(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn require_token(
    State(state): State<HttpState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(token) if tokens_match(token.as_bytes(), state.token.expose().as_bytes()) => {
            next.run(request).await
        }
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response(),
    }
}

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

async fn status(State(state): State<HttpState>) -> Json<AgentStatus> {
    Json(state.status().await)
}

impl HttpState {
    async fn status(&self) -> AgentStatus {
        let mut status = build_status(&self.supervisor).await;
        status.failsafe = self.failsafe.as_ref().map(|f| f.status());
        status
    }

    fn failsafe(&self) -> Result<&Failsafe, ApiError> {
        self.failsafe.as_deref().ok_or_else(|| {
            ApiError(
                StatusCode::CONFLICT,
                "this agent runs without lease fencing: no failsafe".into(),
            )
        })
    }
}

/// The controller's member list and switch.
async fn failsafe_members(
    State(state): State<HttpState>,
    Json(request): Json<FailsafeMembersRequest>,
) -> Result<Json<FailsafeStatus>, ApiError> {
    Ok(Json(state.failsafe()?.set_members(request)))
}

/// A primary serving while the lease store is unreachable asks whether this member follows it.
async fn failsafe_confirm(
    State(state): State<HttpState>,
    Json(request): Json<ConfirmRequest>,
) -> Result<Json<ConfirmResponse>, ApiError> {
    let failsafe = state.failsafe()?;
    let follows = follows(&state.supervisor.state(), &request);
    failsafe
        .confirm(&request, follows)
        .map(Json)
        .map_err(|reason| ApiError(StatusCode::CONFLICT, reason))
}

/// Whether this instance follows the primary at `request.host:port`: meant to be a replica of
/// exactly that upstream, with no promotion signalled.
fn follows(
    state: &crate::agent::supervisor::SupervisorState,
    request: &ConfirmRequest,
) -> Result<(), String> {
    if state.intended_role != Role::Replica || state.promotion_pending {
        return Err(format!(
            "not a replica (intended role {:?}, promotion pending: {})",
            state.intended_role, state.promotion_pending
        ));
    }
    match &state.upstream {
        Some(upstream) if upstream.host == request.host && upstream.port == request.port => Ok(()),
        Some(upstream) => Err(format!(
            "follows {}:{}, not {} at {}:{}",
            upstream.host, upstream.port, request.primary, request.host, request.port
        )),
        None => Err("has no upstream".into()),
    }
}

async fn respond(
    state: &HttpState,
    result: Result<ActionOutcome, ActionError>,
) -> Result<Json<ActionResponse>, ApiError> {
    let outcome = result?;
    Ok(Json(ActionResponse {
        message: outcome.message,
        rejoin: outcome.rejoin,
        status: state.status().await,
    }))
}

async fn promote(
    State(state): State<HttpState>,
    Json(request): Json<PromoteRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let wait = Duration::from_secs(request.wait_seconds.unwrap_or(60));
    let result = state.supervisor.promote(wait).await;
    respond(&state, result).await
}

async fn follow(
    State(state): State<HttpState>,
    Json(request): Json<FollowRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let upstream = Upstream {
        host: request.host,
        port: request.port,
        slot: request.slot,
    };
    let result = state.supervisor.follow(upstream).await;
    respond(&state, result).await
}

async fn rejoin(
    State(state): State<HttpState>,
    Json(request): Json<RejoinRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let upstream = Upstream {
        host: request.host,
        port: request.port,
        slot: request.slot,
    };
    let result = state.supervisor.rejoin(upstream).await;
    respond(&state, result).await
}

async fn stop(
    State(state): State<HttpState>,
    Json(request): Json<StopRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.stop(request.mode).await;
    respond(&state, result).await
}

async fn start(State(state): State<HttpState>) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.start().await;
    respond(&state, result).await
}

async fn fence(
    State(state): State<HttpState>,
    Json(request): Json<FenceRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let reason = request
        .reason
        .unwrap_or_else(|| "fence requested over HTTP".into());
    let result = state.supervisor.fence(&reason).await;
    respond(&state, result).await
}

async fn restart(State(state): State<HttpState>) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.restart().await;
    respond(&state, result).await
}

async fn parameters(
    State(state): State<HttpState>,
    Json(request): Json<crate::protocol::api::ParametersRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.apply_parameters(request.parameters).await;
    respond(&state, result).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"abc", b"abc"));
        assert!(!tokens_match(b"abd", b"abc"));
        assert!(!tokens_match(b"ab", b"abc"));
    }
}
