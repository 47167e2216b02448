//! A hard kill of the primary pod on the test bed: every process of the pod (the agent, its
//! fencing watchdog, postgres and its backends) is SIGKILLed without any API call, under a write
//! load. Nothing releases the Lease; the operator waits for it to expire, promotes a standby and
//! moves `-rw`; writes resume on the new primary. Acknowledged writes missing on the new primary
//! are counted in the report, not asserted absent: with asynchronous replication the kill may
//! lose the last acknowledged commits (and has: 1 of 433 in one run). The pod's
//! container is restarted by the (fake) kubelet and the old primary rejoins as a replica;
//! `status.lastFailover` is filled, and the rejoin ran pg_rewind (an Event `Rejoined … by
//! pg_rewind`) with the replication role as its source login.
//!
//! The kubelet restarts a dead container after 1 s, and an agent that finds itself still the
//! Lease holder resumes as primary (crash recovery, no failover). To test the failover, the test
//! keeps the pod down, killing its restarted processes, until the Lease expired and a standby
//! was chosen: a pod whose processes die and stay dead for longer than the Lease.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_report;
mod operator_support;

use std::time::{Duration, Instant};

use operator_report::{Report, Step, longest_gap};
use operator_support::faults::{hard_kill, pod_processes};
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_killed_primary_pod_is_failed_over_and_rejoins_after_its_restart() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-hardkill").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let old_ip = ips[&primary].clone();
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let writer =
        WriteLoad::start_on_new_table(&client, &ns_name, CLUSTER, &old_ip, &password).await;

    let processes = pod_processes(&ns_name, &primary);
    assert!(
        processes.len() >= 5,
        "the agent, its watchdog, the postmaster and its children of {primary}: {processes:?}"
    );
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let fault = Instant::now();
    let killed = hard_kill(&ns_name, &primary);
    eprintln!("SIGKILLed {killed} processes of {primary}");

    // Watch the failover; keep the pod's restarted processes down until a standby is chosen.
    let mut detected = None;
    let mut promoted = None;
    let mut kills = 1;
    let new_primary = loop {
        assert!(
            fault.elapsed() < Duration::from_secs(90),
            "no failover 90 s after the hard kill"
        );
        let status = cluster_status(&client, &ns_name, CLUSTER)
            .await
            .unwrap_or_default();
        if detected.is_none() && status.phase != Some(Phase::Healthy) {
            detected = Some(fault.elapsed());
        }
        match status.current_primary {
            Some(current) if current != primary => {
                promoted.get_or_insert(fault.elapsed());
                break current;
            }
            _ => {}
        }
        // The failover decision is taken (the Lease moved) once a failover record names it.
        let chosen = status
            .last_failover
            .as_ref()
            .is_some_and(|r| r.from.as_deref() == Some(primary.as_str()));
        if !chosen && hard_kill(&ns_name, &primary) > 0 {
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new_ip = pod_ips(&client, &ns_name, CLUSTER).await[&new_primary].clone();
    let switched = wait_service_selects_only(
        &client,
        &ns_name,
        "pg-rw",
        &new_ip,
        "-rw moves to the new primary",
        Duration::from_secs(30),
        fault,
    )
    .await;
    writer.wait_writes_resume_on(&new_ip).await;

    // The restarted pod rejoins as a replica.
    let status = eventually(
        "the killed pod restarts and rejoins as a replica",
        Duration::from_secs(180),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let old = listed_instance(&status, &primary)?;
            match (&status.phase, old.role, old.ready) {
                (Some(Phase::Healthy), InstanceRole::Replica, true) => Ok(status.clone()),
                _ => Err(format!("{:?}: {old:?}", status.phase)),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rejoined = fault.elapsed();
    // By pg_rewind (not a re-clone): its source session is the replication role's, verified
    // TLS, since the superuser may not log in from the pod network.
    wait_event(bed, &ns_name, "Rejoined", "by pg_rewind").await;
    assert_eq!(
        status.current_primary.as_deref(),
        Some(new_primary.as_str())
    );
    let record = status.last_failover.clone().expect("status.lastFailover");
    assert_eq!(record.from.as_deref(), Some(primary.as_str()));
    assert_eq!(record.to, new_primary);
    assert!(record.detected_at.is_some() && record.fenced_at.is_some());
    assert!(record.promoted_at.is_some() && record.service_switched_at.is_some());
    let restarts = kubectl(
        bed,
        &[
            "get",
            "pod",
            &primary,
            "-n",
            &ns_name,
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ],
    );
    assert!(
        restarts.trim().parse::<u32>().is_ok_and(|n| n >= 1),
        "the container was restarted in place: restartCount {restarts}"
    );

    let acked = writer.finish().await;
    let new_db = connect(&new_ip, &password)
        .await
        .expect("connect to the new primary");
    let ids: Vec<i64> = acked.iter().map(|(id, _, _)| *id).collect();
    let rows = new_db
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&ids])
        .await
        .expect("read back");
    let lost = ids.len() - rows.len();
    let first_on_new = acked
        .iter()
        .filter(|(_, host, _)| *host == new_ip)
        .map(|(_, _, at)| at.duration_since(fault))
        .min();
    let instants: Vec<Instant> = acked.iter().map(|(_, _, at)| *at).collect();
    Report {
        test: "hardkill",
        scenario: "every process of the primary pod SIGKILLed, no API call",
        lease_seconds: 8,
        steps: vec![
            Step::detected(detected),
            Step {
                name: "fenced",
                after: Some(Duration::ZERO),
                how: "the killed postgres accepts nothing from the kill on",
            },
            Step::promoted(promoted),
            Step {
                name: "service switched",
                after: Some(switched),
                how: "`-rw` EndpointSlice holds only the new primary's IP",
            },
            Step {
                name: "first write on the new primary",
                after: first_on_new,
                how: "first acknowledged INSERT through `-rw` on the new primary",
            },
            Step {
                name: "old primary rejoined",
                after: Some(rejoined),
                how: "Healthy, the restarted pod a ready replica",
            },
        ],
        write_unavailable: longest_gap(&instants, fault),
        write_how: "longest gap between acknowledged writes through `-rw`",
        record: Some(record),
        fault_at: fault_wall,
        notes: vec![format!(
            "{} writes acknowledged, {lost} of them missing on the new primary (asynchronous \
             replication: the kill can lose the last acknowledged commits). The pod's processes \
             were killed {kills} times: the restarted agent, still the Lease holder, would \
             resume as primary before the Lease expires.",
            ids.len()
        )],
    }
    .write();
    drop(operator);
}
