//! The agent's HTTP server (axum). Paths and bodies are in [`crate::protocol::api`].
//!
//! - `GET /healthz`, `GET /readyz` ([`health`]): the kubelet's probes, open, answered from the
//!   agent's last look at postgres (no SQL per request), 2 s limit.
//! - `GET /v1/status` ([`status`]): behind the bearer token, probed live, at most
//!   [`guard::MAX_CONCURRENT_STATUS`] at once (more get `503` at once), 10 s limit.
//! - `POST /v1/checkpoint`, `/v1/synchronous-standby-names`, `/v1/drop-slots`,
//!   `/v1/superuser-access` ([`statements`]): actions
//!   like the others, run on a local session of the agent's own, not queued behind the
//!   supervisor's actions.
//! - every action (`POST`): behind the token, its body checked ([`guard::check_body`]: JSON,
//!   no unknown field, every value in bounds) before the promotion gate or the supervisor see
//!   it, at most [`guard::MAX_CONCURRENT_ACTIONS`] at once, 600 s limit.
//!
//! The token is checked first: a request without it costs a header comparison, whatever it
//! asks. Bodies are read up to [`MAX_BODY_BYTES`]. Every error is an [`ErrorResponse`].

mod guard;
#[cfg(test)]
mod guard_tests;
pub mod health;
mod statements;
mod status;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::agent::rotation::RotatingSecret;
use crate::agent::supervisor::{ActionError, ActionOutcome, SupervisorHandle};
use crate::coordination::Failsafe;
use crate::protocol::api::{
    ActionResponse, AgentStatus, ErrorResponse, FENCE_PATH, FOLLOW_PATH, FenceRequest,
    FollowRequest, HEALTHZ_PATH, MAX_BODY_BYTES, PARAMETERS_PATH, PROMOTE_PATH, ParametersRequest,
    PromoteRequest, READYZ_PATH, REJOIN_PATH, RESTART_PATH, RejoinRequest, Role, START_PATH,
    STATUS_PATH, STOP_PATH, StopRequest, Upstream,
};
use crate::protocol::failsafe::{
    ConfirmRequest, ConfirmResponse, FAILSAFE_CONFIRM_PATH, FAILSAFE_MEMBERS_PATH,
    FailsafeMembersRequest, FailsafeStatus,
};
use crate::protocol::statements::{
    CHECKPOINT_PATH, DROP_SLOTS_PATH, SUPERUSER_ACCESS_PATH, SYNCHRONOUS_STANDBY_NAMES_PATH,
};
use guard::{ApiJson, Limit, NoBody};
pub use status::build_status;

#[derive(Clone)]
pub struct HttpState {
    pub supervisor: SupervisorHandle,
    /// The bearer token: the current one, or the previous one for
    /// [`crate::agent::rotation::ROTATION_WINDOW`] after a rotation.
    pub token: RotatingSecret,
    /// With lease fencing: the lease-store-outage failsafe.
    pub failsafe: Option<Arc<Failsafe>>,
    /// The agent's last look at postgres, kept by [`health::spawn`]'s loop.
    pub health: health::Health,
}

/// The agent's router. `gate` wraps the action routes (inside the token and body checks):
/// lease fencing's promotion gate, or nothing.
pub fn router(state: HttpState, gate: impl FnOnce(Router) -> Router) -> Router {
    let limit = |limit| middleware::from_fn_with_state(limit, guard::time_limit);
    let token = || middleware::from_fn_with_state(state.clone(), require_token);
    let probes = Router::new()
        .route(HEALTHZ_PATH, get(health::healthz))
        .route(READYZ_PATH, get(health::readyz))
        .with_state(state.clone())
        .layer(limit(guard::PROBE_TIMEOUT));
    let status = Router::new()
        .route(STATUS_PATH, get(status::status))
        .with_state(state.clone())
        .layer(middleware::from_fn_with_state(
            Limit::new("status", guard::MAX_CONCURRENT_STATUS),
            guard::concurrency_limit,
        ))
        .layer(token())
        .layer(limit(guard::STATUS_TIMEOUT));
    let actions = Router::new()
        .route(PROMOTE_PATH, post(promote))
        .route(FOLLOW_PATH, post(follow))
        .route(REJOIN_PATH, post(rejoin))
        .route(STOP_PATH, post(stop))
        .route(START_PATH, post(start))
        .route(FENCE_PATH, post(fence))
        .route(RESTART_PATH, post(restart))
        .route(PARAMETERS_PATH, post(parameters))
        .route(FAILSAFE_MEMBERS_PATH, post(failsafe_members))
        .route(FAILSAFE_CONFIRM_PATH, post(failsafe_confirm))
        .route(CHECKPOINT_PATH, post(statements::checkpoint))
        .route(
            SYNCHRONOUS_STANDBY_NAMES_PATH,
            post(statements::synchronous_standby_names),
        )
        .route(DROP_SLOTS_PATH, post(statements::drop_slots))
        .route(SUPERUSER_ACCESS_PATH, post(statements::superuser_access))
        .with_state(state.clone());
    let actions = gate(actions)
        .layer(middleware::from_fn(guard::check_body))
        .layer(middleware::from_fn_with_state(
            Limit::new("action", guard::MAX_CONCURRENT_ACTIONS),
            guard::concurrency_limit,
        ))
        .layer(token())
        .layer(limit(guard::ACTION_TIMEOUT));
    Router::new()
        .merge(probes)
        .merge(status)
        .merge(actions)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such path: {}", uri.path()),
    )
}

/// An error reply: the status and the [`ErrorResponse`] message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

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
        Some(token) if state.token.accepts(token.as_bytes()) => next.run(request).await,
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response(),
    }
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
    ApiJson(request): ApiJson<FailsafeMembersRequest>,
) -> Result<Json<FailsafeStatus>, ApiError> {
    Ok(Json(state.failsafe()?.set_members(request)))
}

/// A primary serving while the lease store is unreachable asks whether this member follows it.
async fn failsafe_confirm(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<ConfirmRequest>,
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
    ApiJson(request): ApiJson<PromoteRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    // Bounded by `PromoteRequest::validate` (at most an hour).
    let wait = std::time::Duration::from_secs(request.wait_seconds.unwrap_or(60));
    let result = state.supervisor.promote(wait).await;
    respond(&state, result).await
}

async fn follow(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<FollowRequest>,
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
    ApiJson(request): ApiJson<RejoinRequest>,
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
    ApiJson(request): ApiJson<StopRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.stop(request.mode).await;
    respond(&state, result).await
}

async fn start(
    State(state): State<HttpState>,
    _: NoBody,
) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.start().await;
    respond(&state, result).await
}

async fn fence(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<FenceRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let reason = request
        .reason
        .unwrap_or_else(|| "fence requested over HTTP".into());
    let result = state.supervisor.fence(&reason).await;
    respond(&state, result).await
}

async fn restart(
    State(state): State<HttpState>,
    _: NoBody,
) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.restart().await;
    respond(&state, result).await
}

async fn parameters(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<ParametersRequest>,
) -> Result<Json<ActionResponse>, ApiError> {
    let result = state.supervisor.apply_parameters(request.parameters).await;
    respond(&state, result).await
}
