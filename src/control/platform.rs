//! What differs between the platforms the control loop runs on, as traits: how an instance's
//! agent (the only way the loop acts on an instance: it has no SQL session of its own) and
//! postgres are reached, the lease store, where the loop's state is persisted, how
//! events reach humans and what happens once a round has decided. Local mode and the operator
//! implement [`Platform`]; the loop's tests implement it with scripted agents.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::coordination::LeaseStore;
use crate::engine::{Action, Decision, EngineInput, MonoTime};
use crate::protocol::api::{
    ActionResponse, AgentStatus, FenceRequest, FollowRequest, PromoteRequest, RejoinPath,
    RejoinRequest, StopRequest,
};
use crate::protocol::client::{AgentClient, ClientError};
use crate::protocol::failsafe::{FailsafeMembersRequest, FailsafeStatus};
use crate::protocol::statements::{StatementResponse, SynchronousStandbyNamesRequest};

use super::actuate::{ActError, Completed};
use super::state::ControlState;

/// A failed call to an agent or to an instance's postgres.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nothing listens there (connection refused, no address): the process is gone, not slow.
    #[error("nothing answers: {0}")]
    Gone(String),
    #[error("{0}")]
    Failed(String),
    #[error("no answer within {0:?}")]
    TimedOut(std::time::Duration),
}

impl From<ClientError> for CallError {
    fn from(error: ClientError) -> Self {
        let refused =
            matches!(&error, ClientError::Transport { source, .. } if source.is_connect());
        if refused {
            CallError::Gone(error.to_string())
        } else {
            CallError::Failed(error.to_string())
        }
    }
}

type Call<'a, T> = BoxFuture<'a, Result<T, CallError>>;

/// An agent's HTTP API as the loop uses it ([`AgentClient`] in production).
pub trait AgentApi: Send + Sync {
    fn status(&self) -> Call<'_, AgentStatus>;
    fn promote<'a>(&'a self, request: &'a PromoteRequest) -> Call<'a, ActionResponse>;
    fn stop<'a>(&'a self, request: &'a StopRequest) -> Call<'a, ActionResponse>;
    fn fence<'a>(&'a self, request: &'a FenceRequest) -> Call<'a, ActionResponse>;
    fn follow<'a>(&'a self, request: &'a FollowRequest) -> Call<'a, ActionResponse>;
    fn rejoin<'a>(&'a self, request: &'a RejoinRequest) -> Call<'a, ActionResponse>;
    /// A CHECKPOINT on the agent's postgres (before a planned demotion), within `timeout`.
    fn checkpoint(&self, timeout: Duration) -> Call<'_, StatementResponse>;
    /// Sets `synchronous_standby_names` on the agent's postgres and reloads, within `timeout`.
    fn synchronous_standby_names<'a>(
        &'a self,
        request: &'a SynchronousStandbyNamesRequest,
        timeout: Duration,
    ) -> Call<'a, StatementResponse>;
    /// Tells the agent the failsafe's switch and members.
    fn failsafe_members<'a>(
        &'a self,
        _request: &'a FailsafeMembersRequest,
    ) -> Call<'a, FailsafeStatus> {
        Box::pin(async { Err(CallError::Failed("no failsafe on this agent".into())) })
    }
}

impl AgentApi for AgentClient {
    fn status(&self) -> Call<'_, AgentStatus> {
        Box::pin(async move { AgentClient::status(self).await.map_err(CallError::from) })
    }

    fn promote<'a>(&'a self, request: &'a PromoteRequest) -> Call<'a, ActionResponse> {
        Box::pin(async move {
            AgentClient::promote(self, request)
                .await
                .map_err(CallError::from)
        })
    }

    fn stop<'a>(&'a self, request: &'a StopRequest) -> Call<'a, ActionResponse> {
        Box::pin(async move {
            AgentClient::stop(self, request)
                .await
                .map_err(CallError::from)
        })
    }

    fn fence<'a>(&'a self, request: &'a FenceRequest) -> Call<'a, ActionResponse> {
        Box::pin(async move {
            AgentClient::fence(self, request)
                .await
                .map_err(CallError::from)
        })
    }

    fn follow<'a>(&'a self, request: &'a FollowRequest) -> Call<'a, ActionResponse> {
        Box::pin(async move {
            AgentClient::follow(self, request)
                .await
                .map_err(CallError::from)
        })
    }

    fn rejoin<'a>(&'a self, request: &'a RejoinRequest) -> Call<'a, ActionResponse> {
        Box::pin(async move {
            AgentClient::rejoin(self, request)
                .await
                .map_err(CallError::from)
        })
    }

    fn checkpoint(&self, timeout: Duration) -> Call<'_, StatementResponse> {
        Box::pin(async move {
            AgentClient::checkpoint(self, timeout)
                .await
                .map_err(CallError::from)
        })
    }

    fn synchronous_standby_names<'a>(
        &'a self,
        request: &'a SynchronousStandbyNamesRequest,
        timeout: Duration,
    ) -> Call<'a, StatementResponse> {
        Box::pin(async move {
            AgentClient::synchronous_standby_names(self, request, timeout)
                .await
                .map_err(CallError::from)
        })
    }

    fn failsafe_members<'a>(
        &'a self,
        request: &'a FailsafeMembersRequest,
    ) -> Call<'a, FailsafeStatus> {
        Box::pin(async move {
            AgentClient::failsafe_members(self, request)
                .await
                .map_err(CallError::from)
        })
    }
}

/// The loop's monotonic clock, as engine values.
pub trait Clock: Send + Sync {
    fn now(&self) -> MonoTime;
}

/// `tokio::time::Instant` since the loop started (paused with tokio's test clock).
pub struct MonotonicClock {
    origin: tokio::time::Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.origin.elapsed())
    }
}

/// Something the loop did or saw that a human should know about. Each platform words it its
/// own way (local: the events log; Kubernetes: Events on the resource).
#[derive(Debug)]
pub enum ControlEvent<'a> {
    /// An event of the engine's decision (repeats of the same message are filtered out).
    Engine(&'a crate::engine::Event),
    /// An action is about to be carried out (background actions: only when not already busy).
    ActionStarted(&'a Action),
    /// An inline action failed; the round stops acting.
    ActionFailed {
        action: &'a Action,
        error: &'a ActError,
    },
    /// A background action (promote, follow, rejoin) finished.
    Completed(&'a Completed),
    /// A former primary that its agent rewound when it started now streams from the holder.
    Rejoined {
        instance: &'a str,
        path: RejoinPath,
        upstream: (&'a str, u16),
    },
}

/// Persisting the loop's state failed: the round does not act on a decision it could not record.
#[derive(Debug, thiserror::Error)]
#[error("failed to persist the control state to {place}: {message}")]
pub struct PersistError {
    pub place: String,
    pub message: String,
}

/// One platform: local processes or Kubernetes pods.
pub trait Platform: Send + Sync {
    fn lease(&self) -> &dyn LeaseStore;
    /// The agent of `instance`; `None` when it has no address (no pod IP yet).
    fn agent(&self, instance: &str) -> Option<Arc<dyn AgentApi>>;
    /// The base URL of `instance`'s agent as other agents reach it (the failsafe's member
    /// list); `None` when it has no address.
    fn agent_url(&self, instance: &str) -> Option<String>;
    /// Where `instance`'s postgres listens for its peers: the upstream a follower is given, and
    /// how a WAL receiver's sender is matched to an instance.
    fn postgres_address(&self, instance: &str) -> Option<(String, u16)>;
    /// How long a status request to `instance` may take in a polling round.
    fn poll_bound(&self, _instance: &str) -> std::time::Duration {
        std::time::Duration::from_secs(2)
    }
    fn emit(&self, event: ControlEvent<'_>);
    /// Records `state` durably. Called before the actions that depend on it (write-ahead).
    fn persist<'a>(&'a self, state: &'a ControlState) -> BoxFuture<'a, Result<(), PersistError>>;
    /// The round has decided and persisted; called before acting (local mode points the write
    /// endpoint here).
    fn decided(&self, _input: &EngineInput, _decision: &Decision, _urgent: bool) {}
}
