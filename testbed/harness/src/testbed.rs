//! The whole test bed: pod network + control plane + API proxy for pods + fake
//! kubelet, with its own tokio runtime so it outlives any one test's runtime.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use crate::control_plane::{ControlPlane, ControlPlaneError, ControlPlaneOptions, StartTimings};
use crate::kubelet::{FakeKubelet, ImageMap, KubeletConfig, KubeletError, NODE_NAME};
use crate::network::{NetworkError, PodNetwork};
use crate::process::{Component, tail_file};

/// Port pods dial for the API (`KUBERNETES_SERVICE_PORT`), on the pods' gateway.
pub const IN_CLUSTER_API_PORT: u16 = 443;
/// The `kubernetes` Service's ClusterIP (the first address of
/// [`crate::control_plane::SERVICE_CIDR`]): in the serving certificate, for real nodes' pods.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

#[derive(Debug, thiserror::Error)]
pub enum TestBedError {
    #[error("failed to create the tokio runtime of the test bed")]
    Runtime(#[source] std::io::Error),
    #[error("failed to set up the pod network")]
    Network(#[from] NetworkError),
    #[error("failed to start the control plane")]
    ControlPlane(#[from] ControlPlaneError),
    #[error("failed to listen on {address} for pods' API connections")]
    Proxy {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the fake kubelet")]
    Kubelet(#[from] KubeletError),
    #[error("the test bed's start-up task failed: {0}")]
    Join(String),
    #[error("failed to create test namespace {name}")]
    Namespace {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("namespace {name}: the default ServiceAccount did not appear within {timeout:?}")]
    NoDefaultServiceAccount { name: String, timeout: Duration },
    #[error("the shared test bed failed to start: {0}")]
    Shared(String),
    #[error("failed to start what real nodes need (kube-scheduler, volumes)")]
    RealCluster(#[from] crate::real_cluster::RealClusterError),
}

/// Options for [`TestBed::start`].
#[derive(Debug, Clone, Default)]
pub struct TestBedOptions {
    /// Keep the state directory (logs, PVC data, kubeconfig) after shutdown.
    pub keep_dir: bool,
    /// Images the fake kubelet runs; `None` = [`ImageMap::from_env`].
    pub images: Option<ImageMap>,
    /// Pods are for real nodes (`crate::node::RealNode`): kube-scheduler runs, the fake
    /// kubelet binds no pod and its Node is cordoned, and pending PersistentVolumeClaims get
    /// hostPath PersistentVolumes (`crate::real_cluster`). Needs `kube-scheduler` in the
    /// binaries (`testbed/build.sh`).
    pub real_nodes: bool,
}

/// A running test bed. Shut down on drop (or at process exit for [`shared`]).
pub struct TestBed {
    control_plane: Arc<Mutex<Option<ControlPlane>>>,
    kubelet: FakeKubelet,
    /// kube-scheduler, when the bed is for real nodes.
    scheduler: Mutex<Option<Component>>,
    network: Arc<PodNetwork>,
    admin_kubeconfig: PathBuf,
    dir: PathBuf,
    keep_dir: bool,
    versions: crate::bins::Versions,
    binaries: crate::bins::Binaries,
    timings: StartTimings,
    server_url: String,
    warm_start: Duration,
    // Last: background tasks stop when the runtime goes.
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for TestBed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBed")
            .field("server", &self.server_url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl TestBed {
    /// Starts everything. Blocking; call it outside an async context (or use [`shared`]).
    pub fn start(options: TestBedOptions) -> Result<Self, TestBedError> {
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgrs-testbed")
            .enable_all()
            .build()
            .map_err(TestBedError::Runtime)?;
        let network = Arc::new(PodNetwork::create()?);
        // Children die with the thread that started them (PR_SET_PDEATHSIG), so start
        // them on a runtime worker, which lives as long as the test bed.
        let net = network.clone();
        let keep_dir = options.keep_dir;
        let images = options.images.clone().unwrap_or_else(ImageMap::from_env);
        let real_nodes = options.real_nodes;
        let (control_plane, kubelet, scheduler) = runtime
            .block_on(runtime.spawn(async move {
                let parts = start_parts(net, keep_dir, images, real_nodes).await?;
                // If the real-node parts fail, the control plane in `parts` stops on drop.
                let scheduler = if real_nodes {
                    Some(start_real_cluster(&parts.0, &parts.1).await?)
                } else {
                    None
                };
                Ok::<_, TestBedError>((parts.0, parts.1, scheduler))
            }))
            .map_err(|e| TestBedError::Join(e.to_string()))??;
        let warm_start = started.elapsed();
        // Straight to stderr, not eprintln!: the test harness would capture that.
        let _ = writeln!(
            std::io::stderr(),
            "pgrs-testbed: warm start {:.1}s (control plane {}; pods on {}/24 via {})",
            warm_start.as_secs_f64(),
            control_plane.timings(),
            network.subnet(),
            network.gateway(),
        );
        Ok(Self {
            admin_kubeconfig: control_plane.admin_kubeconfig().to_owned(),
            dir: control_plane.dir().to_owned(),
            versions: control_plane.versions().clone(),
            binaries: control_plane.binaries().clone(),
            timings: control_plane.timings(),
            server_url: control_plane.server_url(),
            control_plane: Arc::new(Mutex::new(Some(control_plane))),
            kubelet,
            scheduler: Mutex::new(scheduler),
            network,
            keep_dir,
            warm_start,
            runtime,
        })
    }

    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn versions(&self) -> &crate::bins::Versions {
        &self.versions
    }

    pub fn binaries(&self) -> &crate::bins::Binaries {
        &self.binaries
    }

    pub fn timings(&self) -> StartTimings {
        self.timings
    }

    /// Wall time from [`TestBed::start`] to ready (binaries already built).
    pub fn warm_start(&self) -> Duration {
        self.warm_start
    }

    /// The pods' gateway: the host as seen from the pods.
    pub fn gateway(&self) -> Ipv4Addr {
        self.network.gateway()
    }

    pub fn node_name(&self) -> &str {
        &self.kubelet.config().node_name
    }

    /// A cluster-admin client on the caller's runtime.
    pub async fn client(&self) -> Result<Client, ControlPlaneError> {
        crate::control_plane::client_from_kubeconfig_file(&self.admin_kubeconfig)
            .await
            .map_err(ControlPlaneError::Client)
    }

    /// A kubeconfig (text) that authenticates with `token`.
    pub fn token_kubeconfig(&self, user: &str, token: &str) -> String {
        self.with_control_plane(|cp| cp.token_kubeconfig(user, token))
            .unwrap_or_default()
    }

    /// The control plane (`None` after shutdown), for `crate::faults`.
    pub(crate) fn control_plane_cell(&self) -> Arc<Mutex<Option<ControlPlane>>> {
        self.control_plane.clone()
    }

    /// The bed's own runtime, whose worker threads live as long as the bed.
    pub(crate) fn runtime_handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// The fake kubelet (its sandbox bookkeeping), for `crate::faults`.
    pub(crate) fn kubelet(&self) -> &FakeKubelet {
        &self.kubelet
    }

    fn with_control_plane<T>(&self, f: impl FnOnce(&ControlPlane) -> T) -> Option<T> {
        self.control_plane.lock().ok()?.as_ref().map(f)
    }

    /// `kubectl` with `KUBECONFIG` set to the admin kubeconfig.
    pub fn kubectl(&self) -> std::process::Command {
        let mut command = std::process::Command::new(self.binaries.kubectl());
        command
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .env("KUBECACHEDIR", self.dir.join("kube-cache"));
        command
    }

    /// `helm` with `KUBECONFIG` set and its cache/config/data kept in the state dir.
    pub fn helm(&self) -> std::process::Command {
        let mut command = std::process::Command::new(self.binaries.helm());
        command
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        command
    }

    /// A fresh namespace `<prefix>-<random>` with its default ServiceAccount; deleted
    /// when the returned guard drops, which also prints logs if the test is failing.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace<'_>, TestBedError> {
        let name = format!("{prefix}-{:08x}", rand_u32());
        let client = self
            .client()
            .await
            .map_err(|e| TestBedError::Join(e.to_string()))?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"pgrs.dev/testbed": "true"}}
        }))
        .map_err(|e| TestBedError::Namespace {
            name: name.clone(),
            source: kube::Error::SerdeError(e),
        })?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|source| TestBedError::Namespace {
                name: name.clone(),
                source,
            })?;
        // Pods are refused until the serviceaccount controller made `default`.
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &name);
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        while !matches!(accounts.get_opt("default").await, Ok(Some(_))) {
            if Instant::now() > deadline {
                return Err(TestBedError::NoDefaultServiceAccount { name, timeout });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(TestNamespace { name, bed: self })
    }

    /// Tails of the control-plane logs and of every container log in `namespace`
    /// (all namespaces when `None`).
    pub fn log_tails(&self, namespace: Option<&str>, lines: usize) -> String {
        let mut out = self
            .with_control_plane(|cp| cp.log_tails(lines))
            .unwrap_or_default();
        if let Some(scheduler) = self.scheduler.lock().ok().and_then(|s| {
            s.as_ref()
                .map(|c| (c.log_path().to_owned(), c.log_tail(lines)))
        }) {
            out.push_str(&format!(
                "\n----- kube-scheduler ({}) -----\n{}",
                scheduler.0.display(),
                scheduler.1
            ));
        }
        let pods = self.dir.join("kubelet/pods");
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&pods)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                namespace.is_none_or(|ns| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{ns}_")))
                })
            })
            .collect();
        entries.sort();
        for pod in entries {
            for log in std::fs::read_dir(pod.join("logs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push_str(&format!(
                    "\n----- pod {} -----\n{}",
                    log.path().display(),
                    tail_file(&log.path(), lines)
                ));
            }
        }
        out
    }

    /// Kills pods, stops the control plane, removes the pod network and (unless kept)
    /// the state directory. Idempotent; synchronous (usable at process exit).
    pub fn shutdown(&self) {
        let Ok(mut guard) = self.control_plane.lock() else {
            return;
        };
        let Some(mut control_plane) = guard.take() else {
            return;
        };
        if let Some(mut scheduler) = self.scheduler.lock().ok().and_then(|mut s| s.take()) {
            scheduler.stop(Duration::from_secs(5));
        }
        self.kubelet.shutdown();
        control_plane.stop();
        self.network.destroy();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        drop(control_plane);
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn start_parts(
    network: Arc<PodNetwork>,
    keep_dir: bool,
    images: ImageMap,
    real_nodes: bool,
) -> Result<(ControlPlane, FakeKubelet), TestBedError> {
    let gateway = network.gateway();
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        // The `kubernetes` Service's ClusterIP is what real nodes' pods dial (a real node
        // DNATs it to the proxy below).
        extra_serving_ips: vec![IpAddr::V4(gateway), IpAddr::V4(KUBERNETES_SERVICE_IP)],
        keep_dir,
        extra_controllers: if real_nodes {
            vec![crate::real_cluster::PV_BINDER_CONTROLLER.to_owned()]
        } else {
            Vec::new()
        },
    })
    .await?;
    // Pods have their own loopback: they reach the API through the gateway, where
    // this proxy forwards to the API server's loopback port.
    let address = (gateway, IN_CLUSTER_API_PORT);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| TestBedError::Proxy {
            address: format!("{gateway}:{IN_CLUSTER_API_PORT}"),
            source,
        })?;
    tokio::spawn(proxy(listener, control_plane.api_port()));
    let client = control_plane.admin_client().await?;
    let kubelet = FakeKubelet::start(
        client,
        KubeletConfig {
            node_name: NODE_NAME.to_owned(),
            node_ip: gateway,
            api_host: gateway,
            api_port: IN_CLUSTER_API_PORT,
            state_dir: control_plane.dir().join("kubelet"),
            images,
            bind_unscheduled: !real_nodes,
        },
        network,
    )
    .await?;
    Ok((control_plane, kubelet))
}

/// kube-scheduler, the fake Node cordoned, the PersistentVolume provisioner.
async fn start_real_cluster(
    control_plane: &ControlPlane,
    kubelet: &FakeKubelet,
) -> Result<Component, TestBedError> {
    let client = control_plane.admin_client().await?;
    crate::real_cluster::cordon(&client, &kubelet.config().node_name).await?;
    tokio::spawn(crate::real_cluster::provision_volumes(
        client,
        control_plane.dir().join("volumes"),
    ));
    Ok(crate::real_cluster::start_scheduler(
        control_plane.binaries(),
        control_plane.admin_kubeconfig(),
        &control_plane.dir().join("logs"),
    )
    .await?)
}

async fn proxy(listener: tokio::net::TcpListener, api_port: u16) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) =
                tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, api_port)).await
            {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Truncation intended: 32 random bits are plenty for a namespace suffix.
    hasher.finish() as u32
}

/// A namespace for one test. Dropping it deletes the namespace (in the background)
/// and, when the test is panicking, prints the control-plane and pod log tails.
#[derive(Debug)]
pub struct TestNamespace<'a> {
    name: String,
    bed: &'a TestBed,
}

impl TestNamespace<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "pgrs-testbed: test in namespace {} failed; log tails:\n{}",
                self.name,
                self.bed.log_tails(Some(&self.name), 30)
            );
        }
        let kubeconfig = self.bed.admin_kubeconfig.clone();
        let name = self.name.clone();
        self.bed.runtime.spawn(async move {
            if let Ok(client) = crate::control_plane::client_from_kubeconfig_file(&kubeconfig).await
            {
                let namespaces: Api<Namespace> = Api::all(client);
                let _ = namespaces.delete(&name, &DeleteParams::default()).await;
            }
        });
    }
}

static SHARED: OnceLock<Result<TestBed, String>> = OnceLock::new();

/// The test bed of this test binary, started on first use and shut down at exit.
pub async fn shared() -> Result<&'static TestBed, TestBedError> {
    let bed = tokio::task::spawn_blocking(|| {
        SHARED.get_or_init(|| {
            let bed = TestBed::start(TestBedOptions::default()).map_err(|e| error_chain(&e));
            if bed.is_ok() {
                // SAFETY: registering a plain extern "C" function.
                unsafe {
                    libc::atexit(shutdown_shared);
                }
            }
            bed
        })
    })
    .await
    .map_err(|e| TestBedError::Join(e.to_string()))?;
    bed.as_ref().map_err(|e| TestBedError::Shared(e.clone()))
}

extern "C" fn shutdown_shared() {
    if let Some(Ok(bed)) = SHARED.get() {
        bed.shutdown();
    }
}

/// `error: cause: cause` in one string.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
