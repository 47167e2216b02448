//! Stopping and restarting etcd / kube-apiserver of a running test bed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::FaultError;
use crate::control_plane::{ControlPlane, ControlPlaneError, Restartable};
use crate::testbed::TestBed;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Short on purpose: an outage is a crash, not a graceful shutdown (kube-apiserver
/// alone would drain for seconds).
const STOP_GRACE: Duration = Duration::from_secs(1);
const LOG_TAIL_LINES: usize = 30;

type Cell = Arc<Mutex<Option<ControlPlane>>>;

/// Runs `f` on the control plane (`Err(ShutDown)` after shutdown).
fn with<T>(cell: &Cell, f: impl FnOnce(&mut ControlPlane) -> T) -> Result<T, FaultError> {
    let mut guard = cell.lock().map_err(|_| FaultError::ShutDown)?;
    guard.as_mut().map(f).ok_or(FaultError::ShutDown)
}

pub(super) async fn stop(bed: &TestBed, component: Restartable) -> Result<(), FaultError> {
    let cell = bed.control_plane_cell();
    bed.runtime_handle()
        .spawn_blocking(move || with(&cell, |cp| cp.stop_component(component, STOP_GRACE)))
        .await
        .map_err(|e| FaultError::Join {
            action: "stop a component",
            message: e.to_string(),
        })??;
    tracing::info!(%component, "stopped for an outage test");
    Ok(())
}

pub(super) async fn start(bed: &TestBed, component: Restartable) -> Result<(), FaultError> {
    let cell = bed.control_plane_cell();
    // The child dies with the thread that forks it (PR_SET_PDEATHSIG): fork it on a
    // worker of the bed's runtime, which lives as long as the bed.
    let spawn_cell = cell.clone();
    bed.runtime_handle()
        .spawn(async move { with(&spawn_cell, |cp| cp.start_component(component)) })
        .await
        .map_err(|e| FaultError::Join {
            action: "start a component",
            message: e.to_string(),
        })??
        .map_err(|e| FaultError::ControlPlane {
            action: "restart",
            component,
            source: ControlPlaneError::Process(e),
        })?;
    let etcd_health = format!("{}/health", with(&cell, |cp| cp.etcd_url().to_owned())?);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| FaultError::Join {
            action: "build an HTTP client",
            message: e.to_string(),
        })?;
    let client = bed
        .client()
        .await
        .map_err(|source| FaultError::ControlPlane {
            action: "build a client for",
            component,
            source,
        })?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let probe = match component {
            Restartable::Etcd => etcd_ready(&http, &etcd_health).await,
            Restartable::KubeApiserver => Ok(()),
        };
        // The API server is ready only with etcd; after an etcd restart wait for it too
        // (unless it is stopped as well).
        let apiserver_running = with(&cell, |cp| cp.component_running(Restartable::KubeApiserver))?;
        let probe = match probe {
            Ok(()) if apiserver_running => apiserver_ready(&client).await,
            other => other,
        };
        let last_error = match probe {
            Ok(()) => {
                tracing::info!(%component, "restarted and ready");
                return Ok(());
            }
            Err(e) => e,
        };
        if !with(&cell, |cp| cp.component_running(component))? {
            return Err(FaultError::Exited {
                component,
                logs: with(&cell, |cp| cp.component_log_tail(component, LOG_TAIL_LINES))?,
            });
        }
        if Instant::now() > deadline {
            return Err(FaultError::NotReady {
                component,
                timeout: READY_TIMEOUT,
                last_error,
                logs: with(&cell, |cp| cp.log_tails(LOG_TAIL_LINES))?,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn etcd_ready(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let body = http
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    if body.contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(format!("etcd /health: {body}"))
    }
}

async fn apiserver_ready(client: &kube::Client) -> Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(3), client.request_text(request)).await {
        Ok(Ok(body)) if body.trim() == "ok" => Ok(()),
        Ok(Ok(body)) => Err(format!("kube-apiserver /readyz: {body}")),
        Ok(Err(e)) => Err(format!("kube-apiserver /readyz: {e}")),
        Err(_) => Err("kube-apiserver /readyz: no answer within 3s".to_owned()),
    }
}
