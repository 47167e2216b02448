//! A real node for a [`TestBed`]: containerd (runc, CNI bridge) and the real kubelet, built
//! by `testbed/node/build.sh` from the same Kubernetes version as the control plane,
//! registered with the bed's API server. Pods bound to it (`spec.nodeName`) run as real
//! containers of images imported from archives: nothing is ever pulled.
//!
//! On a bed started with `TestBedOptions::real_nodes`, kube-scheduler places pods on real
//! nodes; otherwise the fake kubelet binds every unscheduled pod to itself, and a pod meant
//! for this node names it in `spec.nodeName`. Pods reach the API server at the `kubernetes`
//! Service's ClusterIP through a DNAT rule (`service_route`).
//!
//! Per node: a temp dir (containerd root/state/socket, kubelet root, pod logs, CNI config
//! and IPAM state), a 10.214.X.0/24 pod subnet behind the bridge `pgrsnodeX` (X handed out
//! by a lock file in /run/pgrs-testbed, like the fake kubelet's 10.213.X.0/24), and two
//! processes that die with the thread that started them. The kubelet authenticates with a
//! ServiceAccount token bound to the `system:node` ClusterRole. See docs/testing.md, "A real
//! node".

mod binaries;
mod config;
mod credential;
mod faults;
mod service_route;
mod setup;
mod teardown;

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;

pub use binaries::{BUILD_REV, FILES, NodeBinaries, NodeBinariesError, NodeVersions, RUNC};
use credential::{account_name, node_account, node_credential};
use setup::Setup;
use teardown::{kill_all_tasks, kill_leftover_shims, unmount_under};

use crate::TestBed;
use crate::process::{Component, ProcessError, free_port, tail_file};

/// Directory of the lock files that hand out the node subnets (shared with the fake kubelet's
/// network, different file names).
const LOCK_DIR: &str = "/run/pgrs-testbed";
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const LOG_TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Binaries(#[from] NodeBinariesError),
    #[error("the real node must run as root (euid is {euid})")]
    NotRoot { euid: u32 },
    #[error("failed to prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to find a free node subnet: all of 10.214.0.0/24 .. 10.214.255.0/24 are in use"
    )]
    NoSubnet,
    #[error("failed to allocate a free port")]
    Port(#[source] std::io::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("{component} exited during start-up ({status})\n{logs}")]
    Exited {
        component: &'static str,
        status: std::process::ExitStatus,
        logs: String,
    },
    #[error("{what} within {timeout:?}: {last_error}\n{logs}")]
    NotReady {
        what: String,
        timeout: Duration,
        last_error: String,
        logs: String,
    },
    #[error("failed to build an API client")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the test bed's start-up task failed: {0}")]
    Join(String),
    #[error("failed to remove the not-ready taint from Node {node}")]
    Untaint {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Options for [`RealNode::start`].
#[derive(Debug, Clone, Default)]
pub struct RealNodeOptions {
    /// The Node's name. Default: its IP, 10.214.X.1 (the bridge). The API server dials a
    /// kubelet (logs, exec, port-forward) at the node's `Hostname` address first, which is
    /// this name: a name that does not resolve breaks those, an IP literal always works.
    pub name: Option<String>,
    /// Image archives (docker-archive or OCI tar, e.g. `scripts/build-image --save`) imported
    /// into containerd before the kubelet starts. The sandbox image is always imported.
    pub images: Vec<PathBuf>,
    /// Keep the node's directory (logs, containerd and kubelet state) after it stops.
    pub keep_dir: bool,
}

/// How long the start took.
#[derive(Debug, Clone, Copy)]
pub struct NodeTimings {
    pub containerd: Duration,
    pub images: Duration,
    pub kubelet: Duration,
    pub total: Duration,
}

impl std::fmt::Display for NodeTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}s (containerd {:.1}s, image import {:.1}s, kubelet to Ready {:.1}s)",
            self.total.as_secs_f64(),
            self.containerd.as_secs_f64(),
            self.images.as_secs_f64(),
            self.kubelet.as_secs_f64()
        )
    }
}

/// A running real node. Stopped (containers killed, mounts and bridge removed, Node deleted)
/// on drop.
#[derive(Debug)]
pub struct RealNode {
    name: String,
    kubelet: Option<Component>,
    containerd: Option<Component>,
    binaries: NodeBinaries,
    dir: PathBuf,
    keep_dir: bool,
    socket: PathBuf,
    index: u8,
    kubectl: PathBuf,
    admin_kubeconfig: PathBuf,
    timings: NodeTimings,
    service_route: Option<service_route::ServiceRoute>,
    stopped: bool,
    _lock: File,
}

impl RealNode {
    /// Starts containerd, imports the images, starts the kubelet and waits until the Node is
    /// Ready. Blocking; the processes are started on the bed's runtime so that they live as
    /// long as the bed (they die with the thread that started them).
    pub fn start(bed: &TestBed, options: RealNodeOptions) -> Result<Self, NodeError> {
        let binaries = NodeBinaries::locate()?;
        let euid = nix::unistd::geteuid().as_raw();
        if euid != 0 {
            return Err(NodeError::NotRoot { euid });
        }
        let (index, lock) = claim_subnet()?;
        let name = options
            .name
            .clone()
            .unwrap_or_else(|| Ipv4Addr::new(10, 214, index, 1).to_string());
        let kubectl = bed.binaries().kubectl();
        let token = node_credential(&kubectl, bed.admin_kubeconfig(), index)?;
        let kubelet_kubeconfig = bed.token_kubeconfig(&node_account(index), &token);
        let setup = Setup {
            binaries,
            options,
            kubectl,
            admin_kubeconfig: bed.admin_kubeconfig().to_owned(),
            index,
            lock,
            name,
            kubelet_kubeconfig,
            api_proxy: (bed.gateway(), crate::testbed::IN_CLUSTER_API_PORT),
        };
        let handle = bed.runtime_handle();
        let node = std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(handle.spawn(async move { setup.start().await })))
                .join()
        })
        .map_err(|_| NodeError::Join("the start-up thread panicked".to_owned()))?
        .map_err(|e| NodeError::Join(e.to_string()))??;
        let _ = writeln!(
            std::io::stderr(),
            "pgrs-testbed: real node {} Ready in {} (pods on 10.214.{}.0/24, state in {})",
            node.name,
            node.timings,
            node.index,
            node.dir.display()
        );
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn timings(&self) -> NodeTimings {
        self.timings
    }

    /// The pods' subnet (10.214.X.0/24); its .1 is the bridge, the pods' gateway.
    pub fn pod_subnet(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 214, self.index, 0)
    }

    /// containerd's socket, for `ctr --address` (namespace `k8s.io` holds the CRI's objects).
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// `ctr` talking to this node's containerd in the `k8s.io` namespace.
    pub fn ctr(&self) -> Command {
        ctr(&self.binaries, &self.socket)
    }

    /// Imports an image archive into containerd (the kubelet sees it at once).
    pub fn import_image(&self, archive: &Path) -> Result<(), NodeError> {
        import(&self.binaries, &self.socket, archive)
    }

    /// Tails of containerd's and the kubelet's logs.
    pub fn log_tails(&self, lines: usize) -> String {
        ["containerd", "kubelet"]
            .iter()
            .map(|c| {
                let log = self.dir.join("logs").join(format!("{c}.log"));
                format!(
                    "----- {c} ({}) -----\n{}",
                    log.display(),
                    tail_file(&log, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the kubelet, kills every container, stops containerd, unmounts what they left,
    /// deletes the bridge, the Node object and (unless kept) the directory. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let started = Instant::now();
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.stop(Duration::from_secs(5));
        }
        // Pods bound to a node without a kubelet would stay Terminating for ever (no pod GC
        // controller runs), and so would their namespaces.
        let selector = format!("spec.nodeName={}", self.name);
        let account = format!("serviceaccount/{}", account_name(self.index));
        let binding = format!("clusterrolebinding/{}", account_name(self.index));
        for args in [
            vec![
                "delete",
                "pods",
                "--all-namespaces",
                "--field-selector",
                &selector,
                "--force",
                "--grace-period=0",
                "--wait=false",
            ],
            vec![
                "delete",
                "node",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
            vec![
                "delete",
                "--namespace=kube-system",
                &account,
                &binding,
                "--wait=false",
                "--ignore-not-found",
            ],
        ] {
            let _ = Command::new(&self.kubectl)
                .env("KUBECONFIG", &self.admin_kubeconfig)
                .args(&args)
                .output();
        }
        let kubelet_done = started.elapsed();
        kill_all_tasks(&self.binaries, &self.socket);
        let tasks_done = started.elapsed();
        if let Some(mut containerd) = self.containerd.take() {
            containerd.stop(Duration::from_secs(5));
        }
        kill_leftover_shims(&self.socket);
        let containerd_done = started.elapsed();
        unmount_under(&self.dir);
        if let Some(route) = self.service_route.take() {
            route.remove();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &bridge_name(self.index)])
            .output();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let _ = writeln!(
            std::io::stderr(),
            "pgrs-testbed: real node {} stopped in {:.1}s (kubelet, its pods and Node {:.1}s, \
             containers {:.1}s, containerd {:.1}s, mounts/bridge/directory {:.1}s)",
            self.name,
            started.elapsed().as_secs_f64(),
            kubelet_done.as_secs_f64(),
            (tasks_done - kubelet_done).as_secs_f64(),
            (containerd_done - tasks_done).as_secs_f64(),
            (started.elapsed() - containerd_done).as_secs_f64(),
        );
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bridge_name(index: u8) -> String {
    format!("pgrsnode{index}")
}

/// A free 10.214.X.0/24: a flock per X, released when the process dies.
fn claim_subnet() -> Result<(u8, File), NodeError> {
    std::fs::create_dir_all(LOCK_DIR).map_err(|source| NodeError::Io {
        path: LOCK_DIR.into(),
        source,
    })?;
    let start = std::process::id() % 256;
    for offset in 0..256u32 {
        let index = u8::try_from((start + offset) % 256).unwrap_or(0);
        let path = Path::new(LOCK_DIR).join(format!("node-{index}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| NodeError::Io {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on an fd we own.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked == 0 {
            return Ok((index, lock));
        }
    }
    Err(NodeError::NoSubnet)
}

fn ctr(binaries: &NodeBinaries, socket: &Path) -> Command {
    let mut command = Command::new(binaries.ctr());
    command
        .arg(format!("--address={}", socket.display()))
        .arg("--namespace=k8s.io");
    command
}

fn run(mut command: Command) -> Result<String, NodeError> {
    let text = format!("{command:?}");
    let output = command.output().map_err(|e| NodeError::Command {
        command: text.clone(),
        output: e.to_string(),
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NodeError::Command {
            command: text,
            output: format!(
                "{}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

fn import(binaries: &NodeBinaries, socket: &Path, archive: &Path) -> Result<(), NodeError> {
    let mut command = ctr(binaries, socket);
    command.args(["images", "import", "--local"]).arg(archive);
    run(command).map(|_| ())
}

fn mkdir(path: &Path) -> Result<(), NodeError> {
    std::fs::create_dir_all(path).map_err(|source| NodeError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &str) -> Result<(), NodeError> {
    std::fs::write(path, contents).map_err(|source| NodeError::Io {
        path: path.to_owned(),
        source,
    })
}
