//! The dashboard of `pgrs operator` on the test bed (real kube-apiserver; pods are local
//! processes): once a two-instance PgReplicaSet is Healthy, `GET /api/clusters` on the
//! operator's health listener lists it with the primary and Lease holder of its status, and
//! `GET /` serves the page.
//!
//! Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::time::Duration;

use operator_support::*;
use pgrs::api::Phase;
use pgrs::dashboard::api::{ClustersResponse, Source};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "dash";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_dashboard_lists_the_cluster_with_its_primary() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("dash-op").await;
    let operator = OperatorProcess::start(bed, &ns_name);
    let base = format!("http://127.0.0.1:{}", operator.health_port());

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
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
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
