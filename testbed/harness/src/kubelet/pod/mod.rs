//! One pod's life on the fake node: network namespace, volumes, container processes,
//! readiness probes, status, graceful deletion.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{DeleteParams, Preconditions};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;

mod prepare;
mod status;

use super::Context;
use super::env::container_env;
use super::probe;
use super::runner::{Runner, now, spawn, status_signal};
use super::sandbox::Sandbox;
use super::{security, volumes};
use crate::network::PodInterface;

const FIELD_MANAGER: &str = "pgrs-testbed-kubelet";
const TICK: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const DEFAULT_GRACE: i64 = 30;
const RETRY_PREPARE: Duration = Duration::from_secs(2);

/// Why a pod cannot start; shown in its status and as a Warning event.
#[derive(Debug)]
struct StartFailure {
    reason: &'static str,
    message: String,
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Runs the pod until it is deleted. `updates` carries the latest object (`None`
/// once the pod is gone from the API).
pub async fn run(ctx: Arc<Context>, mut updates: watch::Receiver<Option<Pod>>) {
    let Some(pod) = updates.borrow().clone() else {
        return;
    };
    let key = pod_key(&pod);
    let api: Api<Pod> = Api::namespaced(
        ctx.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
    );
    if pod.metadata.deletion_timestamp.is_some() {
        delete_now(&api, &pod).await;
        return;
    }
    let mut pod_run = PodRun {
        ctx: ctx.clone(),
        api,
        key,
        pod,
        iface: None,
        runners: Vec::new(),
        start_time: now(),
        last_patch: Value::Null,
        ready_since: now(),
        last_ready: false,
    };
    loop {
        match pod_run.prepare().await {
            Ok(()) => {
                pod_run.supervise(&mut updates).await;
                break;
            }
            Err(failure) => {
                tracing::warn!(pod = %pod_run.key, reason = failure.reason, message = %failure.message, "pod cannot start");
                pod_run.report_failure(&failure).await;
                // A missing ConfigMap/Secret may appear later (the kubelet retries);
                // an image we cannot run never will.
                let retry = (failure.reason != "ErrImagePull").then_some(RETRY_PREPARE);
                if !pod_run.wait_for_deletion(&mut updates, retry).await {
                    break;
                }
            }
        }
    }
    pod_run.cleanup().await;
}

struct PodRun {
    ctx: Arc<Context>,
    api: Api<Pod>,
    key: String,
    pod: Pod,
    iface: Option<PodInterface>,
    runners: Vec<Runner>,
    start_time: Time,
    last_patch: Value,
    ready_since: Time,
    last_ready: bool,
}

impl PodRun {
    fn name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    fn namespace(&self) -> String {
        self.pod.metadata.namespace.clone().unwrap_or_default()
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx.config.state_dir.join("pods").join(format!(
            "{}_{}_{}",
            self.namespace(),
            self.name(),
            self.pod.metadata.uid.as_deref().unwrap_or_default()
        ))
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_owned())
    }

    /// Starts containers, restarts them per restartPolicy, probes readiness and writes
    /// the status until the pod is deleted.
    async fn supervise(&mut self, updates: &mut watch::Receiver<Option<Pod>>) {
        loop {
            let update = tokio::select! {
                changed = updates.changed() => Some(changed.is_ok()),
                () = tokio::time::sleep(TICK) => None,
            };
            if let Some(alive) = update {
                let latest = if alive {
                    updates.borrow_and_update().clone()
                } else {
                    None
                };
                match latest {
                    None => {
                        // Gone from the API (deleted with grace 0 by someone else).
                        self.stop_all(Duration::ZERO).await;
                        return;
                    }
                    Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                        let grace = pod
                            .metadata
                            .deletion_grace_period_seconds
                            .or(pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(DEFAULT_GRACE);
                        self.pod.metadata = pod.metadata.clone();
                        self.stop_all(Duration::from_secs(
                            u64::try_from(grace.max(0)).unwrap_or(0),
                        ))
                        .await;
                        delete_now(&self.api, &pod).await;
                        return;
                    }
                    Some(pod) => {
                        // Keep our view of the status, take the rest.
                        let status = self.pod.status.clone();
                        self.pod = pod;
                        self.pod.status = status;
                    }
                }
            }
            self.step().await;
        }
    }

    /// One supervision round.
    async fn step(&mut self) {
        let policy = self.restart_policy();
        let init_pending = self
            .runners
            .iter()
            .any(|r| r.init && !r.terminated.as_ref().is_some_and(|t| t["exitCode"] == 0));
        for index in 0..self.runners.len() {
            // Reap.
            let exited = {
                let runner = &mut self.runners[index];
                match runner.child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => Some(status),
                    _ => None,
                }
            };
            if let Some(status) = exited {
                let runner = &mut self.runners[index];
                let code = status.code().unwrap_or(128 + status_signal(&status));
                let terminated = json!({
                    "exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": runner.started_at,
                    "finishedAt": now(),
                });
                tracing::info!(pod = %self.key, container = %runner.container.name, exit_code = code, "container exited");
                if let Some(pid) = runner.pid.take() {
                    self.ctx.forget_group(pid);
                    // Anything it left in its group goes with it, as in a container.
                    if let Ok(raw) = i32::try_from(pid) {
                        let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
                    }
                }
                runner.child = None;
                runner.reset_probes();
                let restart = if runner.init {
                    code != 0 && policy != "Never"
                } else {
                    policy == "Always" || (policy == "OnFailure" && code != 0)
                };
                if restart {
                    let backoff = Duration::from_secs(1u64 << runner.restart_count.clamp(0, 4))
                        .min(MAX_BACKOFF);
                    runner.restart_count += 1;
                    runner.last_terminated = Some(terminated);
                    runner.restart_at = Some(Instant::now() + backoff);
                } else {
                    runner.terminated = Some(terminated);
                    runner.restart_at = None;
                }
            }
            // Start: init containers one at a time in order, then the others.
            let may_start = if self.runners[index].init {
                self.runners[..index]
                    .iter()
                    .filter(|r| r.init)
                    .all(|r| r.terminated.as_ref().is_some_and(|t| t["exitCode"] == 0))
            } else {
                !init_pending
            };
            let due = self.runners[index]
                .restart_at
                .is_some_and(|at| Instant::now() >= at);
            if may_start && due && self.runners[index].child.is_none() {
                self.start(index);
            }
        }
        self.run_probes().await;
        let phase = self.phase();
        self.patch_status(phase).await;
    }

    /// Startup, readiness and liveness probes that are due. A failed startup or
    /// liveness probe stops the container (SIGTERM, then SIGKILL after the grace
    /// period); the restart policy brings it back.
    async fn run_probes(&mut self) {
        let target = probe::Target {
            pod_ip: self
                .iface
                .as_ref()
                .map(|i| i.ip)
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            source: self.ctx.network.probe_source(),
        };
        let pod_grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE);
        let images = self.ctx.config.images.clone();
        for runner in &mut self.runners {
            if runner.child.is_none() {
                continue;
            }
            if let Some(kill_at) = runner.kill_at {
                if Instant::now() >= kill_at
                    && let Some(pid) = runner.pid.and_then(|p| i32::try_from(p).ok())
                {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                continue;
            }
            let container = runner.container.clone();
            let image = container.image.clone().unwrap_or_default();
            let mut kill: Option<(String, i64)> = None;
            let kinds = [
                ("startup", container.startup_probe.as_ref()),
                ("readiness", container.readiness_probe.as_ref()),
                ("liveness", container.liveness_probe.as_ref()),
            ];
            for (kind, spec) in kinds {
                let Some(spec) = spec else {
                    continue;
                };
                let started = runner.is_started();
                let slot = match kind {
                    "startup" if !started => &mut runner.startup,
                    "readiness" if started => &mut runner.readiness,
                    "liveness" if started => &mut runner.liveness,
                    _ => continue,
                };
                if Instant::now() < slot.next {
                    continue;
                }
                slot.next = Instant::now() + probe::period(spec);
                let result =
                    probe::run(spec, &container, target, runner.pid, &image, &images).await;
                if let Err(e) = &result {
                    tracing::debug!(pod = %self.key, container = %container.name, probe = kind, error = %e, "probe failed");
                }
                slot.state.record(spec, result);
                if kind != "readiness" && slot.state.failed(spec) {
                    let grace = spec.termination_grace_period_seconds.unwrap_or(pod_grace);
                    let why = slot.state.last_error.clone().unwrap_or_default();
                    kill = Some((format!("{kind} probe failed: {why}"), grace));
                    break;
                }
            }
            if let Some((reason, grace)) = kill {
                tracing::info!(pod = %self.key, container = %container.name, %reason, "restarting container");
                if let Some(pid) = runner.pid.and_then(|p| i32::try_from(p).ok()) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                }
                runner.kill_at = Some(
                    Instant::now() + Duration::from_secs(u64::try_from(grace.max(0)).unwrap_or(0)),
                );
            }
        }
    }

    fn phase(&self) -> &'static str {
        let main: Vec<&Runner> = self.runners.iter().filter(|r| !r.init).collect();
        if self
            .runners
            .iter()
            .any(|r| r.init && r.terminated.as_ref().is_some_and(|t| t["exitCode"] != 0))
        {
            return "Failed";
        }
        if !main.is_empty() && main.iter().all(|r| r.terminated.is_some()) {
            if main
                .iter()
                .all(|r| r.terminated.as_ref().is_some_and(|t| t["exitCode"] == 0))
            {
                return "Succeeded";
            }
            return "Failed";
        }
        if main
            .iter()
            .any(|r| r.child.is_some() || r.restart_count > 0 || r.terminated.is_some())
        {
            "Running"
        } else {
            "Pending"
        }
    }

    fn start(&mut self, index: usize) {
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        let runner = &mut self.runners[index];
        runner.restart_at = None;
        match spawn(runner) {
            Ok(child) => {
                runner.pid = child.id();
                if let Some(pid) = runner.pid {
                    ctx.remember_group(pid);
                }
                runner.child = Some(child);
                runner.started_at = Some(now());
                runner.reset_probes();
                tracing::info!(pod = %key, container = %runner.container.name, pid = ?runner.pid, "container started");
            }
            Err(e) => {
                tracing::warn!(pod = %key, container = %runner.container.name, error = %e, "container failed to start");
                let backoff =
                    Duration::from_secs(1u64 << runner.restart_count.clamp(0, 4)).min(MAX_BACKOFF);
                runner.restart_count += 1;
                runner.last_terminated = Some(json!({
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": e.to_string(),
                    "finishedAt": now(),
                }));
                runner.restart_at = Some(Instant::now() + backoff);
            }
        }
    }

    /// SIGTERM to every container's process group, `grace` to exit, then SIGKILL.
    async fn stop_all(&mut self, grace: Duration) {
        for runner in &self.runners {
            if let Some(pid) = runner.pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for runner in &mut self.runners {
            let Some(child) = runner.child.as_mut() else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                tracing::info!(pod = %self.key, container = %runner.container.name, "grace period over, killing");
            }
        }
        for runner in &mut self.runners {
            if let Some(pid) = runner.pid.take() {
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
                }
                self.ctx.forget_group(pid);
            }
            if let Some(mut child) = runner.child.take() {
                let _ = child.wait().await;
            }
        }
    }

    /// Waits until the pod is deleted (then finishes the deletion and returns false),
    /// or until `retry_after` has passed (returns true: try to start again).
    async fn wait_for_deletion(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        retry_after: Option<Duration>,
    ) -> bool {
        let retry_at = retry_after.map(|d| tokio::time::Instant::now() + d);
        loop {
            let changed = match retry_at {
                Some(at) => match tokio::time::timeout_at(at, updates.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => return true,
                },
                None => updates.changed().await,
            };
            if changed.is_err() {
                return false;
            }
            let latest = updates.borrow_and_update().clone();
            match latest {
                None => return false,
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    delete_now(&self.api, &pod).await;
                    return false;
                }
                Some(pod) => {
                    let status = self.pod.status.clone();
                    self.pod = pod;
                    self.pod.status = status;
                }
            }
        }
    }

    async fn cleanup(&mut self) {
        if let Some(iface) = self.iface.take() {
            self.ctx.forget_sandbox(
                &self.namespace(),
                &self.name(),
                self.pod.metadata.uid.as_deref().unwrap_or_default(),
            );
            let network = self.ctx.network.clone();
            let _ = tokio::task::spawn_blocking(move || network.remove_pod(&iface)).await;
        }
        // emptyDir and projected volumes die with the pod; logs and PVCs stay.
        let _ = std::fs::remove_dir_all(self.pod_dir().join("volumes"));
        tracing::info!(pod = %self.key, "pod removed from the node");
    }
}

/// Removes the pod object for good (what the kubelet does once containers are gone).
pub async fn delete_now(api: &Api<Pod>, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name, error = %e, "failed to delete pod"),
    }
}
