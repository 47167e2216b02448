//! What the real-node tests share (`operator_real_node`, `operator_real_node_faults`): whether
//! the node can run here, the image archive, a bed with kube-scheduler and one real node, the
//! chart installed with its defaults in a `restricted` namespace, the clean-up (with every
//! pod's state and logs when the test fails), and the Healthy check. Include it after
//! `mod operator_support;` with `mod real_node_support;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase};
use pgrs_testbed::node::{NodeBinaries, RealNode, RealNodeOptions};
use pgrs_testbed::testbed::error_chain;
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, TestBedOptions, TestNamespace};

use crate::operator_support::{cluster_status, kubectl, repo_path};

pub const RELEASE: &str = "pgrs";

pub fn keep() -> bool {
    std::env::var_os("PGRS_REAL_NODE_KEEP").is_some()
}

/// Why the test cannot run here, if it cannot.
pub fn missing_binaries() -> Option<String> {
    if let Err(e) = NodeBinaries::locate() {
        return Some(e.to_string());
    }
    match pgrs_testbed::bins::Binaries::locate() {
        Ok(b) if b.kube_scheduler().is_file() => None,
        Ok(b) => Some(format!(
            "no kube-scheduler in {} (run testbed/build.sh)",
            b.dir().display()
        )),
        Err(e) => Some(e.to_string()),
    }
}

pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// An archive of the pgrs image (both tags, `:<version>` and `:<version>-pg15`).
pub fn image_archive(dir: &Path) -> PathBuf {
    if let Some(archive) = std::env::var_os("PGRS_REAL_NODE_IMAGE_ARCHIVE") {
        return PathBuf::from(archive);
    }
    let archive = dir.join("pgrs-image.tar");
    run(Command::new(repo_path("scripts/build-image"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_pgrs"))
        .arg("--save")
        .arg(&archive)
        .current_dir(repo_path(".")));
    archive
}

/// Stops the node, then the bed, also when the test panics (then with the node's logs and
/// every pod's state and log tail first).
pub struct Cleanup {
    pub bed: &'static TestBed,
    pub node: Option<RealNode>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", dump(self.bed));
            if let Some(node) = &self.node {
                eprintln!("{}", node.log_tails(60));
            }
            eprintln!("{}", self.bed.log_tails(None, 30));
        }
        let started = Instant::now();
        if let Some(mut node) = self.node.take() {
            node.stop();
        }
        self.bed.shutdown();
        eprintln!(
            "real node and bed stopped in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// `kubectl get pods -A -o wide`, the describe of every pod not Running and Ready, and the log
/// tail of every container.
pub fn dump(bed: &TestBed) -> String {
    let kubectl_out = |args: &[&str]| {
        bed.kubectl()
            .args(args)
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| e.to_string())
    };
    let mut out = kubectl_out(&["get", "pods,pvc,pv", "-A", "-o", "wide"]);
    out.push_str(&kubectl_out(&["get", "events", "-A"]));
    let pods = kubectl_out(&[
        "get",
        "pods",
        "-A",
        "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
    ]);
    for pod in pods.lines().filter(|l| l.contains('/')) {
        let (ns, name) = pod.split_once('/').unwrap_or_default();
        out.push_str(&format!("\n----- describe {pod} -----\n"));
        out.push_str(&kubectl_out(&["describe", "pod", "-n", ns, name]));
        out.push_str(&format!("\n----- logs {pod} -----\n"));
        out.push_str(&kubectl_out(&[
            "logs",
            "-n",
            ns,
            name,
            "--all-containers",
            "--tail=40",
        ]));
    }
    out
}

/// Healthy with one ready primary (the current one) and two streaming standbys: its name.
pub fn healthy(status: &PgReplicaSetStatus) -> Result<String, String> {
    let streaming = status
        .instances
        .iter()
        .filter(|i| i.role == InstanceRole::Replica && i.ready && i.lag_bytes.is_some())
        .count();
    let primaries: Vec<_> = status
        .instances
        .iter()
        .filter(|i| i.role == InstanceRole::Primary && i.ready)
        .collect();
    match (&status.phase, primaries.as_slice(), &status.current_primary) {
        (Some(Phase::Healthy), [only], Some(current))
            if only.name == *current && streaming == 2 =>
        {
            Ok(current.clone())
        }
        _ => Err(format!(
            "{:?}, {} ready primaries, {streaming} streaming standbys: {:?}",
            status.phase,
            primaries.len(),
            status.instances
        )),
    }
}

pub async fn wait_healthy(
    client: &Client,
    ns: &str,
    cluster: &str,
    what: &str,
) -> (PgReplicaSetStatus, String) {
    eventually(what, Duration::from_secs(300), || async {
        let status = cluster_status(client, ns, cluster).await?;
        let primary = healthy(&status)?;
        Ok((status, primary))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Every pod of `selector` in `ns` is on `node` and has an IP of its subnet.
pub async fn assert_on_node(
    client: &Client,
    ns: &str,
    selector: &str,
    node: &RealNode,
) -> Vec<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods");
    let prefix = node.pod_subnet().to_string();
    let prefix = prefix.trim_end_matches('0');
    for pod in &pods.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let on = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        assert_eq!(on.as_deref(), Some(node.name()), "{ns}/{name}'s node");
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        assert!(
            ip.starts_with(prefix),
            "{ns}/{name} has IP {ip}, not one of the real node's {prefix}0/24"
        );
    }
    pods.items
}

/// The set-up's steps, measured from the test's start.
pub struct SetupTimings {
    pub image: Duration,
    pub bed: Duration,
    pub node: Duration,
    pub operator: Duration,
}

impl std::fmt::Display for SetupTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image archive {:.1}s, bed (with kube-scheduler) {:.1}s, node {:.1}s, helm install \
             --wait {:.1}s",
            self.image.as_secs_f64(),
            (self.bed - self.image).as_secs_f64(),
            (self.node - self.bed).as_secs_f64(),
            (self.operator - self.node).as_secs_f64(),
        )
    }
}

/// A bed with one real node and the chart installed.
/// Fields drop in order: the namespaces before the node and the bed, also on a panic.
pub struct RealBed {
    pub bed: &'static TestBed,
    pub client: Client,
    pub db_ns: TestNamespace<'static>,
    pub operator_ns: TestNamespace<'static>,
    pub cleanup: Cleanup,
    pub timings: SetupTimings,
    _scratch: tempfile::TempDir,
}

impl RealBed {
    pub fn node(&self) -> &RealNode {
        self.cleanup.node.as_ref().expect("the node runs")
    }

    /// The namespaces go first (while the node still runs), then the node and the bed.
    pub fn stop(self) {
        let RealBed {
            cleanup,
            operator_ns,
            db_ns,
            ..
        } = self;
        drop(db_ns);
        drop(operator_ns);
        drop(cleanup);
    }
}

/// The image archive, a bed with kube-scheduler and no fake-kubelet binding, one real node
/// with the image imported, two namespaces enforcing the `restricted` Pod Security Standard
/// (`pgrs-system` for the operator, `db`), and `helm install` of `charts/pgrs` with the
/// chart's defaults (image `ghcr.io/pgrs-dev/pgrs:<appVersion>`, `IfNotPresent`) and `--wait`.
pub async fn start_with_chart() -> RealBed {
    let t0 = Instant::now();
    let scratch = tempfile::tempdir().expect("temp dir");
    let archive = image_archive(scratch.path());
    let image = t0.elapsed();

    let bed: &'static TestBed = tokio::task::spawn_blocking(|| {
        TestBed::start(TestBedOptions {
            keep_dir: keep(),
            real_nodes: true,
            ..TestBedOptions::default()
        })
        .map(|bed| &*Box::leak(Box::new(bed)))
    })
    .await
    .expect("start the bed")
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let bed_done = t0.elapsed();
    let mut cleanup = Cleanup { bed, node: None };
    let images = vec![archive];
    let node = tokio::task::spawn_blocking(move || {
        RealNode::start(
            bed,
            RealNodeOptions {
                images,
                keep_dir: keep(),
                ..RealNodeOptions::default()
            },
        )
    })
    .await
    .expect("start the node")
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let node_done = t0.elapsed();
    eprintln!("real node started: {}", node.timings());
    cleanup.node = Some(node);
    let client = bed.client().await.expect("admin client");

    let operator_ns = bed.namespace("pgrs-system").await.expect("namespace");
    let db_ns = bed.namespace("db").await.expect("namespace");
    for ns in [operator_ns.name(), db_ns.name()] {
        kubectl(
            bed,
            &[
                "label",
                "namespace",
                ns,
                "pod-security.kubernetes.io/enforce=restricted",
            ],
        );
    }
    let install = bed
        .helm()
        .args([
            "install",
            RELEASE,
            &repo_path("charts/pgrs").to_string_lossy(),
            "-n",
            operator_ns.name(),
            "--set",
            "logFormat=text",
            "--wait",
            "--timeout",
            "180s",
        ])
        .output()
        .expect("run helm");
    assert!(
        install.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    let operator = t0.elapsed();
    RealBed {
        bed,
        client,
        cleanup,
        operator_ns,
        db_ns,
        timings: SetupTimings {
            image,
            bed: bed_done,
            node: node_done,
            operator,
        },
        _scratch: scratch,
    }
}
