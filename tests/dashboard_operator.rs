//! The dashboard of `pgrs operator` on the test bed (real kube-apiserver; pods are local
//! processes): once a two-instance PgReplicaSet is Healthy, `GET /api/clusters` on the
//! operator's health listener lists it with the primary and Lease holder of its status, and
//! `GET /` serves the page.
//!
//! Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use operator_support::*;
use pgrs::api::Phase;
use pgrs::dashboard::api::{ClustersResponse, Source};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "dash";

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// `pgrs operator` on a known health port (the shared helper picks its own); killed on drop,
/// its log printed when the test fails.
struct Operator {
    child: Child,
    log: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Operator {
    fn start(bed: &pgrs_testbed::TestBed, namespace: &str) -> Operator {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).expect("create the operator log");
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_pgrs"))
            .args([
                "operator",
                "--namespace",
                namespace,
                "--default-image",
                IMAGE,
                "--database-as-root",
                "--health-listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", bed.admin_kubeconfig())
            .env("PGRS_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file)
            .spawn()
            .expect("start pgrs operator");
        Operator {
            child,
            log,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- operator log (last 60 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_dashboard_lists_the_cluster_with_its_primary() {
    let bed = bed().await;
    install_crd(bed).await;
    let ns = bed.namespace("dash-op").await.expect("namespace");
    let ns_name = ns.name().to_string();
    let client = bed.client().await.expect("admin client");
    let operator = Operator::start(bed, &ns_name);
    let base = format!("http://127.0.0.1:{}", operator.port);

    let manifest = format!(
        "apiVersion: pgrs.dev/v1alpha1\nkind: PgReplicaSet\nmetadata:\n  name: {CLUSTER}\n  namespace: {ns_name}\nspec:\n  replicas: 2\n  storage:\n    size: 1Gi\n"
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), manifest).expect("write the manifest");
    kubectl(bed, &["apply", "-f", &file.path().to_string_lossy()]);

    let primary = eventually(
        "the cluster is Healthy",
        Duration::from_secs(180),
        || async {
            let status = cluster(&client, &ns_name, CLUSTER)
                .await?
                .status
                .ok_or("no status yet")?;
            if status.phase != Some(Phase::Healthy) {
                return Err(format!("phase {:?}", status.phase));
            }
            status.current_primary.ok_or("no primary".to_string())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    // The dashboard polls the API server every couple of seconds: wait for it to catch up.
    let response = eventually(
        "the operator's /api/clusters shows the cluster",
        Duration::from_secs(60),
        || async {
            let response: ClustersResponse = http
                .get(format!("{base}/api/clusters"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let found = response
                .clusters
                .iter()
                .find(|c| c.name == CLUSTER && c.namespace.as_deref() == Some(ns_name.as_str()))
                .ok_or_else(|| format!("not listed: {response:?}"))?;
            // The status may flap between Healthy and Degraded while the standby settles.
            if found.primary.as_deref() != Some(primary.as_str())
                || found.lease.holder.as_deref() != Some(primary.as_str())
                || found.phase != Some(Phase::Healthy)
                || found.nodes.len() != 2
            {
                return Err(format!(
                    "primary {:?}, lease holder {:?}, phase {:?}, {} nodes",
                    found.primary,
                    found.lease.holder,
                    found.phase,
                    found.nodes.len()
                ));
            }
            Ok(response)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.api_version, pgrs::dashboard::api::API_VERSION);
    assert_eq!(response.source, Source::Operator);
    assert_eq!(response.error, None);
    let view = &response.clusters[0];
    let primary_node = view
        .nodes
        .iter()
        .find(|n| n.name == primary)
        .expect("the primary's row");
    assert_eq!(primary_node.role, "primary");
    assert!(primary_node.ready);
    assert!(primary_node.current_lsn.is_some());
    let replica = view
        .nodes
        .iter()
        .find(|n| n.name != primary)
        .expect("the standby's row");
    assert_eq!(replica.role, "replica");
    assert_eq!(replica.upstream.as_deref(), Some(primary.as_str()));
    assert!(
        view.lease.duration_ms.is_some_and(|d| d > 0),
        "{:?}",
        view.lease
    );

    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("page");
    assert!(page.contains("pgrs replication status"), "{page}");
    drop(operator);
}
