//! The supervisor's run loop: commands in arrival order, the postmaster's unexpected exits and
//! the crash restarts with backoff.

use std::process::ExitStatus;

use tokio::process::Child;
use tokio::time::Instant;

use crate::agent::instance::AgentConfig;
use crate::protocol::api::StopMode;

use super::{
    ActionError, ActionOutcome, Command, MAX_BACKOFF, MIN_BACKOFF, Phase, STABLE_RUN, Supervisor,
    SupervisorState, lock,
};

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
    pub(super) fn config(&self) -> &AgentConfig {
        &self.handle.config
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut SupervisorState)) {
        change(&mut lock(&self.handle.state));
    }

    pub(super) fn phase(&self) -> Phase {
        lock(&self.handle.state).phase
    }

    pub(super) async fn run(&mut self) {
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

    pub(super) fn schedule_restart(&mut self) {
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
}

fn unreachable_shutdown() -> Result<ActionOutcome, ActionError> {
    Err(ActionError::SupervisorGone)
}
