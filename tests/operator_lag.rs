//! Lag alerts on the test bed: a standby whose replay is paused (`pg_wal_replay_pause()`) while
//! the primary keeps writing falls behind by more than `monitoring.lagAlertSeconds`; the
//! operator raises the `LagHigh` condition naming it and a `LagHigh` Warning Event. Once replay
//! resumes, the condition clears and a `LagRecovered` Event follows. The lagging standby stays a
//! replica (lag alone never triggers a failover).
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";
const LAG_ALERT_SECONDS: u32 = 2;

const MANIFEST: &str = r#"apiVersion: pgrs.dev/v1alpha1
kind: PgReplicaSet
metadata:
  name: pg
spec:
  replicas: 3
  # pg_wal_replay_pause() on the standby needs the superuser.
  enableSuperuserAccess: true
  storage:
    size: 1Gi
  monitoring:
    lagAlertSeconds: 2
    statusIntervalSeconds: 1
"#;

fn lag_high(status: &PgReplicaSetStatus) -> Option<(String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "LagHigh")
        .map(|c| (c.status.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_paused_replay_raises_lag_high_until_it_catches_up() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-lag").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_manifest_text(bed, &ns_name, MANIFEST);
    let primary = eventually(
        "cluster Healthy without lag alert",
        Duration::from_secs(180),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            match (
                &status.phase,
                &status.current_primary,
                status.ready.as_deref(),
                lag_high(&status),
            ) {
                (Some(Phase::Healthy), Some(primary), Some("3/3"), Some((flag, _)))
                    if flag == "False" =>
                {
                    Ok(primary.clone())
                }
                _ => Err(format!(
                    "{:?} {:?} {:?}",
                    status.phase,
                    status.ready,
                    lag_high(&status)
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let mut replicas: Vec<String> = ips.keys().filter(|n| **n != primary).cloned().collect();
    replicas.sort();
    let lagging = replicas[0].clone();
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let primary_db = connect(&ips[&primary], &password)
        .await
        .expect("connect to the primary");
    primary_db
        .batch_execute("CREATE TABLE t (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        .await
        .expect("create a table");
    let superuser = superuser_login(&client, &ns_name, CLUSTER).await;
    let standby_db = connect(&ips[&lagging], &superuser)
        .await
        .expect("connect to the standby");
    standby_db
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");

    // Write on the primary while the standby does not replay.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = primary_db
                    .execute("INSERT INTO t DEFAULT VALUES", &[])
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let raised = eventually(
        "LagHigh names the paused standby",
        Duration::from_secs(90),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            match lag_high(&status) {
                Some((flag, message)) if flag == "True" && message.contains(&lagging) => Ok(status),
                other => Err(format!(
                    "{other:?}; lags: {:?}",
                    status
                        .instances
                        .iter()
                        .map(|i| (&i.name, i.lag_seconds, i.lag_bytes))
                        .collect::<Vec<_>>()
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let shown = raised
        .instances
        .iter()
        .find(|i| i.name == lagging)
        .expect("listed");
    assert!(
        shown
            .lag_seconds
            .is_some_and(|s| s > f64::from(LAG_ALERT_SECONDS)),
        "{shown:?}"
    );
    assert_eq!(shown.role, InstanceRole::Replica);
    wait_event(bed, &ns_name, "LagHigh", &lagging).await;

    // Resume: the standby catches up, the condition clears, an Event says so.
    standby_db
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    eventually(
        "LagHigh clears after the standby caught up",
        Duration::from_secs(90),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            match lag_high(&status) {
                Some((flag, _)) if flag == "False" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    wait_event(bed, &ns_name, "LagRecovered", &lagging).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let status = cluster_status(&client, &ns_name, CLUSTER)
        .await
        .expect("status");
    assert_eq!(status.current_primary.as_deref(), Some(primary.as_str()));
    drop(operator);
}
