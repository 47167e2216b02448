//! A major-version upgrade on the test bed: `spec.postgresVersion` raised from 15 to 17 on a
//! running 3-instance cluster under a write load.
//!
//! 1. A `regproc` column makes `pg_upgrade --check` refuse: the status says why
//!    (`majorUpgrade.phase: Failed`, the column named), the cluster serves again on 15, nothing
//!    is lost and nothing retries by itself.
//! 2. The column dropped and the retry annotation set: the primary is upgraded with pg_upgrade,
//!    the replicas are cloned from it, every instance answers on 17, every acknowledged write is
//!    there, and the write downtime is reported.
//! 3. A synchronous cluster on 17 raised to 18: the same checks, no acknowledged write lost.
//!
//! The pods' images are `…-pg17` for 17: on the test bed their PostgreSQL is the cache of
//! `scripts/install-pg-majors 17`. Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use operator_support::*;
use pgrs::api::{MajorUpgradePhase, PgReplicaSetStatus, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";
const MANIFEST: &str = "apiVersion: pgrs.dev/v1alpha1
kind: PgReplicaSet
metadata:
  name: pg
spec:
  postgresVersion: 15
  replicas: 3
  storage:
    size: 1Gi
";
const SYNC_MANIFEST: &str = "apiVersion: pgrs.dev/v1alpha1
kind: PgReplicaSet
metadata:
  name: pg
spec:
  postgresVersion: 17
  replicas: 3
  replication:
    mode: sync
    syncReplicas: 1
  storage:
    size: 1Gi
";

async fn server_major(host: &str, password: &Login) -> Result<u32, String> {
    let db = connect(host, password).await?;
    let row = db
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get::<_, i32>(0) as u32 / 10_000)
}

async fn wait_upgrade(
    client: &kube::Client,
    ns: &str,
    phase: MajorUpgradePhase,
    wait: Duration,
) -> PgReplicaSetStatus {
    eventually(&format!("majorUpgrade {phase:?}"), wait, || async {
        let status = cluster_status(client, ns, CLUSTER).await?;
        let upgrade = status.major_upgrade.clone();
        match (&upgrade, &status.phase) {
            (Some(u), Some(Phase::Healthy)) if u.phase == phase => Ok(status),
            _ => Err(format!(
                "phase {:?}, upgrade {:?}, running {:?}",
                status.phase, upgrade, status.postgres_version
            )),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `writer` has 10 more acknowledged writes than `before` (up to 60 s).
async fn wait_more_writes(writer: &WriteLoad, before: usize, what: &str) {
    eventually(what, Duration::from_secs(60), || async {
        let count = writer.acked().await.len();
        (count >= before + 10)
            .then_some(())
            .ok_or(format!("{count} acknowledged, {before} before"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The longest gap between two consecutive acknowledged writes after `since`.
fn longest_gap(acked: &[AckedWrite], since: Instant) -> Duration {
    acked
        .windows(2)
        .filter(|w| w[1].2 > since)
        .map(|w| w[1].2.duration_since(w[0].2))
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_postgres_version_upgrades_the_cluster_and_a_refused_check_changes_nothing() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-upgrade").await;
    let operator = OperatorProcess::start(bed, &ns_name);
    apply_manifest_text(bed, &ns_name, MANIFEST);
    let primary = wait_three_ready_healthy(&client, &ns_name, CLUSTER, "cluster on 15").await;
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let db = connect(&ips[&primary], &password).await.expect("connect");
    db.batch_execute(
        "CREATE TABLE data AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g;
         CREATE TABLE blocker (f regproc);",
    )
    .await
    .expect("create data and a blocker of pg_upgrade");
    drop(db);
    let writer =
        WriteLoad::start_on_new_table(&client, &ns_name, CLUSTER, &ips[&primary], &password).await;

    // 1. pg_upgrade --check refuses: the cluster stays on 15 and says why.
    merge_patch_spec(bed, &ns_name, CLUSTER, r#"{"postgresVersion":17}"#);
    let failed = wait_upgrade(
        &client,
        &ns_name,
        MajorUpgradePhase::Failed,
        Duration::from_secs(240),
    )
    .await;
    let upgrade = failed.major_upgrade.clone().expect("majorUpgrade");
    let message = upgrade.message.clone().unwrap_or_default();
    assert!(
        message.contains("--check refused") && message.contains("blocker"),
        "the status names the cause: {message}"
    );
    assert_eq!(failed.postgres_version, Some(15));
    let before = writer.acked().await.len();
    wait_more_writes(
        &writer,
        before,
        "writes resume on 15 after the refused check",
    )
    .await;
    let current = failed.current_primary.clone().expect("a primary");
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    assert_eq!(server_major(&ips[&current], &password).await, Ok(15));

    // 2. The cause removed, the retry annotation: the upgrade goes through.
    let db = connect(&ips[&current], &password).await.expect("connect");
    db.batch_execute("DROP TABLE blocker").await.expect("drop");
    drop(db);
    let retried_at = Instant::now();
    kubectl(
        bed,
        &[
            "annotate",
            "pgrs",
            CLUSTER,
            "-n",
            &ns_name,
            "pgrs.dev/retry-upgrade=1",
        ],
    );
    verify_upgrade(&client, &ns_name, &password, writer, retried_at, 15, 17).await;
    drop(operator);
}

/// Waits for the upgrade to `to` to complete, then checks every instance runs `to`, every row
/// and every acknowledged write is there, and both replicas are ready; prints the figures.
async fn verify_upgrade(
    client: &kube::Client,
    ns_name: &str,
    password: &Login,
    writer: WriteLoad,
    upgrade_asked: Instant,
    from: u32,
    to: u32,
) {
    let client = client.clone();
    let ns_name = ns_name.to_string();
    let password = password.clone();
    let done = wait_upgrade(
        &client,
        &ns_name,
        MajorUpgradePhase::Completed,
        Duration::from_secs(300),
    )
    .await;
    let upgraded_in = upgrade_asked.elapsed();
    assert_eq!(done.postgres_version, Some(to));
    let before = writer.acked().await.len();
    wait_more_writes(&writer, before, "writes resume on the new major").await;
    let acked = writer.finish().await;
    let downtime = longest_gap(&acked, upgrade_asked);

    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    for (pod, ip) in &ips {
        let major = eventually("every instance answers", Duration::from_secs(60), || {
            server_major(ip, &password)
        })
        .await
        .unwrap_or_else(|e| panic!("{pod}: {e}"));
        assert_eq!(major, to, "{pod} runs PostgreSQL {to}");
    }
    let primary = done.current_primary.clone().expect("a primary");
    let db = connect(&ips[&primary], &password).await.expect("connect");
    let rows: i64 = db
        .query_one("SELECT count(*) FROM data", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 20000, "every row of the data table");
    let present: BTreeSet<i64> = db
        .query("SELECT id FROM t", &[])
        .await
        .expect("read t")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<i64> = acked
        .iter()
        .map(|(id, _, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let streaming = done
        .instances
        .iter()
        .filter(|i| i.name != primary)
        .filter(|i| i.ready)
        .count();
    assert_eq!(streaming, 2, "both replicas ready: {:?}", done.instances);
    let upgrade = done.major_upgrade.expect("majorUpgrade");
    eprintln!(
        "operator upgrade {from} -> {to} (20000 rows): write downtime {:.1} s, completed after {:.1} s, {} writes acknowledged, 0 lost; started {:?} primary upgraded {:?} finished {:?}",
        downtime.as_secs_f64(),
        upgraded_in.as_secs_f64(),
        acked.len(),
        upgrade.started_at,
        upgrade.primary_upgraded_at,
        upgrade.finished_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_cluster_is_upgraded_from_17_to_18_without_losing_a_write() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-upgrade-sync").await;
    let operator = OperatorProcess::start(bed, &ns_name);
    apply_manifest_text(bed, &ns_name, SYNC_MANIFEST);
    let primary = wait_three_ready_healthy(&client, &ns_name, CLUSTER, "sync cluster on 17").await;
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    assert_eq!(server_major(&ips[&primary], &password).await, Ok(17));
    let db = connect(&ips[&primary], &password).await.expect("connect");
    db.batch_execute(
        "CREATE TABLE data AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
    )
    .await
    .expect("create data");
    drop(db);
    let writer =
        WriteLoad::start_on_new_table(&client, &ns_name, CLUSTER, &ips[&primary], &password).await;
    let asked = Instant::now();
    merge_patch_spec(bed, &ns_name, CLUSTER, r#"{"postgresVersion":18}"#);
    verify_upgrade(&client, &ns_name, &password, writer, asked, 17, 18).await;
    drop(operator);
}
