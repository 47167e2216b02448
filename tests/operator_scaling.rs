//! Scaling on the test bed: 3 → 4 instances (the new pod clones from the primary and
//! streams); 4 → 3 (the standby pg-3 goes and the operator drops its replication slot on the
//! primary); then, with the primary moved to the highest ordinal, 3 → 2: the operator switches
//! the primary over to an instance that stays before the StatefulSet removes its pod. The
//! status, `kubectl get pgrs` READY and the data follow.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::time::{Duration, Instant};

use kube::Client;
use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

/// Healthy with exactly `names` as instances, all ready, for the current generation.
async fn wait_instances(client: &Client, ns: &str, names: &[&str]) -> PgReplicaSetStatus {
    let ready = format!("{}/{}", names.len(), names.len());
    eventually(
        &format!("Healthy with {names:?}"),
        Duration::from_secs(300),
        || async {
            let resource = cluster(client, ns, CLUSTER).await?;
            let generation = resource.metadata.generation;
            let status = resource.status.ok_or("no status yet")?;
            let listed: Vec<&str> = status.instances.iter().map(|i| i.name.as_str()).collect();
            let all_ready = status.instances.iter().all(|i| i.ready);
            if status.phase == Some(Phase::Healthy)
                && status.observed_generation == generation
                && status.ready.as_deref() == Some(ready.as_str())
                && listed == names
                && all_ready
            {
                Ok(status)
            } else {
                Err(format!(
                    "{:?} {:?} {:?}",
                    status.phase, status.ready, status.instances
                ))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn scale(bed: &pgrs_testbed::TestBed, ns: &str, replicas: u32) {
    merge_patch_spec(bed, ns, CLUSTER, &format!("{{\"replicas\":{replicas}}}"));
}

/// The READY column of `kubectl get pgrs`.
fn ready_column(bed: &pgrs_testbed::TestBed, ns: &str) -> String {
    let table = kubectl(bed, &["get", "pgrs", CLUSTER, "-n", ns]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "READY")
        .unwrap_or_else(|| panic!("no READY column: {table}"));
    row.get(column).map(|v| v.to_string()).unwrap_or_default()
}

/// Waits until the cluster's pods are exactly `names`.
async fn pods_left(client: &Client, ns: &str, names: &[&str]) {
    eventually(
        &format!("only pods {names:?}"),
        Duration::from_secs(120),
        || async {
            let ips = pod_ips(client, ns, CLUSTER).await;
            let left: Vec<&str> = ips.keys().map(String::as_str).collect();
            (left == names).then_some(()).ok_or(format!("{left:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until none of `slots` exists on the primary at `ip`.
async fn slots_dropped(ip: &str, password: &Login, slots: &[&str]) {
    eventually(
        &format!("slots {slots:?} dropped"),
        Duration::from_secs(120),
        || async {
            let db = connect(ip, password).await?;
            let rows = db
                .query(
                    "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            let stale = present.iter().any(|p| slots.contains(&p.as_str()));
            (!stale).then_some(()).ok_or(format!("{present:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn rows(ip: &str, password: &Login) -> Result<Vec<i32>, String> {
    let db = connect(ip, password).await?;
    let rows = db
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_clones_and_scaling_down_moves_the_primary_first() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-scale").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let status = wait_instances(&client, &ns_name, &["pg-0", "pg-1", "pg-2"]).await;
    let primary = status.current_primary.clone().expect("a primary");
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    connect(&ips[&primary], &password)
        .await
        .expect("connect to the primary")
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .expect("write before scaling");

    // Up: the new instance clones and streams.
    let up_requested = Instant::now();
    scale(bed, &ns_name, 4);
    wait_instances(&client, &ns_name, &["pg-0", "pg-1", "pg-2", "pg-3"]).await;
    let up_took = up_requested.elapsed();
    assert_eq!(ready_column(bed, &ns_name), "4/4");
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let new_ip = ips["pg-3"].clone();
    eventually("pg-3 has the data", Duration::from_secs(60), || async {
        let ids = rows(&new_ip, &password).await?;
        (ids == [1]).then_some(()).ok_or(format!("{ids:?}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // 4 → 3 with the primary staying: the standby pg-3 goes, and its slot on the primary.
    assert_ne!(primary, "pg-3", "the first primary is pg-0");
    scale(bed, &ns_name, 3);
    wait_instances(&client, &ns_name, &["pg-0", "pg-1", "pg-2"]).await;
    assert_eq!(ready_column(bed, &ns_name), "3/3");
    pods_left(&client, &ns_name, &["pg-0", "pg-1", "pg-2"]).await;
    let primary_ip = ips[&primary].clone();
    slots_dropped(&primary_ip, &password, &["pgrs_pg_3"]).await;

    // The highest ordinal becomes the primary, so that the scale-down must move it first.
    request_switchover(bed, &ns_name, CLUSTER, "pg-2");
    eventually("pg-2 is the primary", Duration::from_secs(120), || async {
        let status = cluster_status(&client, &ns_name, CLUSTER).await?;
        let all_ready = status.instances.iter().all(|i| i.ready);
        (status.current_primary.as_deref() == Some("pg-2")
            && status.phase == Some(Phase::Healthy)
            && all_ready)
            .then_some(())
            .ok_or(format!("{:?} {:?}", status.current_primary, status.phase))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    connect(&ips["pg-2"], &password)
        .await
        .expect("connect to pg-2")
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("write on pg-2");

    // Down to 2: pg-2 hands the primary role to pg-0 or pg-1 before its pod goes.
    let down_requested = Instant::now();
    scale(bed, &ns_name, 2);
    let status = wait_instances(&client, &ns_name, &["pg-0", "pg-1"]).await;
    let down_took = down_requested.elapsed();
    assert_eq!(ready_column(bed, &ns_name), "2/2");
    let primary = status.current_primary.clone().expect("a primary");
    assert!(
        ["pg-0", "pg-1"].contains(&primary.as_str()),
        "primary {primary}"
    );
    let record = status.last_failover.clone().expect("status.lastFailover");
    assert_eq!(record.reason, "Switchover", "{record:?}");
    assert_eq!(record.from.as_deref(), Some("pg-2"));
    let replica = status
        .instances
        .iter()
        .find(|i| i.role == InstanceRole::Replica)
        .expect("a replica")
        .name
        .clone();
    pods_left(&client, &ns_name, &["pg-0", "pg-1"]).await;

    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let replica_ip = ips[&replica].clone();
    eventually(
        "the remaining replica has every row",
        Duration::from_secs(60),
        || async {
            let ids = rows(&replica_ip, &password).await?;
            (ids == [1, 2]).then_some(()).ok_or(format!("{ids:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let primary_ip = ips[&primary].clone();
    slots_dropped(&primary_ip, &password, &["pgrs_pg_2", "pgrs_pg_3"]).await;
    // Writes go on after the scale-down.
    connect(&primary_ip, &password)
        .await
        .expect("connect to the primary")
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .expect("write after scaling down");

    let events = event_reasons(bed, &ns_name);
    // pg-3's slot on the primary existed (it streamed through it) until the operator dropped
    // it after the pod was gone.
    for reason in ["ScaleDownSwitchover", "ReplicationSlotDropped"] {
        assert!(
            events.lines().any(|l| l == reason),
            "no {reason} event: {events}"
        );
    }
    eprintln!(
        "operator scaling: 3 -> 4 Healthy in {} ms; 3 -> 2 (primary on pg-2) Healthy in {} ms",
        up_took.as_millis(),
        down_took.as_millis()
    );
    drop(operator);
}
