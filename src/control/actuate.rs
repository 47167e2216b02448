//! Actuate: carry out the engine's actions with the same bounds on every platform. Inline
//! actions (lease writes, demote, fence, synchronous standbys) are bounded short against the
//! lease duration, so a frozen agent cannot hold a round; promote, follow and rejoin run in the
//! background, one at a time per instance, and report back through a channel. An action's
//! answer is stored as the instance's freshest report.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::coordination::LeaseError;
use crate::engine::{Action, MonoTime, SyncSet};
use crate::protocol::api::{
    ActionResponse, FenceRequest, FollowRequest, PromoteRequest, RejoinRequest, StopMode,
    StopRequest,
};
use crate::protocol::statements::SynchronousStandbyNamesRequest;

use super::platform::{CallError, Clock, ControlEvent, Platform};
use super::reports::Reports;

/// How long each kind of call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Lease writes, fence, synchronous standbys.
    pub inline: Duration,
    /// The checkpoint before a demotion (a failure only costs time).
    pub checkpoint: Duration,
    /// The fast stop of a demotion (the agent escalates to an immediate stop after 5 s).
    pub demote: Duration,
    /// How long an agent may take to promote before it answers (background).
    pub promote_wait: Duration,
}

impl Bounds {
    /// Every inline call well inside one lease duration.
    pub fn for_lease(lease_duration: Duration) -> Bounds {
        Bounds {
            inline: Duration::from_secs(3).min(lease_duration / 2),
            checkpoint: Duration::from_secs(5).min(lease_duration / 2),
            demote: Duration::from_secs(8).max(lease_duration),
            promote_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("failed to {action} {instance}: it has no address")]
    NoAddress {
        action: &'static str,
        instance: String,
    },
    #[error("failed to {action} {instance}: {source}")]
    Agent {
        action: &'static str,
        instance: String,
        #[source]
        source: CallError,
    },
    #[error("failed to write the lease: {0}")]
    Lease(#[source] LeaseError),
    #[error("failed to set synchronous_standby_names on {primary}: {source}")]
    Sync {
        primary: String,
        #[source]
        source: CallError,
    },
    #[error("failed to {action}: no answer within {bound:?}")]
    TimedOut {
        action: &'static str,
        bound: Duration,
    },
}

impl ActError {
    /// Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ActError::NoAddress { .. } => "NoPodAddress",
            ActError::Agent { .. } => "AgentActionFailed",
            ActError::Lease(_) => "LeaseWriteFailed",
            ActError::Sync { .. } => "SyncStandbysFailed",
            ActError::TimedOut { .. } => "ActionTimedOut",
        }
    }
}

/// A background action that finished.
#[derive(Debug, Clone)]
pub struct Completed {
    pub instance: String,
    pub kind: &'static str,
    /// What the agent said it did, or why it failed.
    pub result: Result<String, String>,
    pub took: Duration,
}

/// How an action ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    Inline,
    /// Started in the background.
    Background,
    /// A background action of the same instance is still under way: nothing started.
    Busy,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What actions share with the rest of the loop: the reports (an answer is the freshest
/// report), the wake-up of the next round, the clock, the instances with a background action.
pub struct Shared {
    pub reports: Mutex<Reports>,
    pub wake: tokio::sync::Notify,
    pub clock: Arc<dyn Clock>,
    busy: Mutex<BTreeSet<String>>,
}

impl Shared {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Shared {
            reports: Mutex::new(Reports::default()),
            wake: tokio::sync::Notify::new(),
            clock,
            busy: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn now(&self) -> MonoTime {
        self.clock.now()
    }

    pub fn reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        lock(&self.reports)
    }

    pub fn is_busy(&self, instance: &str) -> bool {
        lock(&self.busy).contains(instance)
    }

    fn claim(&self, instance: &str) -> bool {
        lock(&self.busy).insert(instance.to_string())
    }

    fn release(&self, instance: &str) {
        lock(&self.busy).remove(instance);
    }

    /// Stores an answer asked for at `asked_at`; wakes the round when it changes what the
    /// engine sees.
    pub fn note_answer(&self, instance: &str, asked_at: MonoTime, response: &ActionResponse) {
        let changed = self
            .reports()
            .answered(instance, asked_at, response.status.clone());
        if changed {
            self.wake.notify_one();
        }
    }

    /// Asks one agent for its status (bounded) and stores the outcome.
    pub async fn poll<P: Platform + ?Sized>(&self, platform: &P, instance: &str, bound: Duration) {
        let asked_at = self.now();
        let Some(agent) = platform.agent(instance) else {
            let error = CallError::Gone(format!("{instance} has no address"));
            self.reports().failed(instance, &error);
            return;
        };
        let result = tokio::time::timeout(bound, agent.status())
            .await
            .unwrap_or(Err(CallError::TimedOut(bound)));
        let changed = match result {
            Ok(status) => self.reports().answered(instance, asked_at, status),
            Err(error) => self.reports().failed(instance, &error),
        };
        if changed {
            self.wake.notify_one();
        }
    }
}

/// Carries out one action within its bound.
pub async fn execute<P: Platform + ?Sized>(
    shared: &Arc<Shared>,
    platform: &P,
    completed: &UnboundedSender<Completed>,
    bounds: &Bounds,
    action: &Action,
) -> Result<Ran, ActError> {
    let kind = action.kind();
    let bound = match action {
        Action::Demote { .. } => bounds.demote + bounds.checkpoint,
        _ => bounds.inline,
    };
    let work = async {
        match action {
            Action::AcquireLease {
                holder,
                expected_version,
            } => {
                platform.emit(ControlEvent::ActionStarted(action));
                platform
                    .lease()
                    .acquire(holder, expected_version)
                    .await
                    .map_err(ActError::Lease)?;
                Ok(Ran::Inline)
            }
            Action::Demote { instance } => {
                platform.emit(ControlEvent::ActionStarted(action));
                demote(shared, platform, bounds, instance).await
            }
            Action::Fence { instance, reason } => {
                platform.emit(ControlEvent::ActionStarted(action));
                let agent = agent_of(platform, kind, instance)?;
                let asked_at = shared.now();
                let request = FenceRequest {
                    reason: Some(reason.clone()),
                };
                let response = agent
                    .fence(&request)
                    .await
                    .map_err(|source| ActError::Agent {
                        action: kind,
                        instance: instance.clone(),
                        source,
                    })?;
                shared.note_answer(instance, asked_at, &response);
                Ok(Ran::Inline)
            }
            Action::SetSynchronousStandbys { primary, sync } => {
                platform.emit(ControlEvent::ActionStarted(action));
                let agent = agent_of(platform, kind, primary)?;
                let request = sync_request(sync);
                agent
                    .synchronous_standby_names(&request, bounds.inline)
                    .await
                    .map_err(|source| ActError::Sync {
                        primary: primary.clone(),
                        source,
                    })?;
                Ok(Ran::Inline)
            }
            Action::Promote { instance } => {
                let agent = agent_of(platform, kind, instance)?;
                let wait = bounds.promote_wait.as_secs();
                Ok(background(
                    shared,
                    platform,
                    completed,
                    action,
                    instance,
                    async move {
                        agent
                            .promote(&PromoteRequest {
                                wait_seconds: Some(wait),
                            })
                            .await
                    },
                ))
            }
            Action::Follow { instance, primary } | Action::Rejoin { instance, primary } => {
                let agent = agent_of(platform, kind, instance)?;
                let (host, port) =
                    platform
                        .postgres_address(primary)
                        .ok_or_else(|| ActError::NoAddress {
                            action: kind,
                            instance: primary.clone(),
                        })?;
                let rejoin = matches!(action, Action::Rejoin { .. });
                Ok(background(
                    shared,
                    platform,
                    completed,
                    action,
                    instance,
                    async move {
                        if rejoin {
                            let request = RejoinRequest {
                                host,
                                port,
                                slot: None,
                            };
                            agent.rejoin(&request).await
                        } else {
                            let request = FollowRequest {
                                host,
                                port,
                                slot: None,
                            };
                            agent.follow(&request).await
                        }
                    },
                ))
            }
        }
    };
    tokio::time::timeout(bound, work)
        .await
        .unwrap_or(Err(ActError::TimedOut {
            action: kind,
            bound,
        }))
}

/// The agent's request for `sync`: the engine's quorum (normalised: the agent refuses a
/// member named twice or `k` over the member count), or asynchronous (no members).
fn sync_request(sync: &SyncSet) -> SynchronousStandbyNamesRequest {
    let sync = sync.clone().normalized();
    if sync.is_synchronous() {
        SynchronousStandbyNamesRequest {
            k: sync.k,
            members: sync.members,
        }
    } else {
        SynchronousStandbyNamesRequest::default()
    }
}

fn agent_of<P: Platform + ?Sized>(
    platform: &P,
    kind: &'static str,
    instance: &str,
) -> Result<Arc<dyn super::platform::AgentApi>, ActError> {
    platform.agent(instance).ok_or_else(|| ActError::NoAddress {
        action: kind,
        instance: instance.to_string(),
    })
}

/// Planned step-down: a CHECKPOINT while it still serves (the shutdown checkpoint, inside the
/// write-unavailability window, then has little to write), a fast stop, then the lease is given
/// up at once (the agent would too, a bit later).
async fn demote<P: Platform + ?Sized>(
    shared: &Shared,
    platform: &P,
    bounds: &Bounds,
    instance: &str,
) -> Result<Ran, ActError> {
    let started = tokio::time::Instant::now();
    let agent = agent_of(platform, "demote", instance)?;
    let checkpoint = agent.checkpoint(bounds.checkpoint);
    match tokio::time::timeout(bounds.checkpoint, checkpoint).await {
        Ok(Ok(_)) => tracing::info!(
            instance,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checkpoint before demotion"
        ),
        Ok(Err(error)) => tracing::warn!(instance, %error, "checkpoint before demotion failed"),
        Err(_) => tracing::warn!(instance, "checkpoint before demotion timed out"),
    }
    let asked_at = shared.now();
    let request = StopRequest {
        mode: StopMode::Fast,
    };
    let response = tokio::time::timeout(bounds.demote, agent.stop(&request))
        .await
        .unwrap_or(Err(CallError::TimedOut(bounds.demote)))
        .map_err(|source| ActError::Agent {
            action: "demote",
            instance: instance.to_string(),
            source,
        })?;
    // The answer is the freshest report: the engine sees the old primary down without waiting
    // for the next poll.
    shared.note_answer(instance, asked_at, &response);
    match platform.lease().release(instance).await {
        Ok(_) | Err(LeaseError::NotHolder { .. }) => Ok(Ran::Inline),
        Err(error) => Err(ActError::Lease(error)),
    }
}

fn background<P, F>(
    shared: &Arc<Shared>,
    platform: &P,
    completed: &UnboundedSender<Completed>,
    action: &Action,
    instance: &str,
    work: F,
) -> Ran
where
    P: Platform + ?Sized,
    F: Future<Output = Result<ActionResponse, CallError>> + Send + 'static,
{
    if !shared.claim(instance) {
        return Ran::Busy;
    }
    platform.emit(ControlEvent::ActionStarted(action));
    let shared = shared.clone();
    let completed = completed.clone();
    let instance = instance.to_string();
    let kind = action.kind();
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let asked_at = shared.now();
        let result = work.await;
        if let Ok(response) = &result {
            shared.note_answer(&instance, asked_at, response);
        }
        shared.release(&instance);
        let _ = completed.send(Completed {
            instance,
            kind,
            result: result.map(|r| r.message).map_err(|e| e.to_string()),
            took: started.elapsed(),
        });
        shared.wake.notify_one();
    });
    Ran::Background
}
