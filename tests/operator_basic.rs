//! The operator on the test bed (real kube-apiserver, controller-manager and kubectl; pods are
//! local processes with their own pod IPs): `examples/basic.yaml` becomes a Healthy cluster
//! with one primary and two streaming standbys, `-rw` points at the primary, data written on
//! the primary is read on the standbys, and deleting the primary pod under a write load
//! promotes a standby without losing an acknowledged write, moves `-rw`, and brings the old
//! pod back as a standby.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_report;
mod operator_support;

use std::time::{Duration, Instant};

use kube::Client;
use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

fn healthy_with(status: &PgReplicaSetStatus, replicas: usize) -> Result<String, String> {
    if status.phase != Some(Phase::Healthy) {
        return Err(format!("phase {:?}", status.phase));
    }
    let primaries: Vec<_> = status
        .instances
        .iter()
        .filter(|i| i.role == InstanceRole::Primary && i.ready)
        .collect();
    let streaming = status
        .instances
        .iter()
        .filter(|i| i.role == InstanceRole::Replica && i.ready && i.lag_bytes.is_some())
        .count();
    match (primaries.as_slice(), status.current_primary.as_ref()) {
        ([only], Some(current)) if only.name == *current && streaming == replicas => {
            Ok(current.clone())
        }
        _ => Err(format!(
            "{} ready primaries, {streaming} streaming standbys: {:?}",
            primaries.len(),
            status.instances
        )),
    }
}

async fn wait_healthy(client: &Client, ns: &str, what: &str) -> (PgReplicaSetStatus, String) {
    eventually(what, Duration::from_secs(180), || async {
        let status = cluster_status(client, ns, CLUSTER).await?;
        let primary = healthy_with(&status, 2)?;
        Ok((status, primary))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_cluster_is_healthy_replicates_and_fails_over_when_the_primary_pod_is_deleted() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-basic").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let (status, primary) = wait_healthy(&client, &ns_name, "basic cluster Healthy").await;
    assert_eq!(status.ready.as_deref(), Some("3/3"));

    // `kubectl get pgrs` shows the printer columns with real values.
    let table = kubectl(bed, &["get", "pgrs", CLUSTER, "-n", &ns_name]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PRIMARY", "READY", "MAX-LAG", "PHASE", "AGE"],
        "{table}"
    );
    let row = lines.next().unwrap_or_default();
    for value in [CLUSTER, primary.as_str(), "3/3", "Healthy"] {
        assert!(row.contains(value), "{value} missing from {table}");
    }
    assert!(
        status.max_lag.is_some(),
        "MAX-LAG known once every standby streams"
    );

    // `-rw` selects exactly the primary's pod IP; `-ro` the two standbys.
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let primary_ip = ips[&primary].clone();
    wait_service_selects_only(
        &client,
        &ns_name,
        "pg-rw",
        &primary_ip,
        "-rw points at the primary",
        Duration::from_secs(30),
        Instant::now(),
    )
    .await;
    let mut replica_ips: Vec<String> = ips
        .iter()
        .filter(|(name, _)| **name != primary)
        .map(|(_, ip)| ip.clone())
        .collect();
    replica_ips.sort();
    eventually(
        "-ro points at the standbys",
        Duration::from_secs(30),
        || async {
            let ro = endpoint_addresses(&client, &ns_name, "pg-ro").await;
            (ro == replica_ips).then_some(()).ok_or(format!("{ro:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Insert through the primary's pod IP, read it on each standby's pod IP.
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let db = connect(&primary_ip, &password)
        .await
        .expect("connect to the primary");
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, note text); INSERT INTO t VALUES (1, 'hello')",
    )
    .await
    .expect("write on the primary");
    for replica_ip in &replica_ips {
        eventually(
            "the row reaches the standby",
            Duration::from_secs(30),
            || async {
                let replica = connect(replica_ip, &password).await?;
                let row = replica
                    .query_opt("SELECT note FROM t WHERE id = 1", &[])
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no row yet")?;
                let note: String = row.get(0);
                (note == "hello").then_some(()).ok_or(note)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e} on {replica_ip}"));
        let replica = connect(replica_ip, &password).await.expect("connect");
        let refused = replica
            .batch_execute("INSERT INTO t VALUES (2, 'no')")
            .await;
        assert!(refused.is_err(), "a standby must refuse writes");
    }

    // Failover: delete the primary pod under a write load.
    let writer = WriteLoad::start(
        client.clone(),
        ns_name.clone(),
        CLUSTER,
        password.clone(),
        1000,
        "INSERT INTO t (id, note) VALUES ($1, 'load')",
    );
    writer.wait_writes_flow().await;
    let deleted_at = Instant::now();
    let deleted_wall = k8s_openapi::jiff::Timestamp::now();
    let watched = operator_report::watch_failover(
        client.clone(),
        &ns_name,
        CLUSTER,
        &primary,
        deleted_at,
        Duration::from_secs(60),
    );
    kubectl(
        bed,
        &["delete", "pod", &primary, "-n", &ns_name, "--wait=false"],
    );

    let (new_primary_name, rw_switched) = eventually(
        "-rw moves to another pod",
        Duration::from_secs(60),
        || async {
            let rw = endpoint_addresses(&client, &ns_name, "pg-rw").await;
            let ips = pod_ips(&client, &ns_name, CLUSTER).await;
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
    assert_ne!(new_primary_name, primary);

    let (status, current) =
        wait_healthy(&client, &ns_name, "Healthy again after the failover").await;
    let recovered = deleted_at.elapsed();
    assert_eq!(current, new_primary_name);
    let record = status.last_failover.clone().expect("status.lastFailover");
    assert_eq!(record.from.as_deref(), Some(primary.as_str()));
    assert_eq!(record.to, current);
    // The operator names the pod's deletion when it saw the pod go before the agent's answers
    // stopped; otherwise it reports the primary unreachable. Either is a failover of `primary`.
    assert!(
        ["PrimaryPodDeleted", "PrimaryUnreachable"].contains(&record.reason.as_str()),
        "{}",
        record.reason
    );
    assert!(record.detected_at.is_some() && record.fenced_at.is_some());
    assert!(record.promoted_at.is_some() && record.service_switched_at.is_some());
    // The deleted pod came back and streams from the new primary (Healthy needs 2 standbys).
    let old = status
        .instances
        .iter()
        .find(|i| i.name == primary)
        .expect("the old primary is listed");
    assert_eq!(old.role, InstanceRole::Replica);

    // Let writes land on the new primary, then check nothing acknowledged was lost.
    let new_ip = pod_ips(&client, &ns_name, CLUSTER).await[&current].clone();
    writer.wait_writes_resume_on(&new_ip).await;
    let acked = writer.finish().await;
    let ack_instants: Vec<Instant> = acked.iter().map(|(_, _, at)| *at).collect();
    let first_on_new = acked
        .iter()
        .find(|(_, host, _)| *host == new_ip)
        .map(|(_, _, at)| at.duration_since(deleted_at));
    let db = connect(&new_ip, &password)
        .await
        .expect("connect to the new primary");
    let ids: Vec<i64> = acked.iter().map(|(id, _, _)| *id).collect();
    let rows = db
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&ids])
        .await
        .expect("read back");
    assert_eq!(
        rows.len(),
        ids.len(),
        "every acknowledged write survives the failover"
    );

    eprintln!(
        "operator failover (pod deleted, default 8 s lease): -rw switched after {} ms, first write on the new primary after {} ms, Healthy with the old pod rejoined after {} ms; {} writes acknowledged",
        rw_switched.as_millis(),
        first_on_new.map_or(0, |d| d.as_millis()),
        recovered.as_millis(),
        ids.len()
    );
    // The measured timings, for the failover report (docs/kubernetes.md).
    let report = serde_json::json!({
        "scenario": "operator: primary pod deleted under a write load",
        "lease_duration_ms": 8000,
        "rw_switched_ms": rw_switched.as_millis() as u64,
        "first_write_on_new_primary_ms": first_on_new.map(|d| d.as_millis() as u64),
        "healthy_with_old_pod_rejoined_ms": recovered.as_millis() as u64,
        "acknowledged_writes": ids.len(),
        "acknowledged_writes_lost": 0,
    });
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator-failover.json");
    std::fs::write(&path, format!("{report:#}\n")).expect("write the failover report");
    eprintln!("failover report: {}", path.display());
    let watched = watched.await.expect("the status watcher");
    operator_report::Report {
        test: "basic",
        scenario: "primary pod deleted (`kubectl delete pod`) under a write load",
        lease_seconds: 8,
        steps: vec![
            operator_report::Step::detected(watched.detected),
            operator_report::Step::promoted(watched.promoted),
            operator_report::Step {
                name: "service switched",
                after: Some(rw_switched),
                how: "`-rw` EndpointSlice holds only the new primary's IP",
            },
            operator_report::Step {
                name: "first write on the new primary",
                after: first_on_new,
                how: "first acknowledged INSERT through `-rw` on the new primary",
            },
            operator_report::Step {
                name: "old primary rejoined",
                after: Some(recovered),
                how: "Healthy, the recreated pod a ready replica",
            },
        ],
        write_unavailable: operator_report::longest_gap(&ack_instants, deleted_at),
        write_how: "longest gap between acknowledged writes through `-rw`",
        record: status.last_failover.clone(),
        fault_at: deleted_wall,
        notes: vec![format!(
            "{} writes acknowledged, none lost: the deleted pod's agent stops postgres cleanly \
             (its last WAL reaches the standbys) and releases the Lease, so no Lease expiry is \
             waited for; the fenced step is that clean stop.",
            ids.len()
        )],
    }
    .write();
    if std::env::var("PGRS_TEST_OPERATOR_LOG").is_ok() {
        eprintln!("{}", operator.log());
    }
    drop(operator);
}
