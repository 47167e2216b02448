//! Supervision of the postgres child process, and the actions on it.
//!
//! One task (the supervisor) owns the postmaster child and runs every action to completion, one
//! at a time, in arrival order. Others talk to it through a cloneable [`SupervisorHandle`].
//!
//! Fencing contract (for the lease keeper and `POST /v1/fence`): [`SupervisorHandle::fence`]
//! marks the instance fenced and sends SIGQUIT (immediate shutdown) to the postmaster *before*
//! queueing behind any running action, so it takes effect at once; while fenced, nothing
//! restarts postgres (no crash restart, no `start`, and an action already running fails when it
//! tries to start postgres). Only `follow` or `rejoin` lift the fence.
//!
//! The module's files: this one holds the handle (the public API) and the shared types;
//! `session` the kept status session and probes; `run` the run loop;
//! `postmaster` starting, stopping and watching the postmaster; `actions` start, stop, fence,
//! promote, follow, restart and parameters; `rejoin` the rewind or re-clone of a former primary.

mod actions;
mod postmaster;
mod rejoin;
mod run;
mod session;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agent::instance::{AgentConfig, InstanceError};
use crate::postgres::probe::ProbeError;
use crate::postgres::promote::PromoteError;
use crate::postgres::roles::RoleError;
use crate::postgres::slots::SlotError;
use crate::protocol::api::{RejoinReport, Role, StopMode, Upstream};

const LOG_TAIL_LINES: usize = 20;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A postgres that ran this long before crashing restarts without accumulated backoff.
const STABLE_RUN: Duration = Duration::from_secs(60);

/// Lifecycle of postgres as the supervisor sees it (the status' `role` refines `Running` into
/// primary or replica by probing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    Stopped,
    Fenced,
}

/// State shared between the supervisor task and readers (HTTP status).
#[derive(Debug, Clone)]
pub struct SupervisorState {
    pub phase: Phase,
    /// `Primary` or `Replica`.
    pub intended_role: Role,
    pub upstream: Option<Upstream>,
    pub pid: Option<u32>,
    pub system_identifier: Option<String>,
    pub crash_restarts: u32,
    pub last_rejoin: Option<RejoinReport>,
    pub fence_reason: Option<String>,
    pub last_error: Option<String>,
    /// Digest of the user parameters written to the include file (`config::parameters_hash`);
    /// `None` until the first apply (or without `--parameters-file`).
    pub parameters_hash: Option<String>,
    /// The last stop ended with the postmaster exiting from a clean (fast) shutdown: only then
    /// may a primary's lease be released.
    pub clean_stop: bool,
    /// A promotion was signalled and its post-promotion work is not done yet: a retried
    /// promote finishes it.
    pub promotion_pending: bool,
    /// This agent creates the data directory (initdb of a first primary); cleared once
    /// postgres first runs.
    pub new_data_dir: bool,
    /// The major-version upgrade run at startup, if any.
    pub major_upgrade: Option<crate::protocol::api::MajorUpgradeReport>,
}

impl SupervisorState {
    /// A supervisor about to start postgres in `intended_role`.
    pub fn starting(intended_role: Role, upstream: Option<Upstream>) -> Self {
        SupervisorState {
            phase: Phase::Starting,
            intended_role,
            upstream,
            pid: None,
            system_identifier: None,
            crash_restarts: 0,
            last_rejoin: None,
            fence_reason: None,
            last_error: None,
            parameters_hash: None,
            clean_stop: false,
            promotion_pending: false,
            new_data_dir: false,
            major_upgrade: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// Not allowed in the current state (HTTP 409).
    #[error("{0}")]
    Refused(String),
    #[error("failed to start postgres: {0}")]
    Start(String),
    #[error("failed to stop postgres: {0}")]
    Stop(String),
    #[error("failed to promote: {0}")]
    Promote(String),
    #[error("failed to rewind: {0}")]
    Rewind(String),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("failed to query postgres: {0}")]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Server(#[from] PromoteError),
    #[error(transparent)]
    Role(#[from] RoleError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("failed to rejoin: pg_rewind path: {rewind}; re-clone path: {reclone}")]
    Rejoin { rewind: String, reclone: String },
    #[error("the supervisor has stopped")]
    SupervisorGone,
}

impl ActionError {
    pub fn is_refusal(&self) -> bool {
        matches!(self, ActionError::Refused(_))
    }
}

/// What an action did.
#[derive(Debug, Clone)]
pub struct ActionOutcome {
    pub message: String,
    pub rejoin: Option<RejoinReport>,
}

impl ActionOutcome {
    fn message(message: impl Into<String>) -> Self {
        ActionOutcome {
            message: message.into(),
            rejoin: None,
        }
    }
}

type Reply = oneshot::Sender<Result<ActionOutcome, ActionError>>;

enum Command {
    Start(Reply),
    Stop(StopMode, Reply),
    Fence(Reply),
    Promote(Duration, Reply),
    Follow(Upstream, Reply),
    Rejoin(Upstream, Reply),
    Shutdown(Reply),
    Restart(Reply),
    Parameters(std::collections::BTreeMap<String, String>, Reply),
}

/// The cloneable way to drive the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    commands: mpsc::Sender<Command>,
    state: Arc<Mutex<SupervisorState>>,
    config: Arc<AgentConfig>,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    /// The status probe's session, kept open between probes: a SCRAM handshake per status
    /// request (several a second) was most of an idle agent's CPU.
    status_session: Arc<tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>>,
    /// The newest timeline this standby's WAL receiver reported since postgres started.
    received_timeline: Arc<Mutex<Option<u32>>>,
    /// Called right before a promotion is signalled (lease fencing arms its keeper there).
    promotion_hook: Arc<Mutex<Option<PromotionHook>>>,
}

/// See [`SupervisorHandle::on_promotion`].
pub type PromotionHook = Arc<dyn Fn() + Send + Sync>;

impl SupervisorHandle {
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// A snapshot of the shared state.
    pub fn state(&self) -> SupervisorState {
        lock(&self.state).clone()
    }

    /// The supervisor task still runs (it ends only after a shutdown, or if it panicked).
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Asks a running postmaster to re-read its configuration files (SIGHUP): renewed TLS
    /// certificates are served to new connections from then on. Nothing when postgres is down.
    pub fn reload_files(&self) -> Result<(), nix::Error> {
        match lock(&self.state).pid {
            Some(pid) => kill(Pid::from_raw(pid as i32), Signal::SIGHUP),
            None => Ok(()),
        }
    }

    /// The last lines postgres wrote to stderr.
    pub fn log_tail(&self) -> Vec<String> {
        lock(&self.log_tail).iter().cloned().collect()
    }

    async fn request(
        &self,
        make: impl FnOnce(Reply) -> Command,
    ) -> Result<ActionOutcome, ActionError> {
        let (reply, receive) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| ActionError::SupervisorGone)?;
        receive.await.map_err(|_| ActionError::SupervisorGone)?
    }

    /// Starts postgres in the intended role (refused while fenced).
    pub async fn start(&self) -> Result<ActionOutcome, ActionError> {
        self.request(Command::Start).await
    }

    /// Stops postgres and keeps it stopped until `start`, `follow` or `rejoin`.
    pub async fn stop(&self, mode: StopMode) -> Result<ActionOutcome, ActionError> {
        self.request(|reply| Command::Stop(mode, reply)).await
    }

    /// Fences at once: marks the instance fenced and sends SIGQUIT to the postmaster right now,
    /// then waits (behind any running action) until the supervisor has seen postgres exit.
    pub async fn fence(&self, reason: &str) -> Result<ActionOutcome, ActionError> {
        let pid = {
            let mut state = lock(&self.state);
            state.phase = Phase::Fenced;
            state.fence_reason = Some(reason.to_string());
            state.pid
        };
        tracing::warn!(reason, ?pid, "fencing: immediate shutdown of postgres");
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
        }
        self.request(Command::Fence).await
    }

    /// `hook` runs synchronously right before a promotion is signalled, after the instance was
    /// marked primary: from then on it is a primary for fencing.
    pub fn on_promotion(&self, hook: PromotionHook) {
        *lock(&self.promotion_hook) = Some(hook);
    }

    pub(super) fn promotion_signalling(&self) {
        let hook = lock(&self.promotion_hook).clone();
        if let Some(hook) = hook {
            hook();
        }
    }

    pub async fn promote(&self, wait: Duration) -> Result<ActionOutcome, ActionError> {
        self.request(|reply| Command::Promote(wait, reply)).await
    }

    pub async fn follow(&self, upstream: Upstream) -> Result<ActionOutcome, ActionError> {
        self.request(|reply| Command::Follow(upstream, reply)).await
    }

    pub async fn rejoin(&self, upstream: Upstream) -> Result<ActionOutcome, ActionError> {
        self.request(|reply| Command::Rejoin(upstream, reply)).await
    }

    /// Graceful agent exit: fast shutdown bounded by `stop_timeout`, then immediate.
    pub async fn shutdown(&self) -> Result<ActionOutcome, ActionError> {
        self.request(Command::Shutdown).await
    }

    /// Restarts postgres in its current role (fast stop, start): for parameters that only take
    /// effect at server start. Refused unless postgres runs.
    pub async fn restart(&self) -> Result<ActionOutcome, ActionError> {
        self.request(Command::Restart).await
    }

    /// Writes the user parameters to the include file and, when postgres runs and the file
    /// changed, reloads it (waiting until the postmaster has re-read its configuration).
    pub async fn apply_parameters(
        &self,
        parameters: std::collections::BTreeMap<String, String>,
    ) -> Result<ActionOutcome, ActionError> {
        self.request(|reply| Command::Parameters(parameters, reply))
            .await
    }
}

/// The application's role and database (`--app-owner`), on a primary's superuser session.
async fn ensure_app_access(
    client: &tokio_postgres::Client,
    config: &AgentConfig,
) -> Result<(), RoleError> {
    if let Some(app) = &config.app {
        crate::postgres::roles::ensure_app_access(
            client,
            &app.owner,
            &app.database,
            app.password.current().expose(),
        )
        .await?;
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates the supervisor task (postgres not started yet: phase `Starting`). Bootstrap the data
/// directory, then call [`SupervisorHandle::start`].
pub fn spawn(
    config: Arc<AgentConfig>,
    intended_role: Role,
    upstream: Option<Upstream>,
) -> (SupervisorHandle, tokio::task::JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(16);
    let state = Arc::new(Mutex::new(SupervisorState::starting(
        intended_role,
        upstream,
    )));
    let handle = SupervisorHandle {
        commands,
        state,
        config,
        log_tail: Arc::new(Mutex::new(VecDeque::new())),
        status_session: Arc::new(tokio::sync::Mutex::new(None)),
        received_timeline: Arc::new(Mutex::new(None)),
        promotion_hook: Arc::new(Mutex::new(None)),
    };
    let mut supervisor = Supervisor {
        handle: handle.clone(),
        commands: receiver,
        child: None,
        started_at: None,
        restart_at: None,
        backoff: MIN_BACKOFF,
        hold_starting: false,
        recovery_only: false,
    };
    let task = tokio::spawn(async move { supervisor.run().await });
    (handle, task)
}

/// Records that this agent creates the data directory (see `fencing_state`).
pub fn set_new_data_dir(handle: &SupervisorHandle) {
    lock(&handle.state).new_data_dir = true;
}

/// Records the system identifier found by bootstrap.
pub fn set_system_identifier(handle: &SupervisorHandle, id: String) {
    lock(&handle.state).system_identifier = Some(id);
}

pub fn set_major_upgrade(
    handle: &SupervisorHandle,
    report: crate::protocol::api::MajorUpgradeReport,
) {
    lock(&handle.state).major_upgrade = Some(report);
}

struct Supervisor {
    handle: SupervisorHandle,
    commands: mpsc::Receiver<Command>,
    child: Option<Child>,
    started_at: Option<Instant>,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// A started postgres stays `Starting` (set during a rejoin, until it is verified).
    hold_starting: bool,
    /// The next start only completes crash recovery (see `await_recovered`).
    recovery_only: bool,
}
