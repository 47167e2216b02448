//! One container of a pod (init or regular) and its process: what it runs, where, its
//! probes' state and its status in the pod's status.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use super::probe::{self, ProbeState};
use super::sandbox::Sandbox;

/// One container (init or regular) and its process.
pub(super) struct Runner {
    pub(super) container: Container,
    pub(super) program: PathBuf,
    pub(super) argv: Vec<String>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) sandbox: Sandbox,
    pub(super) log: PathBuf,
    pub(super) init: bool,
    pub(super) child: Option<tokio::process::Child>,
    pub(super) pid: Option<u32>,
    pub(super) started_at: Option<Time>,
    pub(super) restart_count: i32,
    pub(super) restart_at: Option<Instant>,
    pub(super) last_terminated: Option<Value>,
    /// Set when the container finished and will not be restarted.
    pub(super) terminated: Option<Value>,
    pub(super) readiness: ProbeSlot,
    pub(super) liveness: ProbeSlot,
    pub(super) startup: ProbeSlot,
    /// When a liveness/startup failure asked the process to stop: SIGKILL after this.
    pub(super) kill_at: Option<Instant>,
}

/// One kind of probe of a container: its results and when it runs next.
#[derive(Debug, Clone)]
pub(super) struct ProbeSlot {
    pub(super) state: ProbeState,
    pub(super) next: Instant,
}

impl ProbeSlot {
    /// A fresh slot for a (re)started container: first run after initialDelaySeconds.
    pub(super) fn fresh(probe: Option<&k8s_openapi::api::core::v1::Probe>) -> Self {
        Self {
            state: ProbeState::default(),
            next: Instant::now() + probe.map(probe::initial_delay).unwrap_or_default(),
        }
    }
}

impl Runner {
    /// Running and past its startup probe (if any).
    pub(super) fn is_started(&self) -> bool {
        self.child.is_some() && (self.container.startup_probe.is_none() || self.startup.state.ready)
    }

    pub(super) fn is_ready(&self) -> bool {
        if !self.is_started() {
            return false;
        }
        match &self.container.readiness_probe {
            Some(_) => self.readiness.state.ready,
            None => true,
        }
    }

    pub(super) fn reset_probes(&mut self) {
        self.readiness = ProbeSlot::fresh(self.container.readiness_probe.as_ref());
        self.liveness = ProbeSlot::fresh(self.container.liveness_probe.as_ref());
        self.startup = ProbeSlot::fresh(self.container.startup_probe.as_ref());
        self.kill_at = None;
    }

    pub(super) fn status(&self) -> Value {
        let state = if let Some(t) = &self.terminated {
            json!({ "terminated": t })
        } else if self.child.is_some() {
            json!({ "running": { "startedAt": self.started_at } })
        } else if self.restart_count > 0 {
            json!({ "waiting": { "reason": "CrashLoopBackOff", "message": "back-off restarting the container" } })
        } else {
            json!({ "waiting": { "reason": "PodInitializing" } })
        };
        let mut status = json!({
            "name": self.container.name,
            "image": self.container.image,
            "imageID": "",
            "ready": self.is_ready(),
            "started": self.is_started(),
            "restartCount": self.restart_count,
            "state": state,
        });
        if let Some(last) = &self.last_terminated {
            status["lastState"] = json!({ "terminated": last });
        }
        status
    }
}

pub(super) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

pub(super) fn status_signal(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.signal().unwrap_or(0)
}

pub(super) fn spawn(runner: &Runner) -> Result<tokio::process::Child, String> {
    let open = || {
        File::options()
            .create(true)
            .append(true)
            .open(&runner.log)
            .map_err(|e| format!("failed to open {}: {e}", runner.log.display()))
    };
    let mut command = tokio::process::Command::new(&runner.program);
    command
        .args(&runner.argv)
        .env_clear()
        .envs(&runner.env)
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?);
    runner
        .sandbox
        .apply(&mut command)
        .map_err(|e| e.to_string())?;
    command
        .spawn()
        .map_err(|e| format!("failed to start {}: {e}", runner.program.display()))
}

impl Runner {
    /// A container not started yet, due to start at once.
    pub(super) fn new(
        container: Container,
        init: bool,
        program: PathBuf,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        sandbox: Sandbox,
        log: PathBuf,
    ) -> Self {
        Runner {
            container,
            program,
            argv,
            env,
            sandbox,
            log,
            init,
            child: None,
            pid: None,
            started_at: None,
            restart_count: 0,
            restart_at: Some(Instant::now()),
            last_terminated: None,
            terminated: None,
            readiness: ProbeSlot::fresh(None),
            liveness: ProbeSlot::fresh(None),
            startup: ProbeSlot::fresh(None),
            kill_at: None,
        }
    }
}
