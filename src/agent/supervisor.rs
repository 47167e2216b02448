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

use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agent::instance::{
    AgentConfig, InstanceError, check_port_free, clone_from, prepare_upstream,
    prepare_upstream_with, sibling, write_configuration,
};
use crate::postgres::probe::{self, InstanceProbe, ProbeError};
use crate::postgres::process::{read_controldata, run_tool};
use crate::protocol::api::{RejoinPath, RejoinReport, Role, StopMode, Upstream};

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
}

impl SupervisorHandle {
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// A snapshot of the shared state.
    pub fn state(&self) -> SupervisorState {
        lock(&self.state).clone()
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

    /// Parameters whose new value waits for a restart (`pg_settings.pending_restart`).
    /// Asked on the kept session (it is part of every status): the backend re-reads the
    /// configuration files on the postmaster's SIGHUP before it runs its next query.
    /// Each with the value the server still runs with.
    pub async fn pending_restart(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, ProbeError> {
        let (client, _) = self.session(timeout).await?;
        let query = client.query(
            "SELECT name, setting FROM pg_settings WHERE pending_restart ORDER BY name",
            &[],
        );
        let rows = match tokio::time::timeout(timeout, query).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(source)) => {
                self.forget_session(&client).await;
                return Err(ProbeError::Query {
                    what: "pending restart settings",
                    source,
                });
            }
            Err(_) => {
                self.forget_session(&client).await;
                return Err(ProbeError::QueryTimeout { timeout });
            }
        };
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    async fn probe_client(&self, timeout: Duration) -> Result<tokio_postgres::Client, ProbeError> {
        probe::connect(&self.config.local_target(), timeout).await
    }

    /// The kept session to the local postgres, connected anew when there is none or it closed
    /// (postgres restarted); `true` when it was just connected.
    async fn session(
        &self,
        timeout: Duration,
    ) -> Result<(Arc<tokio_postgres::Client>, bool), ProbeError> {
        let mut session = self.status_session.lock().await;
        if let Some(client) = session.as_ref().filter(|c| !c.is_closed()) {
            return Ok((client.clone(), false));
        }
        *session = None;
        let client = Arc::new(probe::connect(&self.config.local_target(), timeout).await?);
        *session = Some(client.clone());
        Ok((client, true))
    }

    /// Drops the kept session if it is still `client` (after a failed query on it).
    async fn forget_session(&self, client: &Arc<tokio_postgres::Client>) {
        let mut session = self.status_session.lock().await;
        if session.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *session = None;
        }
    }

    /// Probes the local postgres (superuser over the Unix socket) on the kept session; a session
    /// that fails (backend terminated, postgres restarted) is dropped and the probe retried once
    /// on a fresh one. Every probe queries live: nothing is cached but the session.
    pub async fn probe(&self, timeout: Duration) -> Result<InstanceProbe, ProbeError> {
        let mut probe = self.probe_live(timeout).await?;
        self.remember_timeline(&mut probe);
        Ok(probe)
    }

    /// A standby whose WAL receiver stopped (its primary died) would report the timeline of
    /// its last restartpoint, which can be older than the WAL it holds; a peer rewound since
    /// would then look newer and the more advanced standby ineligible for promotion. So a
    /// standby reports the newest timeline it received WAL on since postgres started.
    fn remember_timeline(&self, probe: &mut InstanceProbe) {
        if !probe.in_recovery {
            return;
        }
        let mut remembered = lock(&self.received_timeline);
        if let Some(received) = probe
            .wal_receiver
            .as_ref()
            .and_then(|w| w.received_tli)
            .filter(|t| *t > 0)
        {
            *remembered = Some(remembered.map_or(received, |t| t.max(received)));
        }
        if let Some(received) = *remembered {
            probe.timeline = Some(probe.timeline.map_or(received, |t| t.max(received)));
        }
    }

    async fn probe_live(&self, timeout: Duration) -> Result<InstanceProbe, ProbeError> {
        let (client, fresh) = self.session(timeout).await?;
        match tokio::time::timeout(timeout, probe::probe_instance(&client)).await {
            Ok(Ok(probe)) => return Ok(probe),
            Ok(Err(error)) => {
                self.forget_session(&client).await;
                if fresh {
                    return Err(error);
                }
                tracing::debug!(%error, "kept postgres session failed; reconnecting");
            }
            // A hung postgres would hang a new session too: report it rather than wait twice.
            Err(_) => {
                self.forget_session(&client).await;
                return Err(ProbeError::QueryTimeout { timeout });
            }
        }
        let (client, _) = self.session(timeout).await?;
        let result = tokio::time::timeout(timeout, probe::probe_instance(&client))
            .await
            .map_err(|_| ProbeError::QueryTimeout { timeout })
            .and_then(|result| result);
        if result.is_err() {
            self.forget_session(&client).await;
        }
        result
    }
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
    let state = Arc::new(Mutex::new(SupervisorState {
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
    }));
    let handle = SupervisorHandle {
        commands,
        state,
        config,
        log_tail: Arc::new(Mutex::new(VecDeque::new())),
        status_session: Arc::new(tokio::sync::Mutex::new(None)),
        received_timeline: Arc::new(Mutex::new(None)),
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

/// Records the system identifier found by bootstrap.
pub fn set_system_identifier(handle: &SupervisorHandle, id: String) {
    lock(&handle.state).system_identifier = Some(id);
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

enum Event {
    Command(Option<Command>),
    Exited(std::io::Result<ExitStatus>),
    RestartDue,
}

async fn wait_child(child: &mut Option<Child>) -> std::io::Result<ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    fn config(&self) -> &AgentConfig {
        &self.handle.config
    }

    fn update(&self, change: impl FnOnce(&mut SupervisorState)) {
        change(&mut lock(&self.handle.state));
    }

    fn phase(&self) -> Phase {
        lock(&self.handle.state).phase
    }

    async fn run(&mut self) {
        loop {
            let event = tokio::select! {
                command = self.commands.recv() => Event::Command(command),
                status = wait_child(&mut self.child) => Event::Exited(status),
                () = wait_until(self.restart_at) => Event::RestartDue,
            };
            match event {
                Event::Command(None) => {
                    let _ = self.stop_postgres(StopMode::Fast).await;
                    return;
                }
                Event::Command(Some(Command::Shutdown(reply))) => {
                    let result = self
                        .stop_postgres(StopMode::Fast)
                        .await
                        .map(|()| ActionOutcome::message("postgres stopped; agent exiting"));
                    self.update(|s| s.phase = Phase::Stopped);
                    let _ = reply.send(result);
                    return;
                }
                Event::Command(Some(command)) => self.handle_command(command).await,
                Event::Exited(status) => self.on_unexpected_exit(status),
                Event::RestartDue => {
                    self.restart_at = None;
                    if matches!(self.phase(), Phase::Fenced | Phase::Stopped) {
                        continue;
                    }
                    if let Err(error) = self.start_postgres().await {
                        tracing::error!(%error, "restart after crash failed");
                        self.update(|s| s.last_error = Some(error.to_string()));
                        self.schedule_restart();
                    }
                }
            }
        }
    }

    fn on_unexpected_exit(&mut self, status: std::io::Result<ExitStatus>) {
        self.child = None;
        let ran_for = self.started_at.take().map(|t| t.elapsed());
        let phase = self.phase();
        self.update(|s| s.pid = None);
        if matches!(phase, Phase::Fenced | Phase::Stopped) {
            tracing::info!(?status, "postgres exited while fenced or stopped");
            return;
        }
        let tail = self.handle.log_tail().join("; ");
        tracing::error!(?status, log_tail = %tail, "postgres exited unexpectedly");
        if ran_for.is_some_and(|d| d >= STABLE_RUN) {
            self.backoff = MIN_BACKOFF;
        }
        self.update(|s| {
            s.phase = Phase::Starting;
            s.crash_restarts += 1;
            s.last_error = Some(format!("postgres exited unexpectedly ({status:?}): {tail}"));
        });
        self.schedule_restart();
    }

    fn schedule_restart(&mut self) {
        tracing::info!(
            backoff_ms = self.backoff.as_millis() as u64,
            "restarting postgres after backoff"
        );
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    async fn handle_command(&mut self, command: Command) {
        let (result, reply) = match command {
            Command::Start(reply) => (self.action_start().await, reply),
            Command::Stop(mode, reply) => (self.action_stop(mode).await, reply),
            Command::Fence(reply) => (self.action_fence().await, reply),
            Command::Promote(wait, reply) => (self.action_promote(wait).await, reply),
            Command::Follow(upstream, reply) => (self.action_follow(upstream).await, reply),
            Command::Rejoin(upstream, reply) => (self.action_rejoin(upstream).await, reply),
            Command::Shutdown(reply) => (unreachable_shutdown(), reply),
            Command::Restart(reply) => (self.action_restart().await, reply),
            Command::Parameters(parameters, reply) => {
                (self.action_parameters(parameters).await, reply)
            }
        };
        match &result {
            Ok(outcome) => tracing::info!(message = %outcome.message, "action done"),
            Err(error) => {
                tracing::error!(%error, "action failed");
                if !error.is_refusal() {
                    self.update(|s| s.last_error = Some(error.to_string()));
                }
            }
        }
        let _ = reply.send(result);
    }

    // ---- process control -------------------------------------------------------------------

    /// Spawns the postmaster and waits until it accepts connections. As primary, also makes sure
    /// the replication user exists with the password from its file.
    async fn start_postgres(&mut self) -> Result<(), ActionError> {
        if self.phase() == Phase::Fenced {
            return Err(ActionError::Refused(
                "postgres is fenced: only follow or rejoin may start it".into(),
            ));
        }
        if self.child.is_some() {
            return Ok(());
        }
        let config = self.handle.config.clone();
        check_port_free(&config.settings).map_err(ActionError::Start)?;
        self.update(|s| s.phase = Phase::Starting);
        lock(&self.handle.log_tail).clear();
        let mut command = config.identity.command(config.binaries.tool("postgres"));
        command
            .arg("-D")
            .arg(&config.data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // If the agent dies, postgres must not keep running unsupervised (it could keep
        // accepting writes after losing the lease): the kernel sends it SIGQUIT.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| ActionError::Start(format!("failed to spawn postgres: {e}")))?;
        let pid = child.id();
        if let Some(stdout) = child.stdout.take() {
            forward_lines(stdout, self.handle.log_tail.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            forward_lines(stderr, self.handle.log_tail.clone());
        }
        tracing::info!(
            ?pid,
            port = config.settings.port,
            "postgres started; waiting until it accepts connections"
        );
        self.update(|s| s.pid = pid);
        // A new postmaster: what an earlier one received says nothing about this one's WAL.
        *lock(&self.handle.received_timeline) = None;
        let deadline = Instant::now() + config.start_timeout;
        if self.recovery_only {
            return self.await_recovered(child, deadline).await;
        }
        let client = loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.update(|s| s.pid = None);
                // Let the log forwarders catch the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(ActionError::Start(format!(
                    "postgres exited during startup ({status}): {}",
                    self.handle.log_tail().join("; ")
                )));
            }
            match probe::connect(&config.local_target(), Duration::from_secs(2)).await {
                Ok(client) => break client,
                Err(error) if Instant::now() >= deadline => {
                    let _ = kill_child(&mut child, Signal::SIGQUIT).await;
                    self.update(|s| s.pid = None);
                    return Err(ActionError::Start(format!(
                        "postgres did not accept connections within {:?} ({}): {}",
                        config.start_timeout,
                        error.cause(),
                        self.handle.log_tail().join("; ")
                    )));
                }
                // A refusal while starting up comes before authentication: cheap to retry often.
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        };
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|source| ProbeError::Query {
                what: "recovery state",
                source,
            })?
            .get(0);
        if !in_recovery {
            ensure_replication_user(&client, &config).await?;
        }
        // The first status probe needs no handshake of its own.
        *self.handle.status_session.lock().await = Some(Arc::new(client));
        self.child = Some(child);
        self.started_at = Some(Instant::now());
        let phase = if self.hold_starting {
            Phase::Starting
        } else {
            Phase::Running
        };
        self.update(|s| {
            s.phase = phase;
            s.last_error = None;
        });
        tracing::info!(?pid, in_recovery, "postgres is up");
        Ok(())
    }

    /// Waits for a postgres started only to complete crash recovery (it is stopped again right
    /// away): readiness from the postmaster's status line, as pg_ctl reads it, instead of a
    /// session whose handshake would be wasted.
    async fn await_recovered(
        &mut self,
        mut child: Child,
        deadline: Instant,
    ) -> Result<(), ActionError> {
        let pidfile = self.config().data_dir.join("postmaster.pid");
        // The crashed postmaster's file is still there until the new one writes its own.
        let pid = child.id().map(|p| p.to_string());
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.update(|s| s.pid = None);
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(ActionError::Start(format!(
                    "postgres exited during crash recovery ({status}): {}",
                    self.handle.log_tail().join("; ")
                )));
            }
            let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
            let mut lines = text.lines().map(str::trim);
            let ours = pid.is_some() && lines.next() == pid.as_deref();
            if ours && matches!(lines.nth(6), Some("standby" | "ready")) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = kill_child(&mut child, Signal::SIGQUIT).await;
                self.update(|s| s.pid = None);
                return Err(ActionError::Start(format!(
                    "postgres did not complete crash recovery within {:?}: {}",
                    self.config().start_timeout,
                    self.handle.log_tail().join("; ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = Some(child);
        self.started_at = Some(Instant::now());
        tracing::info!("crash recovery done");
        Ok(())
    }

    /// Stops the postmaster: fast (SIGINT) bounded by `stop_timeout`, then immediate (SIGQUIT),
    /// then SIGKILL as a last resort.
    async fn stop_postgres(&mut self, mode: StopMode) -> Result<(), ActionError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.started_at = None;
        let stop_timeout = self.config().stop_timeout;
        let first = match mode {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        };
        tracing::info!(?mode, "stopping postgres");
        let result = match signal_and_wait(&mut child, first, stop_timeout).await {
            Ok(_) => Ok(()),
            Err(()) if mode == StopMode::Fast => {
                tracing::warn!(
                    timeout_ms = stop_timeout.as_millis() as u64,
                    "fast shutdown took too long; escalating to immediate"
                );
                match signal_and_wait(&mut child, Signal::SIGQUIT, Duration::from_secs(5)).await {
                    Ok(_) => Ok(()),
                    Err(()) => kill_child(&mut child, Signal::SIGKILL).await,
                }
            }
            Err(()) => kill_child(&mut child, Signal::SIGKILL).await,
        };
        self.update(|s| s.pid = None);
        result
    }

    async fn probe_local(&self) -> Result<InstanceProbe, ProbeError> {
        self.handle.probe(Duration::from_secs(5)).await
    }

    // ---- actions ---------------------------------------------------------------------------

    async fn action_start(&mut self) -> Result<ActionOutcome, ActionError> {
        if self.phase() == Phase::Fenced {
            return Err(ActionError::Refused(
                "fenced: use follow or rejoin to restart this instance".into(),
            ));
        }
        let (role, upstream) = {
            let state = lock(&self.handle.state);
            (state.intended_role, state.upstream.clone())
        };
        let config = self.handle.config.clone();
        let upstream = if role == Role::Replica {
            upstream
        } else {
            None
        };
        // A data directory last run as a primary (crashed or shut down) may hold WAL its new
        // primary never had. Rewind it before it serves as a replica: starting it, having the
        // observer find it diverged, stopping and rewinding it then costs a second.
        if let Some(upstream) = upstream.clone()
            && self.child.is_none()
            && let Some(crashed) = self.last_ran_as_primary().await
        {
            tracing::info!(
                host = %upstream.host,
                port = upstream.port,
                crashed,
                "the data directory was last a primary's: rewinding it before it serves as a replica"
            );
            // A crashed one first completes crash recovery in a standby start (reported as
            // starting) and a fast stop: measured faster than pg_rewind's own single-user
            // recovery, whose writes its final sync then has to flush once more.
            if crashed {
                write_configuration(&config, &config.data_dir, Some(&upstream))?;
                self.restart_at = None;
                self.hold_starting = true;
                self.recovery_only = true;
                let recovered = self.start_postgres().await;
                self.hold_starting = false;
                self.recovery_only = false;
                if let Err(error) = recovered {
                    self.update(|s| s.phase = Phase::Stopped);
                    return Err(error);
                }
            }
            match self.action_rejoin(upstream).await {
                Ok(outcome) => return Ok(outcome),
                // Unreachable primary and the like: start as is; the observer rejoins it later.
                Err(error) => {
                    tracing::warn!(%error, "rewind before serving failed; starting as is")
                }
            }
        }
        write_configuration(&config, &config.data_dir, upstream.as_ref())?;
        self.restart_at = None;
        self.update(|s| s.phase = Phase::Starting);
        if let Err(error) = self.start_postgres().await {
            self.update(|s| s.phase = Phase::Stopped);
            return Err(error);
        }
        Ok(ActionOutcome::message(
            format!("postgres started as {role:?}").to_lowercase(),
        ))
    }

    /// Whether the control file says the data directory last ran as a primary: `Some(true)`
    /// crashed ("in production"), `Some(false)` cleanly stopped ("shut down"; a standby's says
    /// "... in recovery"). A fresh clone also says "in production" but carries a `backup_label`.
    async fn last_ran_as_primary(&self) -> Option<bool> {
        let config = self.config();
        if config.data_dir.join("backup_label").exists() {
            return None;
        }
        match read_controldata(&config.binaries, &config.identity, &config.data_dir).await {
            Ok(control) => match control.cluster_state.as_str() {
                "in production" => Some(true),
                "shut down" => Some(false),
                _ => None,
            },
            Err(error) => {
                tracing::warn!(%error, "failed to read the control file");
                None
            }
        }
    }

    async fn action_stop(&mut self, mode: StopMode) -> Result<ActionOutcome, ActionError> {
        if self.phase() != Phase::Fenced {
            self.update(|s| s.phase = Phase::Stopped);
        }
        self.restart_at = None;
        self.stop_postgres(mode).await?;
        Ok(ActionOutcome::message(format!(
            "postgres stopped ({})",
            match mode {
                StopMode::Fast => "fast",
                StopMode::Immediate => "immediate",
            }
        )))
    }

    async fn action_fence(&mut self) -> Result<ActionOutcome, ActionError> {
        self.update(|s| s.phase = Phase::Fenced);
        self.restart_at = None;
        self.stop_postgres(StopMode::Immediate).await?;
        Ok(ActionOutcome::message(
            "fenced: postgres stopped immediately",
        ))
    }

    async fn action_promote(&mut self, wait: Duration) -> Result<ActionOutcome, ActionError> {
        if self.phase() != Phase::Running {
            return Err(ActionError::Refused(format!(
                "cannot promote: postgres is not running (phase {:?})",
                self.phase()
            )));
        }
        let config = self.handle.config.clone();
        // On the kept session: a new (SCRAM) session would delay the promotion itself.
        let (session, _) = self.handle.session(Duration::from_secs(5)).await?;
        let in_recovery = |session: Arc<tokio_postgres::Client>| async move {
            session
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map(|row| row.get::<_, bool>(0))
                .map_err(|source| ProbeError::Query {
                    what: "recovery state",
                    source,
                })
        };
        if !in_recovery(session.clone()).await? {
            return Err(ActionError::Refused(
                "cannot promote: already a primary".into(),
            ));
        }
        // Slots carried over from this instance's earlier life as a primary are stale: every
        // replica re-creates its own when it follows; left alone they would pin WAL. Dropped
        // while still a standby: nobody follows it yet, whereas after the promotion a replica
        // rejoining at once may already have found its slot here and be about to use it.
        let stale_dropped = session
            .batch_execute(STALE_SLOTS_DROP)
            .await
            .inspect_err(|error| {
                tracing::debug!(%error, "could not drop stale slots as a standby; after promotion then")
            })
            .is_ok();
        // Signal without waiting and watch every 10 ms: pg_promote's own wait polls every 100 ms.
        let signalled: bool = session
            .query_one("SELECT pg_promote(false)", &[])
            .await
            .map_err(|e| ActionError::Promote(e.to_string()))?
            .get(0);
        if !signalled {
            return Err(ActionError::Promote(
                "pg_promote could not signal the startup process".into(),
            ));
        }
        let deadline = Instant::now() + wait.max(Duration::from_secs(1));
        while in_recovery(session.clone()).await? {
            if Instant::now() >= deadline {
                return Err(ActionError::Promote(format!(
                    "still in recovery {} s after pg_promote",
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(session);
        tracing::info!("promoted: out of recovery");
        // A rejoin report describes this instance as a replica; as a primary it has none (an
        // observer may take a current report as proof that a former primary was rewound).
        self.update(|s| s.last_rejoin = None);
        // The rest takes its own session: a CHECKPOINT on the kept one would hold up status
        // probes queued behind it.
        let client = probe::connect(&config.local_target(), Duration::from_secs(5)).await?;
        // The control file shows the new timeline only after a checkpoint; pg_rewind and
        // followers read it from there.
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(|e| ActionError::Promote(format!("CHECKPOINT after promotion: {e}")))?;
        if !stale_dropped && let Err(error) = client.batch_execute(STALE_SLOTS_DROP).await {
            tracing::warn!(%error, "failed to drop stale replication slots after promotion");
        }
        // The configuration on disk must no longer point at the old primary.
        write_configuration(&config, &config.data_dir, None)?;
        self.reload()?;
        ensure_replication_user(&client, &config).await?;
        self.update(|s| {
            s.intended_role = Role::Primary;
            s.upstream = None;
        });
        Ok(ActionOutcome::message("promoted to primary"))
    }

    async fn action_restart(&mut self) -> Result<ActionOutcome, ActionError> {
        if self.phase() != Phase::Running || self.child.is_none() {
            return Err(ActionError::Refused(format!(
                "cannot restart: postgres is not running (phase {:?})",
                self.phase()
            )));
        }
        let (role, upstream) = {
            let state = lock(&self.handle.state);
            (state.intended_role, state.upstream.clone())
        };
        let config = self.handle.config.clone();
        let upstream = if role == Role::Replica {
            upstream
        } else {
            None
        };
        // Starting (not Running) while down: the lease keeper of a primary sees a restart, not
        // a stop, and keeps renewing.
        self.update(|s| s.phase = Phase::Starting);
        self.restart_at = None;
        if let Err(error) = self.stop_postgres(StopMode::Fast).await {
            self.schedule_restart();
            return Err(error);
        }
        if let Err(error) = write_configuration(&config, &config.data_dir, upstream.as_ref()) {
            self.schedule_restart();
            return Err(error.into());
        }
        if let Err(error) = self.start_postgres().await {
            // As after a crash: keep trying with backoff rather than stay down.
            if self.phase() == Phase::Starting {
                self.schedule_restart();
            }
            return Err(error);
        }
        Ok(ActionOutcome::message(
            format!("postgres restarted as {role:?}").to_lowercase(),
        ))
    }

    async fn action_parameters(
        &mut self,
        parameters: std::collections::BTreeMap<String, String>,
    ) -> Result<ActionOutcome, ActionError> {
        use crate::agent::config::{
            parameters_hash, parse_parameters_file, render_parameters_include,
        };
        let config = self.handle.config.clone();
        let Some(path) = config.settings.parameters_include.clone() else {
            return Err(ActionError::Refused(
                "this agent has no parameters file (--parameters-file)".into(),
            ));
        };
        let text = render_parameters_include(&parameters);
        // The rendering round-trips through the parser: refuses agent-owned or malformed names.
        parse_parameters_file(&text).map_err(|e| ActionError::Refused(e.to_string()))?;
        let hash = parameters_hash(&parameters);
        let unchanged = std::fs::read_to_string(&path).is_ok_and(|current| current == text);
        if !unchanged {
            write_include(&config, &path, &text)?;
        }
        let running = self.phase() == Phase::Running && self.child.is_some();
        if unchanged || !running {
            self.update(|s| s.parameters_hash = Some(hash.clone()));
            return Ok(ActionOutcome::message(format!(
                "parameters {hash} written{}",
                if running {
                    ""
                } else {
                    " (used at the next start)"
                }
            )));
        }
        let load_time = |client: tokio_postgres::Client| async move {
            client
                .query_one("SELECT pg_conf_load_time()::text", &[])
                .await
                .map(|row| row.get::<_, String>(0))
                .map_err(|source| ProbeError::Query {
                    what: "configuration load time",
                    source,
                })
        };
        let before = load_time(self.handle.probe_client(Duration::from_secs(5)).await?).await?;
        self.reload()?;
        // A new session inherits the postmaster's configuration: once its load time moved,
        // the postmaster has re-read the files and `pending_restart` is meaningful.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = load_time(self.handle.probe_client(Duration::from_secs(5)).await?).await?;
            if now != before {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ActionError::Start(
                    "postgres did not reload its configuration within 10 s".into(),
                ));
            }
        }
        self.update(|s| s.parameters_hash = Some(hash.clone()));
        let pending: Vec<String> = self
            .handle
            .pending_restart(Duration::from_secs(5))
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        tracing::info!(%hash, ?pending, "parameters reloaded");
        Ok(ActionOutcome::message(if pending.is_empty() {
            format!("parameters {hash} reloaded")
        } else {
            format!(
                "parameters {hash} reloaded; waiting for a restart: {}",
                pending.join(", ")
            )
        }))
    }

    fn reload(&self) -> Result<(), ActionError> {
        if let Some(pid) = lock(&self.handle.state).pid {
            kill(Pid::from_raw(pid as i32), Signal::SIGHUP)
                .map_err(|e| ActionError::Start(format!("failed to signal a reload: {e}")))?;
        }
        Ok(())
    }

    fn with_default_slot(&self, mut upstream: Upstream) -> Upstream {
        if upstream.slot.is_none() {
            upstream.slot = Some(self.config().default_slot());
        }
        upstream
    }

    async fn action_follow(&mut self, upstream: Upstream) -> Result<ActionOutcome, ActionError> {
        let upstream = self.with_default_slot(upstream);
        let config = self.handle.config.clone();
        if self.child.is_some() {
            let probe = self.probe_local().await?;
            if !probe.in_recovery {
                return Err(ActionError::Refused(
                    "cannot follow: this instance is a running primary; use rejoin".into(),
                ));
            }
        }
        prepare_upstream(&config, &upstream).await?;
        write_configuration(&config, &config.data_dir, Some(&upstream))?;
        self.update(|s| {
            s.intended_role = Role::Replica;
            s.upstream = Some(upstream.clone());
        });
        if self.child.is_some() {
            self.reload()?;
            return Ok(ActionOutcome::message(format!(
                "following {}:{} (configuration reloaded)",
                upstream.host, upstream.port
            )));
        }
        self.update(|s| {
            s.phase = Phase::Starting;
            s.fence_reason = None;
        });
        self.restart_at = None;
        self.start_postgres().await?;
        Ok(ActionOutcome::message(format!(
            "following {}:{} (started as a standby)",
            upstream.host, upstream.port
        )))
    }

    /// Rejoin: the instance reports `Starting` until it streams from `upstream` (an observer
    /// must not take a replica still being rewound, or not yet streaming, for a rejoined one);
    /// then `Running`, with the rejoin report in place. A fence that came meanwhile stays.
    async fn action_rejoin(&mut self, upstream: Upstream) -> Result<ActionOutcome, ActionError> {
        self.hold_starting = true;
        let result = self.rejoin(upstream).await;
        self.hold_starting = false;
        let running = self.child.is_some();
        self.update(|s| {
            if running && s.phase == Phase::Starting {
                s.phase = Phase::Running;
            }
        });
        result
    }

    async fn rejoin(&mut self, upstream: Upstream) -> Result<ActionOutcome, ActionError> {
        let upstream = self.with_default_slot(upstream);
        let config = self.handle.config.clone();
        self.update(|s| {
            s.phase = Phase::Starting;
            s.fence_reason = None;
            s.intended_role = Role::Replica;
            s.upstream = Some(upstream.clone());
        });
        self.restart_at = None;

        // CHECKPOINT on the new primary first: right after a promotion its control file still
        // shows the old timeline, and pg_rewind would wrongly conclude "no rewind required".
        // One session does it, ensures the slot and reads the timeline to stream on, while the
        // local postgres stops.
        let prepare = async {
            let primary = probe::connect(
                &config.remote_target(&upstream.host, upstream.port),
                config.primary_timeout,
            )
            .await?;
            primary
                .batch_execute("CHECKPOINT")
                .await
                .map_err(|source| ProbeError::Query {
                    what: "CHECKPOINT on the new primary",
                    source,
                })?;
            prepare_upstream_with(&primary, &upstream).await?;
            Ok::<_, ActionError>(probe::probe_instance(&primary).await?.timeline)
        };
        let (stopped, prepared) = tokio::join!(self.stop_postgres(StopMode::Fast), prepare);
        stopped?;
        let primary_timeline = prepared?;

        let rewind_failure = match self.rejoin_by_rewind(&upstream, primary_timeline).await {
            Ok(()) => None,
            Err(error) => Some(error.to_string()),
        };
        let path = match &rewind_failure {
            None => RejoinPath::Rewind,
            Some(failure) => {
                tracing::warn!(%failure, "pg_rewind path failed; re-cloning");
                if let Err(error) = self.rejoin_by_reclone(&upstream).await {
                    return Err(ActionError::Rejoin {
                        rewind: failure.clone(),
                        reclone: error.to_string(),
                    });
                }
                RejoinPath::Reclone
            }
        };
        let report = RejoinReport {
            path,
            rewind_failure,
            upstream: upstream.clone(),
            finished_at: Utc::now(),
        };
        self.update(|s| s.last_rejoin = Some(report.clone()));
        Ok(ActionOutcome {
            message: format!(
                "rejoined {}:{} by {}",
                upstream.host,
                upstream.port,
                match path {
                    RejoinPath::Rewind => "pg_rewind",
                    RejoinPath::Reclone => "re-clone",
                }
            ),
            rejoin: Some(report),
        })
    }

    async fn rejoin_by_rewind(
        &mut self,
        upstream: &Upstream,
        primary_timeline: Option<u32>,
    ) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        let source = crate::agent::config::conninfo(
            &upstream.host,
            upstream.port,
            &config.superuser,
            &config.passfile(),
            config.name(),
            Some("postgres"),
        );
        let mut command = config.identity.command(config.binaries.tool("pg_rewind"));
        command
            .arg("--target-pgdata")
            .arg(&config.data_dir)
            .arg(format!("--source-server={source}"))
            .arg("--progress");
        tracing::info!(host = %upstream.host, port = upstream.port, "running pg_rewind");
        let started = Instant::now();
        run_tool("pg_rewind", command)
            .await
            .map_err(|e| ActionError::Rewind(e.to_string()))?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pg_rewind done"
        );
        // pg_rewind copied the source's configuration files: render ours again.
        write_configuration(&config, &config.data_dir, Some(upstream))?;
        let started = Instant::now();
        self.start_postgres().await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "postgres up after pg_rewind"
        );
        self.verify_streaming(upstream, primary_timeline).await
    }

    async fn rejoin_by_reclone(&mut self, upstream: &Upstream) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        self.stop_postgres(StopMode::Fast).await?;
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3f").to_string();
        let fresh = sibling(&config.data_dir, &format!("reclone-{stamp}"));
        if let Err(error) = clone_from(&config, upstream, &fresh).await {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(error.into());
        }
        let old = sibling(&config.data_dir, &format!("old-{stamp}"));
        rename(&config.data_dir, &old)?;
        if let Err(error) = rename(&fresh, &config.data_dir) {
            // Put the old directory back rather than leave nothing in place.
            let _ = std::fs::rename(&old, &config.data_dir);
            return Err(error);
        }
        tracing::info!(old = %old.display(), "swapped in the re-cloned data directory");
        self.start_postgres().await?;
        self.verify_streaming(upstream, None).await?;
        // Only now is the old data directory no longer needed.
        if let Err(error) = std::fs::remove_dir_all(&old) {
            tracing::warn!(%error, old = %old.display(), "failed to remove the replaced data directory");
        }
        Ok(())
    }

    /// A rejoin counts only when the instance streams from `upstream` on its timeline (read from
    /// the primary unless the caller just did).
    async fn verify_streaming(
        &mut self,
        upstream: &Upstream,
        primary_timeline: Option<u32>,
    ) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        let primary_timeline = match primary_timeline {
            Some(timeline) => Some(timeline),
            None => {
                let primary = probe::connect(
                    &config.remote_target(&upstream.host, upstream.port),
                    config.primary_timeout,
                )
                .await?;
                probe::probe_instance(&primary).await?.timeline
            }
        };
        let deadline = Instant::now() + config.verify_timeout;
        let mut last_seen = String::from("no probe yet");
        while Instant::now() < deadline {
            if self.child.is_none() {
                return Err(ActionError::Start(format!(
                    "postgres exited while verifying replication: {}",
                    self.handle.log_tail().join("; ")
                )));
            }
            match self.probe_local().await {
                Ok(probe) => {
                    let receiver = probe.wal_receiver.as_ref();
                    let streaming = receiver.is_some_and(|r| r.status.is_streaming());
                    let on_timeline = receiver.and_then(|r| r.received_tli) == primary_timeline;
                    if probe.in_recovery && streaming && on_timeline {
                        return Ok(());
                    }
                    last_seen = format!(
                        "in_recovery={}, receiver={:?}, primary timeline {:?}",
                        probe.in_recovery,
                        receiver.map(|r| (&r.status, r.received_tli)),
                        primary_timeline
                    );
                }
                Err(error) => last_seen = error.to_string(),
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                self.update(|s| s.pid = None);
                return Err(ActionError::Start(format!(
                    "postgres exited ({status}) while verifying replication: {}",
                    self.handle.log_tail().join("; ")
                )));
            }
            // Cheap on the kept session; the rejoin is done the moment it streams.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(ActionError::Start(format!(
            "not streaming from {}:{} after {:?} ({last_seen}); postgres log: {}",
            upstream.host,
            upstream.port,
            config.verify_timeout,
            self.handle.log_tail().join("; ")
        )))
    }
}

/// Writes the parameters include atomically (a reload never reads half a file), readable by
/// the postgres user only.
fn write_include(config: &AgentConfig, path: &Path, text: &str) -> Result<(), ActionError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ActionError::Instance(InstanceError::Io { what, path, source })
    };
    let temporary = path.with_extension("conf.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io("write", &temporary))?;
    file.write_all(text.as_bytes())
        .map_err(io("write", &temporary))?;
    config
        .identity
        .chown(&temporary)
        .map_err(io("chown", &temporary))?;
    std::fs::rename(&temporary, path).map_err(io("rename parameters file to", path))
}

/// Drops this agent family's inactive physical slots (see the promotion).
const STALE_SLOTS_DROP: &str = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
     WHERE slot_type = 'physical' AND NOT active AND slot_name LIKE 'pgrs\\_%'";

fn unreachable_shutdown() -> Result<ActionOutcome, ActionError> {
    Err(ActionError::SupervisorGone)
}

fn rename(from: &Path, to: &Path) -> Result<(), ActionError> {
    std::fs::rename(from, to).map_err(|source| {
        ActionError::Instance(InstanceError::Io {
            what: "rename data directory to",
            path: to.to_path_buf(),
            source,
        })
    })
}

/// Sends `signal` and waits up to `timeout` for the exit.
async fn signal_and_wait(
    child: &mut Child,
    signal: Signal,
    timeout: Duration,
) -> Result<ExitStatus, ()> {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Ok(status),
        _ => Err(()),
    }
}

async fn kill_child(child: &mut Child, signal: Signal) -> Result<(), ActionError> {
    signal_and_wait(child, signal, Duration::from_secs(10))
        .await
        .map(|_| ())
        .map_err(|()| ActionError::Stop(format!("postgres did not exit after {signal}")))
}

/// Forwards postgres output lines to the agent's log and keeps the last few for error messages.
fn forward_lines<R>(reader: R, tail: Arc<Mutex<VecDeque<String>>>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "postgres", "{line}");
            let mut tail = lock(&tail);
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

/// Creates or updates the replication user with a SCRAM verifier computed here, so the
/// password itself never travels in SQL text (logs, pg_stat_activity).
async fn ensure_replication_user(
    client: &tokio_postgres::Client,
    config: &AgentConfig,
) -> Result<(), ActionError> {
    let verifier =
        postgres_protocol::password::scram_sha_256(config.replication_password.expose().as_bytes());
    let user = postgres_protocol::escape::escape_identifier(&config.replication_user);
    let literal = postgres_protocol::escape::escape_literal(&verifier);
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&config.replication_user],
        )
        .await
        .map_err(|source| ProbeError::Query {
            what: "replication user",
            source,
        })?
        .is_some();
    let statement = if exists {
        format!("ALTER ROLE {user} WITH REPLICATION LOGIN PASSWORD {literal}")
    } else {
        format!("CREATE ROLE {user} WITH REPLICATION LOGIN PASSWORD {literal}")
    };
    client
        .batch_execute(&statement)
        .await
        .map_err(|source| ProbeError::Query {
            what: "create replication user",
            source,
        })?;
    Ok(())
}
