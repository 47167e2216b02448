//! What stands between a request and the supervisor: time limits, concurrency limits, the
//! body check (JSON, known fields, bounded values) and the JSON extractor whose rejections are
//! [`ErrorResponse`](crate::protocol::api::ErrorResponse)s naming what is wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use super::ApiError;
use crate::protocol::api::{
    FENCE_PATH, FOLLOW_PATH, FenceRequest, FollowRequest, MAX_BODY_BYTES, PARAMETERS_PATH,
    PROMOTE_PATH, ParametersRequest, PromoteRequest, REJOIN_PATH, RESTART_PATH, RejoinRequest,
    START_PATH, STOP_PATH, StopRequest,
};
use crate::protocol::failsafe::{
    ConfirmRequest, FAILSAFE_CONFIRM_PATH, FAILSAFE_MEMBERS_PATH, FailsafeMembersRequest,
};
use crate::protocol::statements::{
    CHECKPOINT_PATH, DROP_SLOTS_PATH, DropSlotsRequest, SUPERUSER_ACCESS_PATH,
    SYNCHRONOUS_STANDBY_NAMES_PATH, SuperuserAccessRequest, SynchronousStandbyNamesRequest,
};
use crate::protocol::validate::{EmptyRequest, FieldError, Validate};

/// Time limit of a probe (answered from memory).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time limit of a status read (its SQL is bounded at 2 s per query).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of an action (a rejoin may re-clone); the clients' own limit is the same. A
/// timed-out action is not cancelled: the supervisor finishes it, only the reply is lost.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(600);
/// Status reads served at once; more are refused with `503` (they never queue).
pub const MAX_CONCURRENT_STATUS: usize = 16;
/// Action requests in the agent at once (actions run one at a time; the others wait).
pub const MAX_CONCURRENT_ACTIONS: usize = 16;

/// A time limit on the requests of a router (`from_fn_with_state(limit, time_limit)`).
pub async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(%path, limit_ms = limit.as_millis() as u64, "request timed out");
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{path} took longer than {} s", limit.as_secs()),
            )
            .into_response()
        }
    }
}

/// At most `permits` requests at once; the next is refused at once with `503`.
#[derive(Clone)]
pub struct Limit {
    what: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
}

impl Limit {
    pub fn new(what: &'static str, max: usize) -> Self {
        Limit {
            what,
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

pub async fn concurrency_limit(
    State(limit): State<Limit>,
    request: Request,
    next: Next,
) -> Response {
    match limit.permits.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            tracing::debug!(what = limit.what, max = limit.max, "request refused: busy");
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "busy: {} {} requests already in progress; retry",
                    limit.max, limit.what
                ),
            )
            .into_response()
        }
    }
}

/// The request body as JSON of type `T`, bounded by [`Validate`]; every rejection is an
/// `ErrorResponse` naming what is wrong (`400`; `413` too large; `415` not JSON).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned + Validate,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state)
            .await
            .map_err(json_rejection)?;
        value.validate().map_err(field_error)?;
        Ok(ApiJson(value))
    }
}

/// A body that may be empty, or `{}`: `POST /v1/start` and `/v1/restart`.
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, bytes) = read_body(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoBody);
        }
        let request = Request::from_parts(parts, Body::from(bytes));
        ApiJson::<EmptyRequest>::from_request(request, state).await?;
        Ok(NoBody)
    }
}

fn field_error(error: FieldError) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, error.to_string())
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let (code, message) = match &rejection {
        JsonRejection::JsonDataError(error) => (
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", source_text(error)),
        ),
        JsonRejection::JsonSyntaxError(error) => (
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {}", source_text(error)),
        ),
        JsonRejection::MissingJsonContentType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON (Content-Type: application/json)".to_string(),
        ),
        JsonRejection::BytesRejection(_) => too_large_or_unreadable(&rejection),
        _ => (rejection.status(), rejection.body_text()),
    };
    ApiError(code, message)
}

/// The cause's message: serde's, with the field's path in front (`wait_seconds: invalid type`).
fn source_text(error: &dyn std::error::Error) -> String {
    match error.source() {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}

fn too_large_or_unreadable(rejection: &JsonRejection) -> (StatusCode, String) {
    body_rejection(rejection.status(), &rejection.body_text())
}

fn body_rejection(status: StatusCode, text: &str) -> (StatusCode, String) {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            format!("failed to read the request body: {text}"),
        )
    }
}

/// The whole body, bounded by the router's `DefaultBodyLimit` ([`MAX_BODY_BYTES`]).
async fn read_body(request: Request) -> Result<(axum::http::request::Parts, Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    let limited = Request::from_parts(parts.clone(), body);
    match Bytes::from_request(limited, &()).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(rejection) => {
            let (code, message) = body_rejection(rejection.status(), &rejection.body_text());
            Err(ApiError(code, message))
        }
    }
}

/// Checks the body of every action before anything else sees it (the promotion gate renews
/// the lease): a body that would be refused is refused here, and nothing runs.
pub async fn check_body(request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let (parts, bytes) = match read_body(request).await {
        Ok(read) => read,
        Err(error) => return error.into_response(),
    };
    let checked = {
        let request = || Request::from_parts(parts.clone(), Body::from(bytes.clone()));
        match path.as_str() {
            PROMOTE_PATH => parse::<PromoteRequest>(request()).await,
            FOLLOW_PATH => parse::<FollowRequest>(request()).await,
            REJOIN_PATH => parse::<RejoinRequest>(request()).await,
            STOP_PATH => parse::<StopRequest>(request()).await,
            FENCE_PATH => parse::<FenceRequest>(request()).await,
            PARAMETERS_PATH => parse::<ParametersRequest>(request()).await,
            FAILSAFE_MEMBERS_PATH => parse::<FailsafeMembersRequest>(request()).await,
            FAILSAFE_CONFIRM_PATH => parse::<ConfirmRequest>(request()).await,
            DROP_SLOTS_PATH => parse::<DropSlotsRequest>(request()).await,
            SUPERUSER_ACCESS_PATH => parse::<SuperuserAccessRequest>(request()).await,
            SYNCHRONOUS_STANDBY_NAMES_PATH => {
                parse::<SynchronousStandbyNamesRequest>(request()).await
            }
            START_PATH | RESTART_PATH | CHECKPOINT_PATH => {
                NoBody::from_request(request(), &()).await.map(drop)
            }
            _ => Ok(()),
        }
    };
    if let Err(error) = checked {
        tracing::warn!(%path, error = %error.1, "request refused");
        return error.into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn parse<T: DeserializeOwned + Validate>(request: Request) -> Result<(), ApiError> {
    ApiJson::<T>::from_request(request, &()).await.map(drop)
}
