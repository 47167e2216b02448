//! `GET /healthz` and `GET /readyz`: the kubelet's probes, answered from memory.
//!
//! The agent's own loop ([`spawn`]) looks at the instance once a second: the supervisor's
//! state and, while postgres runs, `pg_is_in_recovery()` on the supervisor's kept session. The
//! probes read that last look; however many arrive, they run no SQL and open no session, so a
//! flood of them (or of refused status requests) cannot make postgres look down.
//!
//! - Alive: the supervisor task runs and the loop looked within [`LIVE_MAX_AGE`].
//! - Ready: the last look, at most [`READY_MAX_AGE`] old, saw postgres up and serving its
//!   role: a primary that is meant to be one, or a replica (meant to stay one, or being
//!   promoted).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::{ApiError, HttpState};
use crate::agent::supervisor::{Phase, SupervisorHandle, SupervisorState};
use crate::protocol::api::{ProbeResponse, Role};

/// How often the loop looks.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// The bound of its query (and of connecting the kept session).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// An older look does not make the instance ready.
pub const READY_MAX_AGE: Duration = Duration::from_secs(10);
/// Without a look for this long (or since the agent started), the agent is not alive.
pub const LIVE_MAX_AGE: Duration = Duration::from_secs(30);

/// One look at the instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// When the look began.
    pub at: Instant,
    pub phase: Phase,
    pub intended_role: Role,
    /// `Primary` or `Replica` when postgres answered; else from the phase.
    pub role: Role,
    pub postgres_up: bool,
    /// Why postgres could not be asked, when it should be up.
    pub error: Option<String>,
}

/// What one look saw: `state` is the supervisor's state read *after* the query (a fence
/// during the query wins), `recovery` the query's answer (`None` when postgres is not meant
/// to run).
pub fn observe(
    at: Instant,
    state: &SupervisorState,
    recovery: Option<Result<bool, String>>,
) -> Observation {
    let by_phase = match state.phase {
        Phase::Fenced => Role::Fenced,
        Phase::Stopped => Role::Stopped,
        Phase::Starting | Phase::Running => Role::Starting,
    };
    let (role, postgres_up, error) = match (state.phase, recovery) {
        (Phase::Running, Some(Ok(true))) => (Role::Replica, true, None),
        (Phase::Running, Some(Ok(false))) => (Role::Primary, true, None),
        (Phase::Running, Some(Err(error))) => (by_phase, false, Some(error)),
        _ => (by_phase, false, None),
    };
    Observation {
        at,
        phase: state.phase,
        intended_role: state.intended_role,
        role,
        postgres_up,
        error,
    }
}

/// Why the instance is not ready (or the agent not alive): the `503`'s message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("the agent has not looked at postgres yet")]
    NotObserved,
    #[error("the agent last looked at postgres {age_ms} ms ago (limit {limit_ms} ms)")]
    Stale { age_ms: u64, limit_ms: u64 },
    #[error("postgres is not up (role {role:?}, phase {phase}){}", why_suffix(.why))]
    Down {
        role: Role,
        phase: String,
        why: Option<String>,
    },
    #[error("postgres runs as {role:?} but the agent drives it to {intended:?}")]
    WrongRole { role: Role, intended: Role },
    #[error("the supervisor task has stopped")]
    SupervisorStopped,
}

fn why_suffix(why: &Option<String>) -> String {
    why.as_ref().map(|w| format!(": {w}")).unwrap_or_default()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn answer(last: &Observation, now: Instant) -> ProbeResponse {
    ProbeResponse {
        status: "ok".into(),
        role: last.role,
        intended_role: last.intended_role,
        observed_ms_ago: millis(now.saturating_duration_since(last.at)),
    }
}

/// Readiness from the last look.
pub fn readiness(last: Option<&Observation>, now: Instant) -> Result<ProbeResponse, NotReady> {
    let last = last.ok_or(NotReady::NotObserved)?;
    let age = now.saturating_duration_since(last.at);
    if age > READY_MAX_AGE {
        return Err(NotReady::Stale {
            age_ms: millis(age),
            limit_ms: millis(READY_MAX_AGE),
        });
    }
    if !last.postgres_up {
        return Err(NotReady::Down {
            role: last.role,
            phase: format!("{:?}", last.phase).to_lowercase(),
            why: last.error.clone(),
        });
    }
    match (last.role, last.intended_role) {
        (Role::Primary, Role::Primary) | (Role::Replica, Role::Replica | Role::Primary) => {
            Ok(answer(last, now))
        }
        (role, intended) => Err(NotReady::WrongRole { role, intended }),
    }
}

/// Liveness: the supervisor task runs and the loop keeps looking (`started`: when the loop
/// was started, the grace before its first look).
pub fn liveness(
    supervisor_running: bool,
    last: Option<&Observation>,
    started: Instant,
    now: Instant,
) -> Result<ProbeResponse, NotReady> {
    if !supervisor_running {
        return Err(NotReady::SupervisorStopped);
    }
    let since = last.map_or(started, |l| l.at);
    let age = now.saturating_duration_since(since);
    if age > LIVE_MAX_AGE {
        return Err(NotReady::Stale {
            age_ms: millis(age),
            limit_ms: millis(LIVE_MAX_AGE),
        });
    }
    Ok(match last {
        Some(last) => answer(last, now),
        None => ProbeResponse {
            status: "ok".into(),
            role: Role::Starting,
            intended_role: Role::Starting,
            observed_ms_ago: 0,
        },
    })
}

/// The last look, shared by the loop (writer) and the probes (readers).
#[derive(Debug, Clone)]
pub struct Health {
    last: Arc<Mutex<Option<Observation>>>,
    started: Instant,
}

impl Health {
    pub fn new() -> Self {
        Health {
            last: Arc::new(Mutex::new(None)),
            started: Instant::now(),
        }
    }

    pub fn last(&self) -> Option<Observation> {
        self.lock().clone()
    }

    fn record(&self, observation: Observation) {
        *self.lock() = Some(observation);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Observation>> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

/// One look: the supervisor's state, and the recovery state while postgres runs.
async fn look(supervisor: &SupervisorHandle) -> Observation {
    let at = Instant::now();
    let recovery = if supervisor.state().phase == Phase::Running {
        Some(
            supervisor
                .in_recovery(QUERY_TIMEOUT)
                .await
                .map_err(|e| e.to_string()),
        )
    } else {
        None
    };
    observe(at, &supervisor.state(), recovery)
}

/// Starts the loop that keeps `health` current; it runs until aborted.
pub fn spawn(supervisor: SupervisorHandle) -> (Health, tokio::task::JoinHandle<()>) {
    let health = Health::new();
    let task = tokio::spawn(run(health.clone(), supervisor));
    (health, task)
}

async fn run(health: Health, supervisor: SupervisorHandle) {
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ready = None;
    loop {
        tick.tick().await;
        let observation = look(&supervisor).await;
        let ready = readiness(Some(&observation), observation.at);
        if was_ready != Some(ready.is_ok()) {
            match &ready {
                Ok(answer) => tracing::info!(role = ?answer.role, "ready"),
                Err(why) => tracing::info!(reason = %why, "not ready"),
            }
            was_ready = Some(ready.is_ok());
        }
        health.record(observation);
    }
}

fn probe_reply(result: Result<ProbeResponse, NotReady>) -> Response {
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(why) => ApiError(StatusCode::SERVICE_UNAVAILABLE, why.to_string()).into_response(),
    }
}

pub(super) async fn healthz(State(state): State<HttpState>) -> Response {
    let health = &state.health;
    probe_reply(liveness(
        state.supervisor.is_running(),
        health.last().as_ref(),
        health.started,
        Instant::now(),
    ))
}

pub(super) async fn readyz(State(state): State<HttpState>) -> Response {
    probe_reply(readiness(state.health.last().as_ref(), Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: Phase, intended_role: Role) -> SupervisorState {
        let mut state = SupervisorState::starting(intended_role, None);
        state.phase = phase;
        state
    }

    #[test]
    fn a_running_instance_is_ready_in_its_role() {
        let at = Instant::now();
        let now = at + Duration::from_millis(300);
        let primary = observe(at, &state(Phase::Running, Role::Primary), Some(Ok(false)));
        let answer = readiness(Some(&primary), now).unwrap();
        assert_eq!(answer.role, Role::Primary);
        assert_eq!(answer.observed_ms_ago, 300);
        let replica = observe(at, &state(Phase::Running, Role::Replica), Some(Ok(true)));
        assert_eq!(readiness(Some(&replica), now).unwrap().role, Role::Replica);
        // Being promoted: still a serving replica.
        let promoting = observe(at, &state(Phase::Running, Role::Primary), Some(Ok(true)));
        assert!(readiness(Some(&promoting), now).is_ok());
    }

    #[test]
    fn down_fenced_stale_or_misplaced_instances_are_not_ready() {
        let at = Instant::now();
        let now = at + Duration::from_millis(10);
        assert_eq!(readiness(None, now), Err(NotReady::NotObserved));
        for phase in [Phase::Starting, Phase::Stopped, Phase::Fenced] {
            let down = observe(at, &state(phase, Role::Primary), None);
            assert!(
                matches!(readiness(Some(&down), now), Err(NotReady::Down { .. })),
                "{phase:?}"
            );
        }
        let fenced = observe(at, &state(Phase::Fenced, Role::Primary), None);
        assert_eq!(fenced.role, Role::Fenced);
        let failed = observe(
            at,
            &state(Phase::Running, Role::Primary),
            Some(Err("timed out".into())),
        );
        let why = readiness(Some(&failed), now).unwrap_err().to_string();
        assert!(why.contains("timed out"), "{why}");
        // A primary that is meant to be a replica does not take traffic.
        let misplaced = observe(at, &state(Phase::Running, Role::Replica), Some(Ok(false)));
        assert_eq!(
            readiness(Some(&misplaced), now),
            Err(NotReady::WrongRole {
                role: Role::Primary,
                intended: Role::Replica
            })
        );
        let primary = observe(at, &state(Phase::Running, Role::Primary), Some(Ok(false)));
        let later = at + READY_MAX_AGE + Duration::from_millis(1);
        assert!(matches!(
            readiness(Some(&primary), later),
            Err(NotReady::Stale { .. })
        ));
    }

    #[test]
    fn alive_while_the_supervisor_runs_and_the_loop_looks() {
        let started = Instant::now();
        let soon = started + Duration::from_secs(1);
        // Before the first look: alive within the grace.
        assert_eq!(
            liveness(true, None, started, soon).unwrap().role,
            Role::Starting
        );
        assert!(liveness(true, None, started, started + LIVE_MAX_AGE * 2).is_err());
        // Alive even while postgres is down: liveness is about the agent.
        let down = observe(soon, &state(Phase::Starting, Role::Primary), None);
        assert!(liveness(true, Some(&down), started, soon).is_ok());
        assert_eq!(
            liveness(false, Some(&down), started, soon),
            Err(NotReady::SupervisorStopped)
        );
        let late = soon + LIVE_MAX_AGE + Duration::from_secs(1);
        assert!(matches!(
            liveness(true, Some(&down), started, late),
            Err(NotReady::Stale { .. })
        ));
    }
}
