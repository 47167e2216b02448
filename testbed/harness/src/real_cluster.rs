//! What a test bed with real nodes ([`crate::TestBedOptions::real_nodes`]) runs besides the
//! control plane: kube-scheduler (the fake kubelet binds no pod and its Node is cordoned, so
//! pods go to the real nodes of `crate::node`), and a static PersistentVolume provisioner
//! (every pending claim gets a hostPath PV made for it, pre-bound to it; kube-controller-manager's
//! `persistentvolume-binder-controller` completes the binding). See docs/testing.md, "A real
//! node".

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;

use crate::process::{Component, ProcessError, free_port};

/// The controller that binds a claim to the PV made for it.
pub const PV_BINDER_CONTROLLER: &str = "persistentvolume-binder-controller";
/// Group owning every provisioned volume's directory (mode 2770), as `fsGroup: 999` would make
/// it: the pgrs image's `postgres` group. hostPath volumes get no fsGroup ownership from the
/// kubelet.
pub const VOLUME_GID: u32 = 999;
const SCHEDULER_START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RealClusterError {
    #[error(
        "kube-scheduler is not built in {dir}: run testbed/build.sh (it adds kube-scheduler to a cache built before it)"
    )]
    NoScheduler { dir: PathBuf },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("failed to allocate a port for kube-scheduler")]
    Port(#[source] std::io::Error),
    #[error("kube-scheduler exited during start-up ({status})\n{logs}")]
    SchedulerExited {
        status: std::process::ExitStatus,
        logs: String,
    },
    #[error("kube-scheduler did not listen on 127.0.0.1:{port} within {timeout:?}\n{logs}")]
    SchedulerNotReady {
        port: u16,
        timeout: Duration,
        logs: String,
    },
    #[error("failed to cordon the fake kubelet's Node {node}")]
    Cordon {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Starts kube-scheduler with the admin kubeconfig, no leader election, its HTTPS endpoint on
/// a free loopback port; returns once that port accepts connections.
pub async fn start_scheduler(
    binaries: &crate::bins::Binaries,
    admin_kubeconfig: &Path,
    logs: &Path,
) -> Result<Component, RealClusterError> {
    let program = binaries.kube_scheduler();
    if !program.is_file() {
        return Err(RealClusterError::NoScheduler {
            dir: binaries.dir().to_owned(),
        });
    }
    let port = free_port().map_err(RealClusterError::Port)?;
    let kubeconfig = admin_kubeconfig.display();
    let mut scheduler = Component::start(
        "kube-scheduler",
        &program,
        &[
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--secure-port={port}"),
            "--v=1".to_owned(),
        ],
        logs,
    )?;
    let deadline = Instant::now() + SCHEDULER_START_TIMEOUT;
    loop {
        if let Some(status) = scheduler.exited() {
            return Err(RealClusterError::SchedulerExited {
                status,
                logs: scheduler.log_tail(40),
            });
        }
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return Ok(scheduler);
        }
        if Instant::now() > deadline {
            return Err(RealClusterError::SchedulerNotReady {
                port,
                timeout: SCHEDULER_START_TIMEOUT,
                logs: scheduler.log_tail(40),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Marks the fake kubelet's Node unschedulable, so that kube-scheduler only picks real nodes.
pub async fn cordon(client: &Client, node: &str) -> Result<(), RealClusterError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .map(|_| ())
        .map_err(|source| RealClusterError::Cordon {
            node: node.to_owned(),
            source,
        })
}

/// Watches every PersistentVolumeClaim; for each one without a volume, makes the directory
/// `<root>/<namespace>/<claim>-<uid>` (root:999, mode 2770) and a hostPath PersistentVolume of
/// the claim's size, access modes and class, whose `claimRef` names the claim. Runs until the
/// bed's runtime stops. The directories go with the bed's state directory.
pub async fn provision_volumes(client: Client, root: PathBuf) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client);
    let mut events = watcher::watcher(claims, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(claim) | Event::InitApply(claim)) => {
                if let Err(e) = provision(&volumes, &root, &claim).await {
                    tracing::warn!(
                        claim = %format!(
                            "{}/{}",
                            claim.metadata.namespace.as_deref().unwrap_or_default(),
                            claim.metadata.name.as_deref().unwrap_or_default()
                        ),
                        error = %e,
                        "failed to provision a volume"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "PersistentVolumeClaim watch failed, retrying"),
        }
    }
}

/// The PV made for a claim (by its uid, so a claim re-created with the same name gets a new one).
pub fn volume_name(claim_uid: &str) -> String {
    format!("pgrs-testbed-{claim_uid}")
}

async fn provision(
    volumes: &Api<PersistentVolume>,
    root: &Path,
    claim: &PersistentVolumeClaim,
) -> Result<(), String> {
    let spec = claim.spec.clone().unwrap_or_default();
    if spec.volume_name.is_some() || claim.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let (Some(namespace), Some(name), Some(uid)) = (
        claim.metadata.namespace.as_deref(),
        claim.metadata.name.as_deref(),
        claim.metadata.uid.as_deref(),
    ) else {
        return Ok(());
    };
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_else(|| "1Gi".to_owned());
    let dir = root.join(namespace).join(format!("{name}-{uid}"));
    make_volume_dir(&dir).map_err(|e| format!("failed to make {}: {e}", dir.display()))?;
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {
            "name": volume_name(uid),
            "labels": {"pgrs.dev/testbed": "true"},
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".to_owned()]),
            "storageClassName": spec.storage_class_name.unwrap_or_default(),
            "persistentVolumeReclaimPolicy": "Retain",
            "volumeMode": spec.volume_mode.unwrap_or_else(|| "Filesystem".to_owned()),
            "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": namespace,
                "name": name,
                "uid": uid,
            },
        }
    }))
    .map_err(|e| e.to_string())?;
    match volumes.create(&PostParams::default(), &volume).await {
        Ok(_) => {
            tracing::debug!(claim = %format!("{namespace}/{name}"), path = %dir.display(), "provisioned");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn make_volume_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(0), Some(VOLUME_GID))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2770))
}
