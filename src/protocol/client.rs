//! HTTP client of the agent API (see [`crate::protocol::api`]), used by local mode, the operator
//! and tests.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::api::{
    ActionResponse, AgentStatus, ErrorResponse, FENCE_PATH, FOLLOW_PATH, FenceRequest,
    FollowRequest, HEALTHZ_PATH, PROMOTE_PATH, ProbeResponse, PromoteRequest, READYZ_PATH,
    REJOIN_PATH, RejoinRequest, START_PATH, STATUS_PATH, STOP_PATH, StopRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to reach agent at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("agent at {url} answered {status}: {message}")]
    Api {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error("failed to decode agent reply from {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to build HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

impl ClientError {
    /// The HTTP status when the agent answered with an error (400, 401, 409, 500, 503, …).
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client for one agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentClient {
    base_url: String,
    token: Option<String>,
    /// The token before a rotation: tried once when the agent answers 401 to `token` (its
    /// Secret volume may not show the new token yet).
    fallback_token: Option<String>,
    http: reqwest::Client,
    /// Long actions (rejoin with a re-clone) need a longer timeout than a status read.
    action_timeout: Duration,
}

impl AgentClient {
    /// `base_url` like `http://127.0.0.1:8008`; `token` is sent as a bearer token on the status
    /// and on actions (without one, only the probes answer).
    pub fn new(base_url: impl Into<String>, token: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(ClientError::Build)?;
        Ok(AgentClient {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            token,
            fallback_token: None,
            http,
            action_timeout: Duration::from_secs(600),
        })
    }

    /// A client over `http`, shared between agents (e.g. one pinned to the cluster CA: its
    /// connections are kept across calls).
    pub fn with_http(
        base_url: impl Into<String>,
        token: Option<String>,
        http: reqwest::Client,
    ) -> Self {
        AgentClient {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            token,
            fallback_token: None,
            http,
            action_timeout: Duration::from_secs(600),
        }
    }

    /// The previous token, tried once on a 401 (a token rotation in progress).
    pub fn with_fallback_token(mut self, previous: Option<String>) -> Self {
        self.fallback_token = previous;
        self
    }

    /// Overrides the timeout of action requests (default 600 s).
    pub fn with_action_timeout(mut self, timeout: Duration) -> Self {
        self.action_timeout = timeout;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET /v1/status` (with the token, like actions), with a 5 s timeout.
    pub async fn status(&self) -> Result<AgentStatus, ClientError> {
        let url = format!("{}{}", self.base_url, STATUS_PATH);
        self.send_authorized(url.clone(), || {
            self.http.get(&url).timeout(Duration::from_secs(5))
        })
        .await
    }

    /// `GET /v1/status?wait_for_change=<token>&timeout_ms=<wait>`: a long poll that the agent
    /// answers as soon as its status' [`AgentStatus::change_token`] differs from `token`, or
    /// after `wait` (capped at [`crate::protocol::api::STATUS_WAIT_MAX`]) with the status as
    /// it is. An agent without long polls answers at once.
    pub async fn status_on_change(
        &self,
        token: &str,
        wait: Duration,
    ) -> Result<AgentStatus, ClientError> {
        use crate::protocol::api::{STATUS_WAIT_MAX, STATUS_WAIT_QUERY, STATUS_WAIT_TIMEOUT_QUERY};
        let wait = wait.min(STATUS_WAIT_MAX);
        let url = format!("{}{}", self.base_url, STATUS_PATH);
        let query = [
            (STATUS_WAIT_QUERY, token.to_string()),
            (STATUS_WAIT_TIMEOUT_QUERY, wait.as_millis().to_string()),
        ];
        self.send_authorized(url.clone(), || {
            self.http
                .get(&url)
                .query(&query)
                .timeout(wait + Duration::from_secs(5))
        })
        .await
    }

    /// `GET /healthz` (no token), with a 2 s timeout: `Err` with status 503 when not alive.
    pub async fn healthz(&self) -> Result<ProbeResponse, ClientError> {
        self.probe(HEALTHZ_PATH).await
    }

    /// `GET /readyz` (no token), with a 2 s timeout: `Err` with status 503 when not ready.
    pub async fn readyz(&self) -> Result<ProbeResponse, ClientError> {
        self.probe(READYZ_PATH).await
    }

    async fn probe(&self, path: &str) -> Result<ProbeResponse, ClientError> {
        let url = format!("{}{}", self.base_url, path);
        let request = self.http.get(&url).timeout(Duration::from_secs(2));
        Self::send(url, request).await
    }

    /// Sends `build()` with the token; on a 401, once more with the fallback token.
    async fn send_authorized<T: DeserializeOwned>(
        &self,
        url: String,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let with = |token: Option<&String>| match token {
            Some(token) => build().bearer_auth(token),
            None => build(),
        };
        let first = Self::send(url.clone(), with(self.token.as_ref())).await;
        match (&first, &self.fallback_token) {
            (Err(error), Some(previous)) if error.status() == Some(StatusCode::UNAUTHORIZED) => {
                Self::send(url, with(Some(previous))).await
            }
            _ => first,
        }
    }

    pub async fn promote(&self, request: &PromoteRequest) -> Result<ActionResponse, ClientError> {
        self.post(PROMOTE_PATH, request).await
    }

    pub async fn follow(&self, request: &FollowRequest) -> Result<ActionResponse, ClientError> {
        self.post(FOLLOW_PATH, request).await
    }

    pub async fn rejoin(&self, request: &RejoinRequest) -> Result<ActionResponse, ClientError> {
        self.post(REJOIN_PATH, request).await
    }

    pub async fn stop(&self, request: &StopRequest) -> Result<ActionResponse, ClientError> {
        self.post(STOP_PATH, request).await
    }

    pub async fn start(&self) -> Result<ActionResponse, ClientError> {
        self.post(START_PATH, &serde_json::json!({})).await
    }

    pub async fn fence(&self, request: &FenceRequest) -> Result<ActionResponse, ClientError> {
        self.post(FENCE_PATH, request).await
    }

    /// `POST /v1/restart`: fast stop and start in the same role.
    pub async fn restart(&self) -> Result<ActionResponse, ClientError> {
        self.post(crate::protocol::api::RESTART_PATH, &serde_json::json!({}))
            .await
    }

    /// `POST /v1/parameters`: replace the user parameters and reload.
    pub async fn parameters(
        &self,
        request: &crate::protocol::api::ParametersRequest,
    ) -> Result<ActionResponse, ClientError> {
        self.post(crate::protocol::api::PARAMETERS_PATH, request)
            .await
    }

    /// `POST /v1/failsafe/members`: the failsafe's switch and members.
    pub async fn failsafe_members(
        &self,
        request: &crate::protocol::failsafe::FailsafeMembersRequest,
    ) -> Result<crate::protocol::failsafe::FailsafeStatus, ClientError> {
        let url = format!(
            "{}{}",
            self.base_url,
            crate::protocol::failsafe::FAILSAFE_MEMBERS_PATH
        );
        self.send_authorized(url.clone(), || {
            self.http
                .post(&url)
                .timeout(self.action_timeout)
                .json(request)
        })
        .await
    }

    /// `POST /v1/checkpoint`: a CHECKPOINT on the agent's postgres, with `timeout`.
    pub async fn checkpoint(
        &self,
        timeout: Duration,
    ) -> Result<crate::protocol::statements::StatementResponse, ClientError> {
        let url = format!(
            "{}{}",
            self.base_url,
            crate::protocol::statements::CHECKPOINT_PATH
        );
        self.send_authorized(url.clone(), || {
            self.http
                .post(&url)
                .timeout(timeout)
                .json(&serde_json::json!({}))
        })
        .await
    }

    /// `POST /v1/synchronous-standby-names`: set the quorum on the agent's postgres, with
    /// `timeout`.
    pub async fn synchronous_standby_names(
        &self,
        request: &crate::protocol::statements::SynchronousStandbyNamesRequest,
        timeout: Duration,
    ) -> Result<crate::protocol::statements::StatementResponse, ClientError> {
        let url = format!(
            "{}{}",
            self.base_url,
            crate::protocol::statements::SYNCHRONOUS_STANDBY_NAMES_PATH
        );
        self.send_authorized(url.clone(), || {
            self.http.post(&url).timeout(timeout).json(request)
        })
        .await
    }

    /// `POST /v1/drop-slots`: drop the slots of removed instances, with `timeout`.
    pub async fn drop_slots(
        &self,
        request: &crate::protocol::statements::DropSlotsRequest,
        timeout: Duration,
    ) -> Result<crate::protocol::statements::DropSlotsResponse, ClientError> {
        let url = format!(
            "{}{}",
            self.base_url,
            crate::protocol::statements::DROP_SLOTS_PATH
        );
        self.send_authorized(url.clone(), || {
            self.http.post(&url).timeout(timeout).json(request)
        })
        .await
    }

    /// `POST /v1/superuser-access`: allow or refuse remote superuser logins, with `timeout`.
    pub async fn superuser_access(
        &self,
        request: &crate::protocol::statements::SuperuserAccessRequest,
        timeout: Duration,
    ) -> Result<crate::protocol::statements::StatementResponse, ClientError> {
        let url = format!(
            "{}{}",
            self.base_url,
            crate::protocol::statements::SUPERUSER_ACCESS_PATH
        );
        self.send_authorized(url.clone(), || {
            self.http.post(&url).timeout(timeout).json(request)
        })
        .await
    }

    async fn post<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<ActionResponse, ClientError> {
        let url = format!("{}{}", self.base_url, path);
        self.send_authorized(url.clone(), || {
            self.http.post(&url).timeout(self.action_timeout).json(body)
        })
        .await
    }

    async fn send<T: DeserializeOwned>(
        url: String,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ErrorResponse>(&text)
                .map(|body| body.error)
                .unwrap_or(text);
            return Err(ClientError::Api {
                url,
                status,
                message,
            });
        }
        response
            .json::<T>()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    /// An agent whose Secret volume still shows the old token: only `old` is accepted.
    async fn agent_with_old_token() -> String {
        let app = axum::Router::new().route(
            crate::protocol::api::START_PATH,
            axum::routing::post(|headers: HeaderMap| async move {
                let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some("Bearer old");
                if authorized {
                    (StatusCode::OK, axum::Json(serde_json::json!({"ok": true})))
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({"error": "wrong token"})),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn a_401_to_the_new_token_is_retried_once_with_the_previous_one() {
        let url = agent_with_old_token().await;
        let rotated = AgentClient::new(&url, Some("new".into())).expect("client");
        let refused = rotated
            .start()
            .await
            .expect_err("the agent knows only the old token");
        assert_eq!(refused.status(), Some(StatusCode::UNAUTHORIZED));
        let with_fallback = rotated.with_fallback_token(Some("old".into()));
        // The mock answers 200 with a body that is no ActionResponse: a decode error (not a
        // 401) shows that the retry with the previous token was let in.
        let answered = with_fallback.start().await.expect_err("mock body");
        assert!(
            matches!(answered, ClientError::Decode { .. }),
            "the previous token is accepted: {answered}"
        );
        let wrong = AgentClient::new(&url, Some("new".into()))
            .expect("client")
            .with_fallback_token(Some("older".into()));
        assert_eq!(
            wrong.start().await.expect_err("neither").status(),
            Some(StatusCode::UNAUTHORIZED)
        );
    }
}
