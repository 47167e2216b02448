//! The fake kubelet: one Node, pods bound to it and run as local processes in their
//! own network namespaces. See docs/testing.md for what it does and does not do.

pub mod env;
pub mod images;
mod pod;
pub mod probe;
mod runner;
pub mod sandbox;
pub mod security;
pub mod volumes;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::watch;

pub use images::ImageMap;

use crate::network::{PodInterface, PodNetwork};

/// Name of the one fake Node.
pub const NODE_NAME: &str = "pgrs-testbed-node";

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("failed to register Node {node}")]
    RegisterNode {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What the fake kubelet needs to know.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub node_name: String,
    /// The node's address as pods see it (the pod network's gateway).
    pub node_ip: Ipv4Addr,
    /// Where pods reach the API server (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_host: Ipv4Addr,
    pub api_port: u16,
    /// Pod directories and PersistentVolumeClaim data live here.
    pub state_dir: PathBuf,
    pub images: ImageMap,
    /// Bind every unscheduled pod to this node (what a scheduler would do). Off when real
    /// nodes and kube-scheduler run instead ([`crate::TestBedOptions::real_nodes`]).
    pub bind_unscheduled: bool,
}

/// Shared by the dispatcher and the pod tasks.
struct Context {
    client: Client,
    config: KubeletConfig,
    network: Arc<PodNetwork>,
    /// Process groups of running containers, for the last-resort kill at exit.
    groups: Arc<Mutex<BTreeSet<u32>>>,
    /// The network sandbox of every pod that has one, by `namespace/name`.
    sandboxes: Sandboxes,
}

/// `namespace/name` → the pod's network sandbox (see [`FakeKubelet::pod_sandbox`]).
type Sandboxes = Arc<Mutex<HashMap<String, PodSandbox>>>;

/// A pod's network sandbox as the fake kubelet created it.
#[derive(Debug, Clone)]
pub struct PodSandbox {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub interface: PodInterface,
}

impl Context {
    fn remember_group(&self, pid: u32) {
        if let Ok(mut g) = self.groups.lock() {
            g.insert(pid);
        }
    }

    fn forget_group(&self, pid: u32) {
        if let Ok(mut g) = self.groups.lock() {
            g.remove(&pid);
        }
    }

    fn remember_sandbox(&self, sandbox: PodSandbox) {
        if let Ok(mut s) = self.sandboxes.lock() {
            s.insert(format!("{}/{}", sandbox.namespace, sandbox.name), sandbox);
        }
    }

    /// Forgets the sandbox of `namespace/name` if it still belongs to pod `uid` (a
    /// StatefulSet pod of the same name may already have a new one).
    fn forget_sandbox(&self, namespace: &str, name: &str, uid: &str) {
        if let Ok(mut s) = self.sandboxes.lock() {
            let key = format!("{namespace}/{name}");
            if s.get(&key).is_some_and(|sandbox| sandbox.uid == uid) {
                s.remove(&key);
            }
        }
    }
}

/// A running fake kubelet.
pub struct FakeKubelet {
    task: tokio::task::JoinHandle<()>,
    groups: Arc<Mutex<BTreeSet<u32>>>,
    sandboxes: Sandboxes,
    network: Arc<PodNetwork>,
    config: KubeletConfig,
}

impl std::fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("node", &self.config.node_name)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// Registers the Node and starts watching pods (on the current tokio runtime).
    pub async fn start(
        client: Client,
        config: KubeletConfig,
        network: Arc<PodNetwork>,
    ) -> Result<Self, KubeletError> {
        register_node(&client, &config).await?;
        let groups = Arc::new(Mutex::new(BTreeSet::new()));
        let sandboxes = Sandboxes::default();
        let ctx = Arc::new(Context {
            client,
            config: config.clone(),
            network: network.clone(),
            groups: groups.clone(),
            sandboxes: sandboxes.clone(),
        });
        let task = tokio::spawn(dispatch(ctx));
        Ok(Self {
            task,
            groups,
            sandboxes,
            network,
            config,
        })
    }

    pub fn config(&self) -> &KubeletConfig {
        &self.config
    }

    pub fn network(&self) -> &PodNetwork {
        &self.network
    }

    /// The network sandbox (namespace, pod IP) of pod `namespace/name`, from the time
    /// its network namespace is created until the pod is removed from the node.
    /// Needs no API call, so it also works while the API server is down.
    pub fn pod_sandbox(&self, namespace: &str, name: &str) -> Option<PodSandbox> {
        self.sandboxes
            .lock()
            .ok()?
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Stops watching and kills every container still running (SIGTERM, 1 s, SIGKILL).
    /// Synchronous, so it also works from an exit handler.
    pub fn shutdown(&self) {
        self.task.abort();
        let groups: Vec<u32> = self
            .groups
            .lock()
            .map(|g| g.iter().copied().collect())
            .unwrap_or_default();
        let signal_all = |signal| {
            for pid in &groups {
                if let Ok(raw) = i32::try_from(*pid) {
                    let _ = killpg(Pid::from_raw(raw), signal);
                }
            }
        };
        signal_all(Signal::SIGTERM);
        if !groups.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
        }
        signal_all(Signal::SIGKILL);
        self.network.destroy();
    }
}

async fn register_node(client: &Client, config: &KubeletConfig) -> Result<(), KubeletError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let err = |source| KubeletError::RegisterNode {
        node: config.node_name.clone(),
        source,
    };
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": config.node_name,
            "labels": {
                "kubernetes.io/hostname": config.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
                "pgrs.dev/testbed": "true",
            }
        }
    }))
    .map_err(|e| err(kube::Error::SerdeError(e)))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(err(e)),
    }
    let ip = config.node_ip.to_string();
    let status = json!({ "status": {
        "capacity": {"cpu": "8", "memory": "32Gi", "pods": "250", "ephemeral-storage": "100Gi"},
        "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "250", "ephemeral-storage": "100Gi"},
        "addresses": [
            {"type": "InternalIP", "address": ip},
            {"type": "Hostname", "address": config.node_name},
        ],
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "pgrs-testbed fake kubelet is posting ready status",
            "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now(),
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now(),
        }],
    }});
    nodes
        .patch_status(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .map_err(err)?;
    Ok(())
}

/// Watches all pods: binds unscheduled ones to our node and hands each of ours to
/// its own task.
async fn dispatch(ctx: Arc<Context>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let mut tasks: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let binding: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut listed: Option<HashSet<String>> = None;
    let mut events = watcher::watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        tasks.retain(|_, sender| !sender.is_closed());
        match event {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.metadata.uid.clone()) {
                    seen.insert(uid);
                }
                handle(&ctx, &mut tasks, &binding, pod);
            }
            Ok(Event::InitDone) => {
                // Pods deleted while the watch was down never sent a Delete.
                if let Some(seen) = listed.take() {
                    for (uid, sender) in &tasks {
                        if !seen.contains(uid) {
                            sender.send_replace(None);
                        }
                    }
                }
            }
            Ok(Event::Apply(pod)) => handle(&ctx, &mut tasks, &binding, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(sender) = pod.metadata.uid.as_ref().and_then(|uid| tasks.remove(uid)) {
                    sender.send_replace(None);
                }
            }
            Err(e) => tracing::warn!(error = %e, "pod watch failed, retrying"),
        }
    }
}

fn handle(
    ctx: &Arc<Context>,
    tasks: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    binding: &Arc<Mutex<HashSet<String>>>,
    pod: Pod,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    match node {
        None => {
            if pod.metadata.deletion_timestamp.is_some() || !ctx.config.bind_unscheduled {
                return;
            }
            let fresh = binding
                .lock()
                .map(|mut b| b.insert(uid.clone()))
                .unwrap_or(false);
            if fresh {
                tokio::spawn(bind(ctx.clone(), binding.clone(), uid, pod));
            }
        }
        Some(node) if node == ctx.config.node_name => {
            if let Some(sender) = tasks.get(&uid) {
                sender.send_replace(Some(pod));
                return;
            }
            let terminal = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            if terminal && pod.metadata.deletion_timestamp.is_none() {
                return;
            }
            let (sender, receiver) = watch::channel(Some(pod));
            tasks.insert(uid, sender);
            tokio::spawn(pod::run(ctx.clone(), receiver));
        }
        Some(_) => {}
    }
}

/// What the scheduler would do: POST a Binding to our node.
async fn bind(ctx: Arc<Context>, binding: Arc<Mutex<HashSet<String>>>, uid: String, pod: Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "uid": uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": ctx.config.node_name},
    });
    let result: Result<serde_json::Value, kube::Error> = api
        .create_subresource("binding", &name, &PostParams::default(), &body)
        .await;
    match result {
        Ok(_) => tracing::debug!(pod = %format!("{namespace}/{name}"), "bound"),
        Err(e) => {
            tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "failed to bind pod")
        }
    }
    if let Ok(mut b) = binding.lock() {
        b.remove(&uid);
    }
}
