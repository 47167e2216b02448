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
    let bed = bed().await;
    install_crd(bed).await;
    let ns = bed.namespace("op-switch").await.expect("namespace");
    let ns_name = ns.name().to_string();
    let client = bed.client().await.expect("admin client");
    let operator = OperatorProcess::start(bed, &ns_name);

    let example = repo_path("examples/basic.yaml");
    kubectl(
        bed,
        &["apply", "-n", &ns_name, "-f", &example.to_string_lossy()],
    );
    let primary = eventually(
        "basic cluster Healthy",
        Duration::from_secs(180),
        || async {
            let status = cluster(&client, &ns_name, CLUSTER)
                .await?
                .status
                .ok_or("no status yet")?;
            match (
                &status.phase,
                &status.current_primary,
                status.ready.as_deref(),
            ) {
                (Some(Phase::Healthy), Some(primary), Some("3/3")) => Ok(primary.clone()),
                _ => Err(format!("{:?} {:?}", status.phase, status.ready)),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let target = ["pg-0", "pg-1", "pg-2"]
        .into_iter()
        .find(|name| *name != primary)
        .expect("a standby")
        .to_string();

    let requested_at = Instant::now();
    kubectl(
        bed,
        &[
            "annotate",
            "pgrs",
            CLUSTER,
            "-n",
            &ns_name,
            &format!("pgrs.dev/switchover-to={target}"),
        ],
    );
    let target_ip = pod_ips(&client, &ns_name, CLUSTER).await[&target].clone();
    let switched = eventually(
        "-rw moves to the target",
        Duration::from_secs(60),
        || async {
            let rw = endpoint_addresses(&client, &ns_name, "pg-rw").await;
            (rw == [target_ip.clone()])
                .then(|| requested_at.elapsed())
                .ok_or(format!("{rw:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let status = eventually(
        "Healthy on the target",
        Duration::from_secs(120),
        || async {
            let status = cluster(&client, &ns_name, CLUSTER)
                .await?
                .status
                .ok_or("no status")?;
            let old = status
                .instances
                .iter()
                .find(|i| i.name == primary)
                .ok_or("the old primary is not listed")?;
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
