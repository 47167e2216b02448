//! etcd + kube-apiserver + kube-controller-manager on free loopback ports.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::bins::{Binaries, BinariesError, Versions};
use crate::pki::{Pki, PkiError};
use crate::process::{Component, ProcessError, free_port};

mod restart;
pub use restart::Restartable;

/// Controllers kube-controller-manager runs. Node lifecycle, taint eviction and pod GC
/// are left out on purpose: without a real kubelet heartbeat they would mark the fake
/// Node unhealthy and evict or delete its pods.
pub const CONTROLLERS: &str = "statefulset-controller,replicaset-controller,deployment-controller,\
endpointslice-controller,endpoints-controller,garbage-collector-controller,namespace-controller,\
serviceaccount-controller,root-ca-certificate-publisher-controller,\
clusterrole-aggregation-controller,job-controller";

/// Cluster IP range of Services (ClusterIPs are allocated but never routed: no kube-proxy).
pub const SERVICE_CIDR: &str = "10.96.0.0/24";

const START_TIMEOUT: Duration = Duration::from_secs(90);
const LOG_TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Binaries(#[from] BinariesError),
    #[error("failed to generate the control plane's certificates")]
    Pki(#[from] PkiError),
    #[error("failed to allocate a free loopback port")]
    Port(#[source] std::io::Error),
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create the control plane's directory")]
    TempDir(#[source] std::io::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{component} did not become ready within {timeout:?}: {last_error}\n{logs}")]
    NotReady {
        component: &'static str,
        timeout: Duration,
        last_error: String,
        logs: String,
    },
    #[error("{component} exited during start-up ({status})\n{logs}")]
    Exited {
        component: &'static str,
        status: std::process::ExitStatus,
        logs: String,
    },
    #[error("failed to build a client from the admin kubeconfig")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Options for [`ControlPlane::start`].
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// Extra addresses the serving certificate must be valid for (e.g. the address
    /// pods dial).
    pub extra_serving_ips: Vec<IpAddr>,
    /// Keep the state directory instead of deleting it on drop.
    pub keep_dir: bool,
    /// Controllers run in addition to [`CONTROLLERS`] (e.g. `persistentvolume-binder-controller`
    /// for real nodes, whose pods need bound PersistentVolumeClaims).
    pub extra_controllers: Vec<String>,
}

/// How long each phase of the start took.
#[derive(Debug, Clone, Copy)]
pub struct StartTimings {
    pub etcd: Duration,
    pub apiserver: Duration,
    pub controller_manager: Duration,
    pub total: Duration,
}

impl std::fmt::Display for StartTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}s (etcd {:.1}s, kube-apiserver {:.1}s, kube-controller-manager {:.1}s)",
            self.total.as_secs_f64(),
            self.etcd.as_secs_f64(),
            self.apiserver.as_secs_f64(),
            self.controller_manager.as_secs_f64()
        )
    }
}

/// A running control plane. Dropping it stops the components (reverse order).
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: components stop before the directory goes.
    controller_manager: Component,
    apiserver: Component,
    etcd: Component,
    binaries: Binaries,
    versions: Versions,
    api_port: u16,
    /// What started etcd and kube-apiserver, to start them again after a stop.
    etcd_spec: ComponentSpec,
    apiserver_spec: ComponentSpec,
    etcd_url: String,
    admin_kubeconfig: PathBuf,
    pki: Pki,
    timings: StartTimings,
    dir: StateDir,
}

#[derive(Debug)]
enum StateDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl StateDir {
    fn path(&self) -> &Path {
        match self {
            StateDir::Temp(t) => t.path(),
            StateDir::Kept(p) => p,
        }
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until each is
    /// ready. On failure the error carries the tail of every component's log.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self, ControlPlaneError> {
        let binaries = Binaries::locate()?;
        let versions = Versions::pinned()?;
        let started = Instant::now();

        let temp = tempfile::Builder::new()
            .prefix("pgrs-testbed-")
            .tempdir()
            .map_err(ControlPlaneError::TempDir)?;
        let dir = if options.keep_dir {
            StateDir::Kept(temp.keep())
        } else {
            StateDir::Temp(temp)
        };
        let root = dir.path().to_path_buf();
        let logs = root.join("logs");
        mkdir(&logs)?;

        let etcd_port = free_port().map_err(ControlPlaneError::Port)?;
        let etcd_peer_port = free_port().map_err(ControlPlaneError::Port)?;
        let api_port = free_port().map_err(ControlPlaneError::Port)?;

        let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        ips.extend(options.extra_serving_ips.iter().copied());
        let pki = Pki::generate(&ips)?;
        let pki_dir = root.join("pki");
        mkdir(&pki_dir)?;
        let ca = write(&pki_dir.join("ca.crt"), &pki.ca_pem)?;
        let serving_cert = write(&pki_dir.join("apiserver.crt"), &pki.serving.cert_pem)?;
        let serving_key = write(&pki_dir.join("apiserver.key"), &pki.serving.key_pem)?;
        let sa_key = write(&pki_dir.join("sa.key"), &pki.service_account_key_pem)?;
        let sa_pub = write(&pki_dir.join("sa.pub"), &pki.service_account_public_pem)?;
        let server = format!("https://127.0.0.1:{api_port}");
        let admin_kubeconfig = write(
            &root.join("admin.kubeconfig"),
            &kubeconfig_with_cert(
                &server,
                &pki.ca_pem,
                "admin",
                &pki.admin.cert_pem,
                &pki.admin.key_pem,
            ),
        )?;
        let kcm_kubeconfig = write(
            &root.join("kube-controller-manager.kubeconfig"),
            &kubeconfig_with_cert(
                &server,
                &pki.ca_pem,
                "kube-controller-manager",
                &pki.controller_manager.cert_pem,
                &pki.controller_manager.key_pem,
            ),
        )?;

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_args = vec![
            format!("--data-dir={}", root.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        let etcd_spec = ComponentSpec {
            name: "etcd",
            program: binaries.etcd(),
            args: etcd_args,
            logs: logs.clone(),
        };
        let mut etcd = etcd_spec.start()?;
        let http = reqwest::Client::new();
        let health = format!("{etcd_url}/health");
        wait_until("etcd", &mut [&mut etcd], || {
            let http = http.clone();
            let health = health.clone();
            async move {
                let body = http
                    .get(&health)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())?;
                if body.contains("\"health\":\"true\"") {
                    Ok(())
                } else {
                    Err(body)
                }
            }
        })
        .await?;
        let etcd_ready = started.elapsed();

        // kube-apiserver
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            // Offline there is no default route to derive an address from.
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", pki_dir.display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca.display()),
            format!("--service-account-issuer={server}"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--authorization-mode=RBAC".to_owned(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".to_owned(),
            // Endpoints may not hold loopback addresses, so the `kubernetes` Service
            // cannot point at 127.0.0.1.
            "--endpoint-reconciler-type=none".to_owned(),
            "--profiling=false".to_owned(),
            "--v=1".to_owned(),
        ];
        let apiserver_spec = ComponentSpec {
            name: "kube-apiserver",
            program: binaries.kube_apiserver(),
            args: apiserver_args,
            logs: logs.clone(),
        };
        let mut apiserver = apiserver_spec.start()?;
        let client = admin_client(&admin_kubeconfig).await?;
        wait_until("kube-apiserver", &mut [&mut etcd, &mut apiserver], || {
            let client = client.clone();
            async move {
                let request = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                match client.request_text(request).await {
                    Ok(body) if body.trim() == "ok" => Ok(()),
                    Ok(body) => Err(body),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await?;
        let apiserver_ready = started.elapsed();

        // kube-controller-manager
        let kcm_args = vec![
            format!("--kubeconfig={}", kcm_kubeconfig.display()),
            "--leader-elect=false".to_owned(),
            // "If 0, don't serve HTTPS at all".
            "--secure-port=0".to_owned(),
            "--use-service-account-credentials=false".to_owned(),
            format!("--root-ca-file={}", ca.display()),
            format!(
                "--controllers={}",
                std::iter::once(CONTROLLERS.to_owned())
                    .chain(options.extra_controllers.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            "--concurrent-statefulset-syncs=5".to_owned(),
            "--v=1".to_owned(),
        ];
        let mut controller_manager = Component::start(
            "kube-controller-manager",
            &binaries.kube_controller_manager(),
            &kcm_args,
            &logs,
        )?;
        // The serviceaccount controller creating `default/default` proves it runs.
        let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        wait_until(
            "kube-controller-manager",
            &mut [&mut etcd, &mut apiserver, &mut controller_manager],
            || {
                let service_accounts = service_accounts.clone();
                async move {
                    match service_accounts.get_opt("default").await {
                        Ok(Some(_)) => Ok(()),
                        Ok(None) => Err("no ServiceAccount default/default yet".to_owned()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await?;
        let total = started.elapsed();

        let timings = StartTimings {
            etcd: etcd_ready,
            apiserver: apiserver_ready - etcd_ready,
            controller_manager: total - apiserver_ready,
            total,
        };
        tracing::info!(
            "pgrs-testbed: control plane {} ready in {timings} at {server} (state in {})",
            versions.kubernetes,
            root.display()
        );
        Ok(Self {
            controller_manager,
            apiserver,
            etcd,
            binaries,
            versions,
            api_port,
            etcd_spec,
            apiserver_spec,
            etcd_url,
            admin_kubeconfig,
            pki,
            timings,
            dir,
        })
    }

    /// `https://127.0.0.1:<port>`
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    pub fn timings(&self) -> StartTimings {
        self.timings
    }

    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// A client with cluster-admin rights (`system:masters`).
    pub async fn admin_client(&self) -> Result<Client, ControlPlaneError> {
        admin_client(&self.admin_kubeconfig).await
    }

    /// A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount token).
    pub fn token_kubeconfig(&self, user: &str, token: &str) -> String {
        kubeconfig_with_token(&self.server_url(), &self.pki.ca_pem, user, token)
    }

    /// The tail of every component's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        [&self.etcd, &self.apiserver, &self.controller_manager]
            .iter()
            .map(|c| {
                format!(
                    "----- {} ({}) -----\n{}",
                    c.name(),
                    c.log_path().display(),
                    c.log_tail(lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the components in reverse start order.
    pub fn stop(&mut self) {
        let grace = Duration::from_secs(5);
        self.controller_manager.stop(grace);
        self.apiserver.stop(grace);
        self.etcd.stop(grace);
    }
}

/// How a component is (re)started: the same program, flags and log file every time.
#[derive(Debug, Clone)]
struct ComponentSpec {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    logs: PathBuf,
}

impl ComponentSpec {
    fn start(&self) -> Result<Component, ProcessError> {
        Component::start(self.name, &self.program, &self.args, &self.logs)
    }
}

async fn admin_client(kubeconfig: &Path) -> Result<Client, ControlPlaneError> {
    client_from_kubeconfig_file(kubeconfig)
        .await
        .map_err(ControlPlaneError::Client)
}

/// A client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig_file(
    path: &Path,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    client_from_kubeconfig(kubeconfig).await
}

/// A client from an in-memory kubeconfig (its current context).
pub async fn client_from_kubeconfig(
    kubeconfig: Kubeconfig,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Polls `probe` every 100 ms until it succeeds; fails early when a component exits,
/// and after [`START_TIMEOUT`], with the log tails of `components`.
async fn wait_until<F, Fut>(
    component: &'static str,
    components: &mut [&mut Component],
    mut probe: F,
) -> Result<(), ControlPlaneError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    let tails = |components: &[&mut Component]| {
        components
            .iter()
            .map(|c| format!("----- {} -----\n{}", c.name(), c.log_tail(LOG_TAIL_LINES)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    loop {
        let last_error = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        for c in components.iter_mut() {
            if let Some(status) = c.exited() {
                return Err(ControlPlaneError::Exited {
                    component,
                    status,
                    logs: tails(components),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(ControlPlaneError::NotReady {
                component,
                timeout: START_TIMEOUT,
                last_error,
                logs: tails(components),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mkdir(path: &Path) -> Result<(), ControlPlaneError> {
    std::fs::create_dir_all(path).map_err(|source| ControlPlaneError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &str) -> Result<PathBuf, ControlPlaneError> {
    std::fs::write(path, contents).map_err(|source| ControlPlaneError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(path.to_owned())
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A kubeconfig for one user authenticated by a client certificate.
pub fn kubeconfig_with_cert(
    server: &str,
    ca_pem: &str,
    user: &str,
    cert: &str,
    key: &str,
) -> String {
    kubeconfig(
        server,
        ca_pem,
        user,
        &format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert),
            b64(key)
        ),
    )
}

/// A kubeconfig for one user authenticated by a bearer token.
pub fn kubeconfig_with_token(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    kubeconfig(server, ca_pem, user, &format!("    token: {token}\n"))
}

fn kubeconfig(server: &str, ca_pem: &str, user: &str, credentials: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: pgrs-testbed
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
{credentials}contexts:
- name: pgrs-testbed
  context:
    cluster: pgrs-testbed
    user: {user}
current-context: pgrs-testbed
",
        ca = b64(ca_pem)
    )
}
