//! Shared by the operator tests: the CRD, the operator as a process, and reading the cluster
//! through the API (pod IPs only: the test bed has no Service routing).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use pgrs::api::PgReplicaSet;
use pgrs_testbed::TestBed;

pub const IMAGE: &str = "ghcr.io/pgrs-dev/pgrs:dev";

pub async fn bed() -> &'static TestBed {
    match pgrs_testbed::shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs `kubectl args...`, panicking with its output on failure; returns stdout.
pub fn kubectl(bed: &TestBed, args: &[&str]) -> String {
    let output = bed
        .kubectl()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run kubectl {args:?}: {e}"));
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Installs the committed CRD (idempotent: one control plane per test binary) and waits until
/// it is served.
pub async fn install_crd(bed: &TestBed) {
    let crd = repo_path("crds/pgreplicaset.yaml");
    kubectl(bed, &["apply", "-f", &crd.to_string_lossy()]);
    // Polled: `kubectl wait` fails outright while the CRD has no conditions yet.
    pgrs_testbed::wait::eventually(
        "the CRD is established",
        Duration::from_secs(60),
        || async {
            // Not `kubectl()`: right after the apply the CRD may have no conditions at all,
            // and the jsonpath filter then fails; that is "not yet", not an error.
            let output = bed
                .kubectl()
                .args([
                    "get",
                    "crd/pgreplicasets.pgrs.dev",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                ])
                .output()
                .map_err(|e| format!("run kubectl: {e}"))?;
            let established = String::from_utf8_lossy(&output.stdout).into_owned();
            (output.status.success() && established.trim() == "True")
                .then_some(())
                .ok_or_else(|| format!("{established}{}", String::from_utf8_lossy(&output.stderr)))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// `pgrs operator` as a process with the admin kubeconfig, watching one namespace. Killed on
/// drop; its log is printed when the test fails.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl OperatorProcess {
    pub fn start(bed: &TestBed, namespace: &str) -> OperatorProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).expect("create the operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgrs"))
            .args([
                "operator",
                "--namespace",
                namespace,
                "--default-image",
                IMAGE,
                "--database-as-root",
                "--health-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .env("KUBECONFIG", bed.admin_kubeconfig())
            .env("PGRS_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file)
            .spawn()
            .expect("start pgrs operator");
        OperatorProcess {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- operator log (last 80 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

pub async fn cluster(client: &Client, ns: &str, name: &str) -> Result<PgReplicaSet, String> {
    Api::<PgReplicaSet>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| e.to_string())
}

/// Pod name → pod IP of the cluster's pods.
pub async fn pod_ips(client: &Client, ns: &str, cluster: &str) -> BTreeMap<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("pgrs.dev/cluster={cluster}")))
        .await
        .expect("list pods");
    list.items
        .into_iter()
        .filter_map(|p| {
            let ip = p.status.and_then(|s| s.pod_ip)?;
            Some((p.metadata.name?, ip))
        })
        .collect()
}

/// Ready addresses of the EndpointSlices of Service `service`.
pub async fn endpoint_addresses(client: &Client, ns: &str, service: &str) -> Vec<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .expect("list endpoint slices");
    let mut addresses: Vec<String> = list
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.unwrap_or_default())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses)
        .collect();
    addresses.sort();
    addresses
}

pub async fn superuser_password(client: &Client, ns: &str, cluster: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{cluster}-secrets"))
        .await
        .expect("read the cluster Secret");
    let data = secret.data.expect("Secret data");
    String::from_utf8(data["superuser-password"].0.clone()).expect("UTF-8 password")
}

pub async fn connect(host: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(5432)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {host}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
