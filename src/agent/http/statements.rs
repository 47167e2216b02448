//! `POST /v1/checkpoint` and `POST /v1/synchronous-standby-names`
//! ([`crate::protocol::statements`]): statements the controllers once ran over a remote
//! superuser session, run here on a session of the agent's own, over the local socket, so that
//! no controller needs a superuser login to the instances. Not queued behind the supervisor's
//! actions (a rejoin may take minutes; a quorum change must not wait for it); each is bounded.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::agent::supervisor::Phase;
use crate::postgres::slots::{self, SlotError};
use crate::postgres::{probe, promote, sql};
use crate::protocol::statements::{
    CHECKPOINT_LIMIT, DropSlotsRequest, DropSlotsResponse, SYNC_NAMES_LIMIT, StatementResponse,
    SuperuserAccessRequest, SynchronousStandbyNamesRequest,
};

use super::guard::{ApiJson, NoBody};
use super::{ApiError, HttpState};

/// How long opening the local session may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a session to the local postgres, refusing (409) when the supervisor does not run it.
async fn local_session(state: &HttpState) -> Result<tokio_postgres::Client, ApiError> {
    if state.supervisor.state().phase != Phase::Running {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "postgres is not running".into(),
        ));
    }
    let target = state.supervisor.config().local_target();
    probe::connect(&target, CONNECT_TIMEOUT)
        .await
        .map_err(|error| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("failed to open a local session: {error}"),
            )
        })
}

/// Runs `work` within `limit`; past it, `503` (the statement may still finish in postgres).
async fn bounded<F, E>(what: &str, limit: Duration, work: F) -> Result<Duration, ApiError>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(error)) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            error.to_string(),
        )),
        Err(_) => {
            tracing::warn!(
                what,
                limit_ms = limit.as_millis() as u64,
                "statement timed out"
            );
            Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{what} took longer than {} s", limit.as_secs()),
            ))
        }
    }
}

fn done(message: String, elapsed: Duration) -> Json<StatementResponse> {
    Json(StatementResponse {
        message,
        elapsed_ms: elapsed.as_millis() as u64,
    })
}

pub(super) async fn checkpoint(
    State(state): State<HttpState>,
    _: NoBody,
) -> Result<Json<StatementResponse>, ApiError> {
    let client = local_session(&state).await?;
    let elapsed = bounded("CHECKPOINT", CHECKPOINT_LIMIT, promote::checkpoint(&client)).await?;
    tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "checkpoint done");
    Ok(done("checkpoint done".into(), elapsed))
}

pub(super) async fn synchronous_standby_names(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<SynchronousStandbyNamesRequest>,
) -> Result<Json<StatementResponse>, ApiError> {
    let value = request.value();
    let client = local_session(&state).await?;
    let elapsed = bounded(
        "setting synchronous_standby_names",
        SYNC_NAMES_LIMIT,
        sql::set_synchronous_standby_names(&client, &value),
    )
    .await?;
    tracing::info!(%value, elapsed_ms = elapsed.as_millis() as u64, "synchronous_standby_names set");
    Ok(done(
        format!("synchronous_standby_names = '{value}'"),
        elapsed,
    ))
}

/// Drops the slots of removed instances: `409` while one of them is active (its standby still
/// streams; the controller retries), `500` on any other failure.
pub(super) async fn drop_slots(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<DropSlotsRequest>,
) -> Result<Json<DropSlotsResponse>, ApiError> {
    let client = local_session(&state).await?;
    let work = slots::drop_removed_slots(&client, &request.slots);
    let dropped = match tokio::time::timeout(SYNC_NAMES_LIMIT, work).await {
        Ok(Ok(dropped)) => dropped,
        Ok(Err(error @ SlotError::StillActive { .. })) => {
            return Err(ApiError(StatusCode::CONFLICT, error.to_string()));
        }
        Ok(Err(error)) => {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                error.to_string(),
            ));
        }
        Err(_) => {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "dropping slots took longer than {} s",
                    SYNC_NAMES_LIMIT.as_secs()
                ),
            ));
        }
    };
    if !dropped.is_empty() {
        tracing::info!(
            ?dropped,
            "dropped the replication slots of removed instances"
        );
    }
    Ok(Json(DropSlotsResponse { dropped }))
}

/// Allows or refuses remote superuser logins: `pg_hba.conf` rendered again and postgres
/// reloaded (new connections see it; established ones are not cut). Works with postgres down
/// too (the next start reads the file).
pub(super) async fn superuser_access(
    State(state): State<HttpState>,
    ApiJson(request): ApiJson<SuperuserAccessRequest>,
) -> Result<Json<StatementResponse>, ApiError> {
    let started = Instant::now();
    let config = state.supervisor.config();
    let message = if request.enabled {
        "remote superuser logins allowed"
    } else {
        "remote superuser logins refused"
    };
    if !config.superuser_access.set(request.enabled) {
        return Ok(done(format!("{message} (unchanged)"), started.elapsed()));
    }
    let failed = |what: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, what);
    if config.data_dir.join("PG_VERSION").is_file() {
        crate::agent::instance::write_pg_hba(config, &config.data_dir)
            .map_err(|e| failed(format!("failed to write pg_hba.conf: {e}")))?;
        state
            .supervisor
            .reload_files()
            .map_err(|e| failed(format!("failed to signal postgres to reload: {e}")))?;
    }
    tracing::info!(enabled = request.enabled, "{message}");
    Ok(done(message.into(), started.elapsed()))
}
