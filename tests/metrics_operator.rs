//! `/metrics` of the operator on the test bed (real kube-apiserver; pods run as local processes):
//! the exposition is valid (strict parser), its per-instance gauges equal `PgReplicaSet.status`
//! (current primary, roles, timelines, lag present for every streaming standby), reconciles are
//! timed, the primary's Lease renewals are counted, and a switchover (annotation) is counted by reason with the duration `lastFailover`
//! shows.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::time::Duration;

use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase};
use pgrs::metrics::parse::{self, Parsed};
use pgrs_testbed::TestBed;
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

/// The operator with its health/metrics endpoint on a known loopback port.
struct Operator(OperatorProcess);

impl Operator {
    fn start(bed: &TestBed, namespace: &str) -> Operator {
        use rand::Rng as _;
        // Below the ephemeral range, and free now.
        let port = loop {
            let port = rand::rng().random_range(23000..24000u16);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
        Operator(OperatorProcess::start_with(bed, namespace, port, &[]))
    }

    async fn scrape(&self) -> Result<(String, Parsed), String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.0.health_port());
        let text = reqwest::get(&url)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?
            .text()
            .await
            .map_err(|e| format!("read {url}: {e}"))?;
        let parsed = parse::parse(&text).map_err(|e| format!("invalid exposition: {e}\n{text}"))?;
        Ok((text, parsed))
    }
}

/// Every per-instance gauge equals the status.
fn matches_status(ns: &str, status: &PgReplicaSetStatus, parsed: &Parsed) -> Result<(), String> {
    for instance in &status.instances {
        let labels = [
            ("namespace", ns),
            ("cluster", CLUSTER),
            ("instance", instance.name.as_str()),
        ];
        let expect = |name: &str, expected: Option<f64>| {
            let got = parsed.value(name, &labels);
            (got == expected).then_some(()).ok_or(format!(
                "{name} of {}: {got:?}, status {expected:?}",
                instance.name
            ))
        };
        let is_primary = status.current_primary.as_deref() == Some(instance.name.as_str());
        expect(
            "pgrs_instance_is_primary",
            Some(if is_primary { 1.0 } else { 0.0 }),
        )?;
        expect("pgrs_instance_timeline", instance.timeline.map(f64::from))?;
        expect(
            "pgrs_instance_lag_bytes",
            instance.lag_bytes.map(|b| b as f64),
        )?;
        expect("pgrs_instance_lag_seconds", instance.lag_seconds)?;
        expect(
            "pgrs_instance_ready",
            Some(if instance.ready { 1.0 } else { 0.0 }),
        )?;
        let role = format!("{:?}", instance.role).to_lowercase();
        let with_role = [labels[0], labels[1], labels[2], ("role", role.as_str())];
        if parsed.value("pgrs_instance_role", &with_role) != Some(1.0) {
            return Err(format!(
                "pgrs_instance_role of {} is not {role}",
                instance.name
            ));
        }
        if instance.role == InstanceRole::Replica && instance.lag_bytes.is_some() {
            expect("pgrs_instance_wal_receiver_up", Some(1.0))?;
        }
    }
    let cluster_labels = [("namespace", ns), ("cluster", CLUSTER)];
    let phase = format!("{:?}", status.phase.ok_or("no phase")?);
    let with_phase = [
        cluster_labels[0],
        cluster_labels[1],
        ("phase", phase.as_str()),
    ];
    if parsed.value("pgrs_cluster_phase", &with_phase) != Some(1.0) {
        return Err(format!("pgrs_cluster_phase is not {phase}"));
    }
    let has_primary = parsed.value("pgrs_cluster_has_primary", &cluster_labels);
    if has_primary
        != Some(if status.current_primary.is_some() {
            1.0
        } else {
            0.0
        })
    {
        return Err(format!("pgrs_cluster_has_primary {has_primary:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_metrics_are_valid_and_equal_the_status_across_a_switchover() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-metrics").await;
    let operator = Operator::start(bed, &ns_name);

    // Before any cluster: valid, every family announced.
    let (_, parsed) = eventually("/metrics answers", Duration::from_secs(30), || {
        operator.scrape()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for metric in pgrs::metrics::names::ALL {
        assert!(
            parsed.families.contains_key(metric.name),
            "{} missing",
            metric.name
        );
    }

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    // Healthy with two streaming standbys, and a scrape that agrees with the status.
    let check = |expected_primary: Option<String>| {
        let client = client.clone();
        let ns_name = ns_name.clone();
        let operator = &operator;
        async move {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let streaming = status
                .instances
                .iter()
                .filter(|i| i.role == InstanceRole::Replica && i.lag_bytes.is_some())
                .count();
            if status.phase != Some(Phase::Healthy) || streaming != 2 {
                return Err(format!(
                    "{:?}, {streaming} streaming standbys",
                    status.phase
                ));
            }
            let primary = status.current_primary.clone().ok_or("no primary")?;
            if expected_primary.as_ref().is_some_and(|p| *p != primary) {
                return Err(format!("primary {primary}"));
            }
            let (text, parsed) = operator.scrape().await?;
            matches_status(&ns_name, &status, &parsed).map_err(|e| format!("{e}\n{text}"))?;
            Ok((status, parsed))
        }
    };
    let (status, parsed) = eventually(
        "the metrics agree with a Healthy status",
        Duration::from_secs(240),
        || check(None),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let primary = status.current_primary.clone().expect("primary");
    let cluster_labels = [("namespace", ns_name.as_str()), ("cluster", CLUSTER)];
    assert!(
        parsed
            .value("pgrs_reconcile_duration_seconds_count", &cluster_labels)
            .is_some_and(|c| c > 0.0),
        "reconciles are timed"
    );
    let failovers = |parsed: &Parsed| -> f64 {
        parsed
            .find("pgrs_failovers_total", &cluster_labels)
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(failovers(&parsed), 0.0);
    // The primary's agent renews the Lease every second; the operator sees the versions change.
    eventually(
        "the operator counts the primary's Lease renewals",
        Duration::from_secs(60),
        || async {
            let (text, parsed) = operator.scrape().await?;
            let labels = [
                cluster_labels[0],
                cluster_labels[1],
                ("instance", primary.as_str()),
            ];
            let renewals = parsed.value("pgrs_lease_renewals_total", &labels);
            renewals
                .is_some_and(|r| r >= 1.0)
                .then_some(())
                .ok_or(format!("{renewals:?}\n{text}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // A switchover: counted once as `Switchover`, with the duration of `lastFailover`.
    let target = status
        .instances
        .iter()
        .find(|i| i.name != primary)
        .map(|i| i.name.clone())
        .expect("a standby");
    request_switchover(bed, &ns_name, CLUSTER, &target);
    let (status, parsed) = eventually(
        "Healthy on the target, and the metrics agree",
        Duration::from_secs(180),
        || check(Some(target.clone())),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let record = status.last_failover.expect("status.lastFailover");
    assert_eq!(record.reason, "Switchover");
    let switchover_labels = [
        cluster_labels[0],
        cluster_labels[1],
        ("reason", "Switchover"),
    ];
    assert_eq!(
        parsed.value("pgrs_failovers_total", &switchover_labels),
        Some(1.0)
    );
    assert_eq!(failovers(&parsed), 1.0);
    // The status stores whole seconds (Kubernetes `Time`); the operator measured milliseconds.
    let in_status = pgrs::metrics::operator::failover_seconds(&record)
        .expect("lastFailover has detectedAt and promotedAt");
    let measured = parsed
        .value("pgrs_last_failover_duration_seconds", &cluster_labels)
        .expect("pgrs_last_failover_duration_seconds after a switchover");
    assert!(
        (measured - in_status).abs() <= 1.0,
        "/metrics says {measured} s, lastFailover {in_status} s"
    );
    eprintln!("operator switchover {primary} -> {target}: {measured:.3} s by /metrics");
    drop(operator);
}
