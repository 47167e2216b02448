//! The postmaster child: starting it (and waiting until it accepts connections, or only until
//! crash recovery is done), stopping it with escalating signals, signalling a reload, and
//! forwarding its output to the agent's log.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::time::Instant;

use crate::agent::instance::check_port_free;
use crate::postgres::probe::{self, InstanceProbe, ProbeError};
use crate::postgres::{promote, roles};
use crate::protocol::api::StopMode;

use super::{ActionError, LOG_TAIL_LINES, Phase, Supervisor, lock};

impl Supervisor {
    /// Spawns the postmaster and waits until it accepts connections. As primary, also makes sure
    /// the replication user exists with the password from its file.
    pub(super) async fn start_postgres(&mut self) -> Result<(), ActionError> {
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
        let in_recovery = promote::in_recovery(&client).await?;
        if !in_recovery {
            roles::ensure_replication_role(
                &client,
                &config.replication_user,
                config.replication_password.current().expose(),
            )
            .await?;
            super::ensure_app_access(&client, &config).await?;
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
            // A data directory that has served is no longer a first bootstrap's: a later
            // restart runs on the start budget, not the bootstrap budget.
            if phase == Phase::Running {
                s.new_data_dir = false;
            }
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
    pub(super) async fn stop_postgres(&mut self, mode: StopMode) -> Result<(), ActionError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.started_at = None;
        self.update(|s| s.clean_stop = false);
        let stop_timeout = self.config().stop_timeout;
        let first = match mode {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        };
        tracing::info!(?mode, "stopping postgres");
        let mut clean = false;
        let result = match signal_and_wait(&mut child, first, stop_timeout).await {
            Ok(status) => {
                // A fast shutdown that completed: every WAL sender has sent all WAL.
                clean = mode == StopMode::Fast && status.success();
                Ok(())
            }
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
        tracing::info!(?mode, clean, "postgres stopped");
        self.update(|s| {
            s.pid = None;
            s.clean_stop = clean;
        });
        result
    }

    pub(super) async fn probe_local(&self) -> Result<InstanceProbe, ProbeError> {
        self.handle.probe(Duration::from_secs(5)).await
    }

    pub(super) fn reload(&self) -> Result<(), ActionError> {
        if let Some(pid) = lock(&self.handle.state).pid {
            kill(Pid::from_raw(pid as i32), Signal::SIGHUP)
                .map_err(|e| ActionError::Start(format!("failed to signal a reload: {e}")))?;
        }
        Ok(())
    }
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
