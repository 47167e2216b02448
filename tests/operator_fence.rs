//! Manual fencing on the test bed (`kubectl annotate pgrs pg pgrs.dev/fence=POD`):
//! - a fenced replica has postgres stopped (role `Fenced`, no connection), leaves `-r` and
//!   `-ro`, is shown in the `Fenced` condition and an Event, and is skipped by a failover (the
//!   other replica is promoted when the primary pod is deleted); unfenced, it rejoins;
//! - a fenced primary leaves the cluster without a writable primary and is not failed over,
//!   even after its Lease expired; unfenced, the cluster fails over and the old primary
//!   rejoins as a replica.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::time::{Duration, Instant};

use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus};
use pgrs_testbed::TestBed;
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

fn role_of(status: &PgReplicaSetStatus, instance: &str) -> Option<InstanceRole> {
    status
        .instances
        .iter()
        .find(|i| i.name == instance)
        .map(|i| i.role)
}

fn condition<'a>(
    status: &'a PgReplicaSetStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn annotate(bed: &TestBed, ns: &str, value: Option<&str>) {
    let arg = match value {
        Some(instance) => format!("pgrs.dev/fence={instance}"),
        None => "pgrs.dev/fence-".to_string(),
    };
    kubectl(
        bed,
        &["annotate", "--overwrite", "pgrs", CLUSTER, "-n", ns, &arg],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_instances_stop_leave_the_services_and_are_never_promoted() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-fence").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let mut replicas: Vec<String> = ips.keys().filter(|n| **n != primary).cloned().collect();
    replicas.sort();
    let (fenced, other) = (replicas[0].clone(), replicas[1].clone());
    let fenced_ip = ips[&fenced].clone();
    let password = app_login(&client, &ns_name, CLUSTER).await;
    eventually(
        "-r selects all three pods",
        Duration::from_secs(30),
        || async {
            let r = endpoint_addresses(&client, &ns_name, "pg-r").await;
            (r.len() == 3).then_some(()).ok_or(format!("{r:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // 1. Fence a replica.
    annotate(bed, &ns_name, Some(&fenced));
    eventually(
        "the replica is fenced and shown as such",
        Duration::from_secs(60),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let shown = condition(&status, "Fenced")
                .is_some_and(|c| c.status == "True" && c.message.contains(&fenced));
            (role_of(&status, &fenced) == Some(InstanceRole::Fenced) && shown)
                .then_some(())
                .ok_or(format!("{:?}", status.instances))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        connect(&fenced_ip, &password).await.is_err(),
        "postgres of a fenced instance must be stopped"
    );
    eventually(
        "the fenced replica leaves -r and -ro",
        Duration::from_secs(30),
        || async {
            let r = endpoint_addresses(&client, &ns_name, "pg-r").await;
            let ro = endpoint_addresses(&client, &ns_name, "pg-ro").await;
            (r.len() == 2 && !r.contains(&fenced_ip) && !ro.contains(&fenced_ip))
                .then_some(())
                .ok_or(format!("-r {r:?} -ro {ro:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    wait_event(bed, &ns_name, "Fenced", &fenced).await;

    // 2. The primary pod is deleted: the unfenced replica is promoted, never the fenced one.
    kubectl(
        bed,
        &["delete", "pod", &primary, "-n", &ns_name, "--wait=false"],
    );
    let new_primary = eventually(
        "a failover to the unfenced replica",
        Duration::from_secs(90),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let current = status.current_primary.clone().ok_or("no primary")?;
            (current != primary)
                .then_some(current)
                .ok_or_else(|| "still the old primary".to_string())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        new_primary, other,
        "the fenced replica must not be promoted"
    );
    // The deleted pod rejoins; the fenced one stays fenced.
    eventually(
        "the old primary rejoins while the fenced one stays fenced",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let old = listed_instance(&status, &primary)?;
            (old.role == InstanceRole::Replica
                && old.ready
                && role_of(&status, &fenced) == Some(InstanceRole::Fenced))
            .then_some(())
            .ok_or(format!("{:?}", status.instances))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // 3. Unfenced, it rejoins the new primary.
    annotate(bed, &ns_name, None);
    let current = wait_three_ready_healthy(
        &client,
        &ns_name,
        CLUSTER,
        "Healthy again after the unfence",
    )
    .await;
    assert_eq!(current, other);
    wait_event(bed, &ns_name, "Unfenced", &fenced).await;
    let status_now = cluster_status(&client, &ns_name, CLUSTER)
        .await
        .expect("status");
    assert!(
        condition(&status_now, "Fenced").is_some_and(|c| c.status == "False"),
        "{:?}",
        status_now.conditions
    );
    eventually(
        "the unfenced replica is back in -r",
        Duration::from_secs(30),
        || async {
            let r = endpoint_addresses(&client, &ns_name, "pg-r").await;
            r.contains(&fenced_ip).then_some(()).ok_or(format!("{r:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // 4. Fence the primary: no writable primary, and no failover while it is fenced.
    let primary = current;
    let primary_ip = pod_ips(&client, &ns_name, CLUSTER).await[&primary].clone();
    annotate(bed, &ns_name, Some(&primary));
    let fenced_at = Instant::now();
    eventually(
        "the primary is fenced and -rw is empty",
        Duration::from_secs(60),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let rw = endpoint_addresses(&client, &ns_name, "pg-rw").await;
            (role_of(&status, &primary) == Some(InstanceRole::Fenced)
                && status.current_primary.is_none()
                && rw.is_empty())
            .then_some(())
            .ok_or(format!("-rw {rw:?}: {:?}", status.instances))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(connect(&primary_ip, &password).await.is_err());
    // Past the Lease expiry (8 s) and a few rounds: still nobody promoted.
    while fenced_at.elapsed() < Duration::from_secs(20) {
        let status = cluster_status(&client, &ns_name, CLUSTER)
            .await
            .expect("status");
        assert!(
            status.current_primary.is_none()
                && status
                    .instances
                    .iter()
                    .all(|i| i.role != InstanceRole::Primary),
            "a fenced primary must not be failed over: {:?}",
            status.instances
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status_now = cluster_status(&client, &ns_name, CLUSTER)
        .await
        .expect("status");
    eprintln!(
        "fenced primary: phase {:?}, conditions {:?}",
        status_now.phase, status_now.conditions
    );

    // 5. Unfenced: the cluster fails over and the old primary rejoins as a replica.
    annotate(bed, &ns_name, None);
    let after = wait_three_ready_healthy(
        &client,
        &ns_name,
        CLUSTER,
        "Healthy after unfencing the primary",
    )
    .await;
    assert_ne!(after, primary, "the unfenced primary rejoins as a replica");
    let status_now = cluster_status(&client, &ns_name, CLUSTER)
        .await
        .expect("status");
    assert_eq!(role_of(&status_now, &primary), Some(InstanceRole::Replica));
    drop(operator);
}
