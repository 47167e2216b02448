//! The controller's HTTP API on loopback: the cluster status, a planned switchover, starting a
//! node, shutting down.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::control::{Platform as _, observe};
use crate::engine::{EngineInput, plan_switchover};
use crate::local::status::LocalStatus;

use super::nodes::start_node;
use super::{Shared, lock};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchoverBody {
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// The routes of the controller API (the lease service, `/metrics` and the dashboard are merged
/// in by the caller).
pub(super) fn router(shared: Arc<Shared>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/cluster", get(get_cluster))
        .route("/v1/switchover", post(post_switchover))
        .route("/v1/nodes/{name}/start", post(post_start))
        .route("/v1/shutdown", post(post_shutdown))
        .with_state(shared)
}

type ApiResult<T> = Result<Json<T>, (StatusCode, Json<ApiError>)>;

fn api_error(status: StatusCode, error: impl Into<String>) -> (StatusCode, Json<ApiError>) {
    (
        status,
        Json(ApiError {
            error: error.into(),
        }),
    )
}

async fn get_cluster(State(shared): State<Arc<Shared>>) -> ApiResult<LocalStatus> {
    lock(&shared.status).clone().map(Json).ok_or_else(|| {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller has not completed a round yet",
        )
    })
}

/// Asks every agent for its status now (3 s at most each) and rebuilds `input` from the
/// answers.
async fn refresh_for_switchover(shared: &Shared, input: &mut EngineInput) {
    let control = shared.control.clone();
    futures::future::join_all(
        shared
            .names
            .iter()
            .map(|name| control.poll(shared, name, Duration::from_secs(3))),
    )
    .await;
    let state = lock(&shared.last_state).clone();
    let addresses = shared
        .names
        .iter()
        .filter_map(|n| Some((n.clone(), shared.postgres_address(n)?)))
        .collect();
    let reports = control.reports();
    *input = observe::engine_input(
        control.now(),
        &shared.names,
        &addresses,
        &reports,
        input.lease.clone(),
        input.spec.clone(),
        &state,
    );
}

async fn post_switchover(
    State(shared): State<Arc<Shared>>,
    Json(body): Json<SwitchoverBody>,
) -> ApiResult<crate::engine::SwitchoverPlan> {
    let input = lock(&shared.last_input).clone();
    let Some(mut input) = input else {
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller has not completed a round yet",
        ));
    };
    if let Some(to) = &body.to
        && shared.node(to).is_none()
    {
        let known: Vec<&str> = shared
            .config
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        return Err(api_error(
            StatusCode::NOT_FOUND,
            format!("unknown node {to:?}; the nodes are: {}", known.join(", ")),
        ));
    }
    // Fresh positions before deciding: the last round's reports may be a few hundred ms old,
    // long enough to miss a node that just died or a replica that fell behind.
    refresh_for_switchover(&shared, &mut input).await;
    let plan = plan_switchover(&input, body.to.as_deref())
        .map_err(|e| api_error(StatusCode::CONFLICT, format!("switchover refused: {e}")))?;
    // The next round takes the plan into the loop's state (and persists it before acting).
    *lock(&shared.pending_switchover) = Some(plan.clone());
    shared.record(
        "info",
        "SwitchoverRequested",
        format!("switchover from {} to {} requested", plan.from, plan.to),
    );
    Ok(Json(plan))
}

async fn post_start(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    if shared.node(&name).is_none() {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            format!("unknown node {name:?}"),
        ));
    }
    start_node(&shared, &name, false)
        .await
        .map(|role| Json(serde_json::json!({ "node": name, "startedAs": role })))
        .map_err(|e| api_error(StatusCode::CONFLICT, e))
}

async fn post_shutdown(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    shared
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    shared.shutdown.notify_waiters();
    shared.shutdown.notify_one();
    Json(serde_json::json!({ "shuttingDown": true }))
}
