//! Issue 14, acceptance 1: the user's steps of docs/kubernetes.md on a real node instead of
//! kind. A test bed with kube-scheduler and no fake-kubelet binding (`TestBedOptions::real_nodes`),
//! one real node (kubelet, containerd, runc, CNI bridge) with the pgrs image built by
//! `scripts/build-image` and imported into containerd (never pulled); then `helm install` of
//! `charts/pgrs` with its default image and pull policy → the operator is a real container that
//! reaches the API server through the `kubernetes` Service's ClusterIP; `kubectl apply -f
//! examples/basic.yaml` → three real containers on volumes of the bed's PV provisioner, Healthy,
//! lag in `kubectl get pgrs`; `kubectl delete pod <primary>` under a write load (to the pods'
//! IPs, TLS `sslmode=require`) → failover, no acknowledged write lost, the pod comes back as a
//! replica.
//!
//! Skipped, saying so, when the node's binaries (`testbed/node/build.sh`) or kube-scheduler
//! (`testbed/build.sh`) are not built. The image comes from `PGRS_REAL_NODE_IMAGE_ARCHIVE` if
//! set, else `scripts/build-image --binary <this build's pgrs> --save`. `PGRS_REAL_NODE_KEEP=1`
//! keeps the node's and the bed's directories (logs).

mod operator_support;
mod real_node_support;

use std::time::{Duration, Instant};

use operator_support::*;
use pgrs::api::InstanceRole;
use pgrs_testbed::wait::eventually;
use real_node_support::*;

const CLUSTER: &str = "pg";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_and_the_basic_example_fail_over_on_a_real_node() {
    if let Some(why) = missing_binaries() {
        eprintln!(
            "SKIPPED helm_install_and_the_basic_example_fail_over_on_a_real_node: {why}; \
             the operator and the chart are not tested on a real node"
        );
        return;
    }
    let t0 = Instant::now();
    let real = start_with_chart().await;
    let (bed, client) = (real.bed, real.client.clone());
    let (operator_ns, db_ns) = (&real.operator_ns, &real.db_ns);
    let node = real.node();
    let operator_done = t0.elapsed();
    // The operator is a real container on the real node, as uid 999 (exec goes through the
    // real kubelet).
    let operator = assert_on_node(
        &client,
        operator_ns.name(),
        "app.kubernetes.io/name=pgrs-operator",
        node,
    )
    .await;
    let [operator_pod] = operator.as_slice() else {
        panic!("expected one operator pod, found {}", operator.len());
    };
    let operator_name = operator_pod.metadata.name.clone().unwrap_or_default();

    kubectl(
        bed,
        &[
            "apply",
            "-n",
            db_ns.name(),
            "-f",
            &repo_path("examples/basic.yaml").to_string_lossy(),
        ],
    );
    let (status, primary) =
        wait_healthy(&client, db_ns.name(), CLUSTER, "basic cluster Healthy").await;
    let healthy_done = t0.elapsed();
    assert_eq!(status.ready.as_deref(), Some("3/3"));
    let pods = assert_on_node(
        &client,
        db_ns.name(),
        &format!("pgrs.dev/cluster={CLUSTER}"),
        node,
    )
    .await;
    assert_eq!(pods.len(), 3);
    for pod in [&operator_name, &primary] {
        let ns = if *pod == operator_name {
            operator_ns.name()
        } else {
            db_ns.name()
        };
        let id = kubectl(bed, &["exec", "-n", ns, pod, "--", "id", "-u"]);
        assert_eq!(id.trim(), "999", "{ns}/{pod} runs as uid {id}");
    }
    // Every claim is bound to a volume of the bed's provisioner.
    let claims = kubectl(
        bed,
        &[
            "get",
            "pvc",
            "-n",
            db_ns.name(),
            "-o",
            "jsonpath={range .items[*]}{.status.phase} {.spec.volumeName}{\"\\n\"}{end}",
        ],
    );
    assert_eq!(claims.lines().count(), 3, "{claims}");
    assert!(
        claims.lines().all(|l| l.starts_with("Bound pgrs-testbed-")),
        "{claims}"
    );

    // `kubectl get pgrs`: the printer columns, with the lag known.
    let table = kubectl(bed, &["get", "pgrs", CLUSTER, "-n", db_ns.name()]);
    let mut lines = table.lines();
    let header_line = lines.next().unwrap_or_default();
    let header: Vec<&str> = header_line.split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PRIMARY", "READY", "MAX-LAG", "PHASE", "AGE"],
        "{table}"
    );
    // Columns are aligned; MAX-LAG has spaces in it ("0 B, 0.6s").
    let row = lines.next().unwrap_or_default();
    let column = |from: &str, to: &str| {
        let start = header_line.find(from).unwrap_or_default();
        let end = header_line.find(to).unwrap_or_default();
        row.get(start..end).unwrap_or_default().trim().to_owned()
    };
    assert_eq!(column("PRIMARY", "READY"), primary, "{table}");
    assert_eq!(column("READY", "MAX-LAG"), "3/3", "{table}");
    let lag = column("MAX-LAG", "PHASE");
    assert!(
        lag.ends_with('s') && lag.contains(", "),
        "MAX-LAG is not `<size>, <seconds>s`: {table}"
    );
    assert_eq!(column("PHASE", "AGE"), "Healthy", "{table}");

    // Failover: delete the primary pod under a write load (to the pods' IPs, TLS).
    let login = app_login(&client, db_ns.name(), CLUSTER).await;
    let primary_ip = pod_ips(&client, db_ns.name(), CLUSTER).await[&primary].clone();
    let writer =
        WriteLoad::start_on_new_table(&client, db_ns.name(), CLUSTER, &primary_ip, &login).await;
    let deleted_at = Instant::now();
    kubectl(
        bed,
        &[
            "delete",
            "pod",
            &primary,
            "-n",
            db_ns.name(),
            "--wait=false",
        ],
    );
    let (new_primary, rw_switched) = eventually(
        "-rw moves to another pod",
        Duration::from_secs(90),
        || async {
            let rw = endpoint_addresses(&client, db_ns.name(), "pg-rw").await;
            let ips = pod_ips(&client, db_ns.name(), CLUSTER).await;
            match rw.as_slice() {
                [ip] if *ip != primary_ip => ips
                    .iter()
                    .find(|(_, pod_ip)| *pod_ip == ip)
                    .map(|(name, _)| (name.clone(), deleted_at.elapsed()))
                    .ok_or(format!("{ip} is no pod of the cluster")),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(new_primary, primary);
    let (status, current) = wait_healthy(
        &client,
        db_ns.name(),
        CLUSTER,
        "Healthy again after the failover",
    )
    .await;
    let recovered = deleted_at.elapsed();
    assert_eq!(current, new_primary);
    let old = status
        .instances
        .iter()
        .find(|i| i.name == primary)
        .expect("the old primary is listed");
    assert_eq!(old.role, InstanceRole::Replica, "{:?}", status.instances);
    let record = status.last_failover.clone().expect("status.lastFailover");
    assert_eq!(record.from.as_deref(), Some(primary.as_str()));
    assert_eq!(record.to, current);
    // The recreated pod is a real container on the node again.
    assert_on_node(
        &client,
        db_ns.name(),
        &format!("pgrs.dev/cluster={CLUSTER}"),
        node,
    )
    .await;

    let new_ip = pod_ips(&client, db_ns.name(), CLUSTER).await[&current].clone();
    writer.wait_writes_resume_on(&new_ip).await;
    let acked = writer.finish().await;
    let ids: Vec<i64> = acked.iter().map(|(id, _, _)| *id).collect();
    let rows = connect(&new_ip, &login)
        .await
        .expect("connect to the new primary")
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&ids])
        .await
        .expect("read back");
    assert_eq!(
        rows.len(),
        ids.len(),
        "every acknowledged write survives the failover"
    );
    let failover_done = t0.elapsed();

    eprintln!(
        "operator on a real node: {}, basic Healthy {:.1}s, failover: -rw switched after \
         {:.1}s, Healthy with the old pod back as a replica after {:.1}s, {} writes \
         acknowledged, 0 lost; total {:.1}s",
        real.timings,
        (healthy_done - operator_done).as_secs_f64(),
        rw_switched.as_secs_f64(),
        recovered.as_secs_f64(),
        ids.len(),
        failover_done.as_secs_f64(),
    );
    real.stop();
}
