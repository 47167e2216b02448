//! A planned switchover on the test bed: `kubectl annotate pgrs pg pgrs.dev/switchover-to=POD`
//! moves the primary role to that standby without waiting for a Lease expiry, `-rw` follows,
//! the former primary rejoins as a standby, and the annotation is removed once read.
//!
//! Repeated `PGRS_SWITCHOVER_ROUNDS` times (default 2; 5 or more for the figures of
//! `docs/failover.md`) under a write load through `-rw`; every round's steps (from the
//! operator's log and the test's own watches) go to
//! `target/pgrs-reports/operator-failover-switchover.md` as p50/max.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

#[path = "operator_switchover/clients.rs"]
mod clients;
mod operator_report;
mod operator_support;

use std::time::{Duration, Instant};

use clients::{AppWriter, RwWatch, app_secret, login};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use operator_report::{RoundStep, RoundsReport, log_step};
use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSet, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

fn rounds() -> usize {
    std::env::var("PGRS_SWITCHOVER_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2)
        .max(1)
}

fn deletion_rounds() -> usize {
    std::env::var("PGRS_POD_DELETION_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
}

/// The annotation, written through the API (no `kubectl` start-up in the measured time).
async fn annotate_switchover(client: &Client, ns: &str, target: &str) {
    let api: Api<PgReplicaSet> = Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({
        "metadata": { "annotations": { "pgrs.dev/switchover-to": target } }
    });
    api.patch(CLUSTER, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .expect("annotate the cluster");
}

/// Healthy on `target`, with `old` back as a ready replica.
async fn wait_switched(client: &Client, ns: &str, old: &str, target: &str) {
    let status = eventually(
        "Healthy on the target",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(client, ns, CLUSTER).await?;
            let former = listed_instance(&status, old)?;
            match (
                &status.phase,
                &status.current_primary,
                former.role,
                former.ready,
                status.ready.as_deref(),
            ) {
                (Some(Phase::Healthy), Some(current), InstanceRole::Replica, true, Some("3/3"))
                    if *current == target =>
                {
                    Ok(status.clone())
                }
                _ => Err(format!(
                    "{:?} {:?} {former:?}",
                    status.phase, status.current_primary
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let record = status.last_failover.expect("status.lastFailover");
    assert_eq!(record.reason, "Switchover");
    assert_eq!(record.from.as_deref(), Some(old));
    assert_eq!(record.to, target);
}

/// When the reconcile that took the request in started, from its `chained reconcile` line
/// (logged at its end with its duration), after `since`.
fn reconcile_started(log: &str, since: Timestamp) -> Option<Duration> {
    log.lines().find_map(|line| {
        let at: Timestamp = line.split_whitespace().next()?.parse().ok()?;
        if at < since || !line.contains("chained reconcile") {
            return None;
        }
        let total: i64 = line
            .split("total_ms=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let start = at
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_millis(total))
            .ok()?;
        Duration::try_from(start.duration_since(since)).ok()
    })
}

/// The operator-side steps of a pod deletion (`{target}`: the new primary, `{old}`: the
/// deleted one).
const DELETION_LOG_STEPS: &[(&str, &str, &[&str])] = &[
    (
        "Lease taken for the new primary",
        "operator log `lease acquired` for the new primary",
        &["lease acquired", "holder=\"{target}\""],
    ),
    (
        "promote sent",
        "operator log `action=Promote`",
        &["action=Promote", "{target}"],
    ),
    (
        "role label patched",
        "operator log `pod relabelled` (new primary, role primary)",
        &["pod relabelled", "pod=\"{target}\"", "role=\"primary\""],
    ),
];

/// The operator-side steps: (name, how, the log line's needles; `{target}` is replaced).
const LOG_STEPS: &[(&str, &str, &[&str])] = &[
    (
        "annotation read",
        "operator log `switchover requested` (the round that read it)",
        &["switchover requested"],
    ),
    (
        "demote sent",
        "operator log `action=Demote`",
        &["action=Demote"],
    ),
    (
        "checkpoint done",
        "operator log `checkpoint before demotion`",
        &["checkpoint before demotion"],
    ),
    (
        "old primary stopped, Lease released",
        "operator log `lease released`",
        &["lease released"],
    ),
    (
        "Lease taken for the target",
        "operator log `lease acquired` for the target",
        &["lease acquired", "holder=\"{target}\""],
    ),
    (
        "promote sent",
        "operator log `action=Promote`",
        &["action=Promote"],
    ),
    (
        "new primary seen",
        "operator log Event `SwitchoverCompleted` (a status poll showed it primary)",
        &["reason=SwitchoverCompleted"],
    ),
    (
        "role label patched",
        "operator log `pod relabelled` (target, role primary)",
        &["pod relabelled", "pod=\"{target}\"", "role=\"primary\""],
    ),
    (
        "promote answered",
        "operator log `action completed` promote",
        &["action completed", "kind=\"promote\""],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotating_a_standby_switches_the_primary_over_to_it() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-switch").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let mut primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let app = app_secret(&client, &ns_name).await;
    // The primary may still be finishing its bootstrap (roles, passwords): retried.
    eventually("create the table", Duration::from_secs(60), || async {
        login(&ips[&primary], &app)
            .await?
            .batch_execute("CREATE TABLE IF NOT EXISTS t (id bigint PRIMARY KEY)")
            .await
            .map_err(|e| format!("{e:?}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let writes = AppWriter::start(client.clone(), ns_name.clone(), app.clone());
    writes.wait_writes_flow().await;
    let rw = RwWatch::start(client.clone(), ns_name.clone());

    let rounds = rounds();
    let mut log_rounds: Vec<Vec<Option<Duration>>> = vec![Vec::new(); LOG_STEPS.len()];
    let (mut rw_rounds, mut write_rounds) = (Vec::new(), Vec::new());
    let mut started_rounds = Vec::new();
    let mut load = Vec::new();
    for round in 0..rounds {
        // Each standby in turn; the first round picks the lower-numbered one.
        let target = ["pg-0", "pg-1", "pg-2"]
            .into_iter()
            .filter(|name| *name != primary)
            .nth(round % 2)
            .expect("a standby")
            .to_string();
        let target_ip = ips[&target].clone();
        // Settle: the previous round's Events and rejoins are over.
        tokio::time::sleep(Duration::from_secs(1)).await;
        load.push(operator_report::load_average());
        let requested_wall = Timestamp::now();
        let requested_at = Instant::now();
        annotate_switchover(&client, &ns_name, &target).await;
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
        wait_switched(&client, &ns_name, &primary, &target).await;
        let first_write = eventually(
            "a write acknowledged by the new primary",
            Duration::from_secs(30),
            || async {
                writes
                    .acked()
                    .iter()
                    .find(|(_, address, at)| *address == target_ip && *at >= requested_at)
                    .map(|(_, _, at)| at.duration_since(requested_at))
                    .ok_or_else(|| "none yet".to_string())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let log = operator.log();
        for (i, (_, _, needles)) in LOG_STEPS.iter().enumerate() {
            let needles: Vec<String> = needles
                .iter()
                .map(|n| n.replace("{target}", &target))
                .collect();
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            log_rounds[i].push(log_step(&log, requested_wall, None, &needles));
        }
        started_rounds.push(reconcile_started(&log, requested_wall));
        rw_rounds.push(Some(
            rw.selects_only(&target_ip, requested_at)
                .unwrap_or(switched),
        ));
        write_rounds.push(Some(first_write));
        eprintln!(
            "round {}: switchover {primary} -> {target}: -rw switched after {} ms, first write on {target} after {} ms",
            round + 1,
            switched.as_millis(),
            first_write.as_millis()
        );
        primary = target;
    }

    // Primary pod deletions (`kubectl delete pod` through the API, the pod's grace period):
    // the agent stops postgres and releases the Lease, the operator promotes another standby.
    let deletions = deletion_rounds();
    let mut deletion_log: Vec<Vec<Option<Duration>>> = vec![Vec::new(); DELETION_LOG_STEPS.len()];
    let (mut deletion_rw, mut deletion_write) = (Vec::new(), Vec::new());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    for round in 0..deletions {
        let ips = pod_ips(&client, &ns_name, CLUSTER).await;
        let old_ip = ips[&primary].clone();
        tokio::time::sleep(Duration::from_secs(1)).await;
        load.push(operator_report::load_average());
        let deleted_wall = Timestamp::now();
        let deleted_at = Instant::now();
        pods.delete(&primary, &DeleteParams::default())
            .await
            .expect("delete the primary pod");
        let first_write = eventually(
            "a write acknowledged by another pod",
            Duration::from_secs(60),
            || async {
                writes
                    .acked()
                    .iter()
                    .find(|(_, address, at)| *address != old_ip && *at >= deleted_at)
                    .map(|(_, address, at)| (address.clone(), at.duration_since(deleted_at)))
                    .ok_or_else(|| "none yet".to_string())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let new_primary = wait_three_ready_healthy(
            &client,
            &ns_name,
            CLUSTER,
            "Healthy with the deleted pod back",
        )
        .await;
        assert_ne!(new_primary, primary, "another pod is primary");
        assert_eq!(
            pod_ips(&client, &ns_name, CLUSTER).await.get(&new_primary),
            Some(&first_write.0),
            "the first write after the deletion was acknowledged by the new primary"
        );
        let log = operator.log();
        for (i, (_, _, needles)) in DELETION_LOG_STEPS.iter().enumerate() {
            let needles: Vec<String> = needles
                .iter()
                .map(|n| {
                    n.replace("{target}", &new_primary)
                        .replace("{old}", &primary)
                })
                .collect();
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            deletion_log[i].push(log_step(&log, deleted_wall, None, &needles));
        }
        deletion_rw.push(rw.selects_other(&old_ip, deleted_at).map(|(at, _)| at));
        deletion_write.push(Some(first_write.1));
        eprintln!(
            "deletion {}: primary pod {primary} deleted, first write on {new_primary} after {} ms",
            round + 1,
            first_write.1.as_millis()
        );
        primary = new_primary;
    }

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
    // No write was lost across the switchovers: every acknowledged id is on the last primary.
    let acked = writes.finish().await;
    let db = login(&pod_ips(&client, &ns_name, CLUSTER).await[&primary], &app)
        .await
        .expect("log in on the last primary");
    let missing: Vec<i64> = {
        let rows = db
            .query("SELECT id FROM t", &[])
            .await
            .expect("read the table");
        let present: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        acked
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| !present.contains(id))
            .collect()
    };
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");

    let mut steps = vec![RoundStep {
        name: "reconcile started",
        how: "operator log `chained reconcile` (its time minus its `total_ms`)",
        rounds: started_rounds,
    }];
    steps.extend(
        LOG_STEPS
            .iter()
            .zip(log_rounds)
            .map(|((name, how, _), rounds)| RoundStep { name, how, rounds }),
    );
    steps.push(RoundStep {
        name: "-rw selects only the target",
        how: "the test's LIST of the `pg-rw` EndpointSlices every 10 ms (controller-manager's update)",
        rounds: rw_rounds,
    });
    steps.push(RoundStep {
        name: "first write acknowledged by the target",
        how: "a writer through `-rw` (EndpointSlice address, reconnect every 20 ms on failure)",
        rounds: write_rounds,
    });
    let goal = operator_report::p50_max(&steps.last().expect("a step").rounds);
    RoundsReport {
        test: "switchover",
        scenario: "planned switchover (`pgrs.dev/switchover-to` annotation) under a write load",
        lease_seconds: 8,
        steps,
        notes: vec![
            format!(
                "Load average (1, 5, 15 min) before each round: {}. {} writes acknowledged, none lost. \
                 Goal: the first write on the new primary ≤ 700 ms after the request (p50 and max): {}.",
                load.join("; "),
                acked.len(),
                match goal {
                    Some((p50, max)) if max <= Duration::from_millis(700) =>
                        format!("met (p50 {} ms, max {} ms)", p50.as_millis(), max.as_millis()),
                    Some((p50, max)) =>
                        format!("not met (p50 {} ms, max {} ms)", p50.as_millis(), max.as_millis()),
                    None => "not measured".to_string(),
                }
            ),
            "Command: `PGRS_SWITCHOVER_ROUNDS=5 cargo test --test operator_switchover -- --nocapture`."
                .to_string(),
        ],
    }
    .write();
    // The operator learnt of the promotions from the agents' long polls (status answered on
    // the change, not on its next poll).
    assert!(
        operator
            .log()
            .lines()
            .any(|l| l.contains("promotion watched") && l.contains("role=Primary")),
        "no promotion was seen through a status long poll"
    );
    // The operator's log next to the reports, for the breakdown in docs/failover.md.
    let reports = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../pgrs-reports");
    let _ = std::fs::create_dir_all(&reports);
    let _ = std::fs::write(reports.join("operator-switchover.log"), operator.log());
    if deletions > 0 {
        let mut steps: Vec<RoundStep> = DELETION_LOG_STEPS
            .iter()
            .zip(deletion_log)
            .map(|((name, how, _), rounds)| RoundStep { name, how, rounds })
            .collect();
        steps.push(RoundStep {
            name: "-rw selects only the new primary",
            how: "the test's LIST of the `pg-rw` EndpointSlices every 10 ms",
            rounds: deletion_rw,
        });
        steps.push(RoundStep {
            name: "first write acknowledged by the new primary",
            how: "the same writer through `-rw`",
            rounds: deletion_write,
        });
        let goal = operator_report::p50_max(&steps.last().expect("a step").rounds);
        RoundsReport {
            test: "pod-deletion",
            scenario: "primary pod deleted (API delete, default grace period) under a write load",
            lease_seconds: 8,
            steps,
            notes: vec![
                format!(
                    "Goal: the first write on the new primary ≤ 1500 ms after the deletion (p50 \
                     and max): {}. Load averages are in `operator-failover-switchover.md`.",
                    match goal {
                        Some((p50, max)) if max <= Duration::from_millis(1500) => format!(
                            "met (p50 {} ms, max {} ms)",
                            p50.as_millis(),
                            max.as_millis()
                        ),
                        Some((p50, max)) => format!(
                            "not met (p50 {} ms, max {} ms)",
                            p50.as_millis(),
                            max.as_millis()
                        ),
                        None => "not measured".to_string(),
                    }
                ),
                "Command: `PGRS_SWITCHOVER_ROUNDS=5 PGRS_POD_DELETION_ROUNDS=5 cargo test --test \
                 operator_switchover -- --nocapture`."
                    .to_string(),
            ],
        }
        .write();
    }
    drop(operator);
}
