//! The lease over HTTP, for local mode where agents are separate processes: the `pgrs local`
//! controller serves a [`LeaseStore`] on loopback ([`lease_router`]) and agents use
//! [`HttpLeaseStore`].
//!
//! `GET /v1/lease`; `POST /v1/lease/{renew,acquire,release}` with `{"holder", "expectedVersion"}`.
//! 200 returns the record; 409 returns `{"kind": "conflict"|"notHolder", "current": record}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::lease::{LeaseError, LeaseRecord, LeaseStore};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRequest {
    holder: String,
    #[serde(default)]
    expected_version: Option<String>,
    /// `/v1/lease/failsafe-members` only.
    #[serde(default)]
    failsafe_members: Option<Vec<String>>,
    /// When the sender gives up waiting (Unix milliseconds): a request that reaches the
    /// service later (it waited in a frozen server's backlog) is not applied, so that a
    /// renewal its sender abandoned — and perhaps fenced on — cannot extend the lease.
    #[serde(default)]
    deadline_unix_ms: Option<i64>,
}

impl LeaseRequest {
    fn check_deadline(&self) -> Result<(), ApiError> {
        let now = chrono::Utc::now().timestamp_millis();
        match self.deadline_unix_ms {
            Some(deadline) if now > deadline => Err(ApiError(LeaseError::Unavailable(format!(
                "the request of {} arrived {} ms after its sender gave up on it: not applied",
                self.holder,
                now - deadline
            )))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseErrorBody {
    kind: String,
    message: String,
    #[serde(default)]
    expected: Option<String>,
    #[serde(default)]
    current: Option<LeaseRecord>,
}

struct ApiError(LeaseError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.0.to_string();
        let (status, body) = match self.0 {
            LeaseError::Conflict { expected, current } => (
                StatusCode::CONFLICT,
                LeaseErrorBody {
                    kind: "conflict".to_string(),
                    message,
                    expected: Some(expected),
                    current: Some(*current),
                },
            ),
            LeaseError::NotHolder { current, .. } => (
                StatusCode::CONFLICT,
                LeaseErrorBody {
                    kind: "notHolder".to_string(),
                    message,
                    expected: None,
                    current: Some(*current),
                },
            ),
            // Not produced by the stores served here (they have no incarnations).
            LeaseError::OtherIncarnation { .. } => (
                StatusCode::CONFLICT,
                LeaseErrorBody {
                    kind: "otherIncarnation".to_string(),
                    message,
                    expected: None,
                    current: None,
                },
            ),
            LeaseError::Unavailable(_) | LeaseError::Persist { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                LeaseErrorBody {
                    kind: "unavailable".to_string(),
                    message,
                    expected: None,
                    current: None,
                },
            ),
        };
        (status, Json(body)).into_response()
    }
}

type Store = Arc<dyn LeaseStore>;

async fn get_lease(State(store): State<Store>) -> Result<Json<LeaseRecord>, ApiError> {
    store.get().await.map(Json).map_err(ApiError)
}

async fn renew_lease(
    State(store): State<Store>,
    Json(request): Json<LeaseRequest>,
) -> Result<Json<LeaseRecord>, ApiError> {
    request.check_deadline()?;
    store
        .renew(&request.holder)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn acquire_lease(
    State(store): State<Store>,
    Json(request): Json<LeaseRequest>,
) -> Result<Json<LeaseRecord>, ApiError> {
    request.check_deadline()?;
    let expected = request.expected_version.unwrap_or_default();
    store
        .acquire(&request.holder, &expected)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn release_lease(
    State(store): State<Store>,
    Json(request): Json<LeaseRequest>,
) -> Result<Json<LeaseRecord>, ApiError> {
    request.check_deadline()?;
    store
        .release(&request.holder)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn set_failsafe_members(
    State(store): State<Store>,
    Json(request): Json<LeaseRequest>,
) -> Result<Json<LeaseRecord>, ApiError> {
    request.check_deadline()?;
    store
        .set_failsafe_members(&request.holder, request.failsafe_members)
        .await
        .map(Json)
        .map_err(ApiError)
}

/// The lease service routes, to be merged into the controller's HTTP server.
pub fn lease_router(store: Arc<dyn LeaseStore>) -> Router {
    Router::new()
        .route("/v1/lease", get(get_lease))
        .route("/v1/lease/renew", post(renew_lease))
        .route("/v1/lease/acquire", post(acquire_lease))
        .route("/v1/lease/release", post(release_lease))
        .route("/v1/lease/failsafe-members", post(set_failsafe_members))
        .with_state(store)
}

/// A [`LeaseStore`] reached over HTTP.
#[derive(Clone)]
pub struct HttpLeaseStore {
    base_url: String,
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpLeaseStore {
    /// `base_url` like `http://127.0.0.1:7000`; every request gives up after `timeout`, so that
    /// a hung store never delays a fencing decision.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, LeaseError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| {
                LeaseError::Unavailable(format!("failed to build the HTTP client: {e}"))
            })?;
        Ok(HttpLeaseStore {
            base_url: base_url.trim_end_matches('/').to_string(),
            client,
            timeout,
        })
    }

    /// Unix milliseconds after which this client no longer waits for an answer.
    fn deadline(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.timeout.as_millis() as i64
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<LeaseRecord, LeaseError> {
        let response = request.send().await.map_err(|e| {
            LeaseError::Unavailable(format!("failed to {what} at {}: {e}", self.base_url))
        })?;
        let status = response.status();
        if status.is_success() {
            return response.json::<LeaseRecord>().await.map_err(|e| {
                LeaseError::Unavailable(format!("failed to read the {what} answer: {e}"))
            });
        }
        let body = response.json::<LeaseErrorBody>().await.map_err(|e| {
            LeaseError::Unavailable(format!(
                "failed to {what}: HTTP {status}, unreadable body: {e}"
            ))
        })?;
        match (body.kind.as_str(), body.current) {
            ("conflict", Some(current)) => Err(LeaseError::Conflict {
                expected: body.expected.unwrap_or_default(),
                current: Box::new(current),
            }),
            ("notHolder", Some(current)) => Err(LeaseError::NotHolder {
                requester: String::new(),
                current: Box::new(current),
            }),
            _ => Err(LeaseError::Unavailable(format!(
                "failed to {what}: HTTP {status}: {}",
                body.message
            ))),
        }
    }

    fn post(
        &self,
        path: &str,
        holder: &str,
        expected_version: Option<&str>,
    ) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base_url))
            .json(&LeaseRequest {
                holder: holder.to_string(),
                expected_version: expected_version.map(str::to_string),
                failsafe_members: None,
                deadline_unix_ms: Some(self.deadline()),
            })
    }
}

fn with_requester(
    result: Result<LeaseRecord, LeaseError>,
    holder: &str,
) -> Result<LeaseRecord, LeaseError> {
    result.map_err(|e| match e {
        LeaseError::NotHolder { current, .. } => LeaseError::NotHolder {
            requester: holder.to_string(),
            current,
        },
        other => other,
    })
}

impl LeaseStore for HttpLeaseStore {
    fn get(&self) -> BoxFuture<'_, Result<LeaseRecord, LeaseError>> {
        Box::pin(self.send(
            self.client.get(format!("{}/v1/lease", self.base_url)),
            "read the lease",
        ))
    }

    fn renew<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            with_requester(
                self.send(
                    self.post("/v1/lease/renew", holder, None),
                    "renew the lease",
                )
                .await,
                holder,
            )
        })
    }

    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        expected_version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            self.send(
                self.post("/v1/lease/acquire", holder, Some(expected_version)),
                "acquire the lease",
            )
            .await
        })
    }

    fn set_failsafe_members<'a>(
        &'a self,
        holder: &'a str,
        members: Option<Vec<String>>,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            let request = self
                .client
                .post(format!("{}/v1/lease/failsafe-members", self.base_url))
                .json(&LeaseRequest {
                    holder: holder.to_string(),
                    expected_version: None,
                    failsafe_members: members,
                    deadline_unix_ms: Some(self.deadline()),
                });
            with_requester(
                self.send(request, "write the failsafe member list").await,
                holder,
            )
        })
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            with_requester(
                self.send(
                    self.post("/v1/lease/release", holder, None),
                    "release the lease",
                )
                .await,
                holder,
            )
        })
    }
}
