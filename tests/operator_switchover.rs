//! A planned switchover on the test bed: `kubectl annotate pgrs pg pgrs.dev/switchover-to=POD`
//! moves the primary role to that standby without waiting for a Lease expiry, `-rw` follows,
//! the former primary rejoins as a standby, and the annotation is removed once read.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::time::{Duration, Instant};

use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotating_a_standby_switches_the_primary_over_to_it() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-switch").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let target = ["pg-0", "pg-1", "pg-2"]
        .into_iter()
        .find(|name| *name != primary)
        .expect("a standby")
        .to_string();

    let requested_at = Instant::now();
    request_switchover(bed, &ns_name, CLUSTER, &target);
    let target_ip = pod_ips(&client, &ns_name, CLUSTER).await[&target].clone();
    let switched = wait_service_selects_only(
        &client,
        &ns_name,
        "pg-rw",
        &target_ip,
        "-rw moves to the target",
        Duration::from_secs(60),
        requested_at,
    )
    .await;

    let status = eventually(
        "Healthy on the target",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let old = listed_instance(&status, &primary)?;
            match (&status.phase, &status.current_primary, old.role, old.ready) {
                (Some(Phase::Healthy), Some(current), InstanceRole::Replica, true)
                    if *current == target =>
                {
                    Ok(status.clone())
                }
                _ => Err(format!(
                    "{:?} {:?} {old:?}",
                    status.phase, status.current_primary
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let record = status.last_failover.expect("status.lastFailover");
    assert_eq!(record.reason, "Switchover");
    assert_eq!(record.from.as_deref(), Some(primary.as_str()));
    assert_eq!(record.to, target);

    let annotations = cluster(&client, &ns_name, CLUSTER)
        .await
        .expect("read the cluster")
        .metadata
        .annotations
        .unwrap_or_default();
    assert!(
        !annotations.contains_key("pgrs.dev/switchover-to"),
        "the annotation is removed once read: {annotations:?}"
    );
    eprintln!(
        "operator switchover {primary} -> {target}: -rw switched after {} ms",
        switched.as_millis()
    );
    drop(operator);
}
