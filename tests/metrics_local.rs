//! `/metrics` of a running `pgrs local` cluster (real PostgreSQL): the exposition is valid
//! (strict parser), its gauges equal the status the controller serves at `/v1/cluster` (primary,
//! roles, timelines, lag present for every streaming replica), the primary's lease renewals are
//! counted, and a switchover is counted by reason with its duration.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{Cluster, pgrs};
use pgrs::local::status::LocalStatus;
use pgrs::metrics::parse::{self, Parsed};

async fn scrape(cluster: &Cluster) -> (String, Parsed) {
    let url = format!("http://127.0.0.1:{}/metrics", cluster.port_base + 1);
    let response = reqwest::get(&url).await.expect("GET /metrics");
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("body");
    let parsed = parse::parse(&text).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}"));
    (text, parsed)
}

/// A scrape taken between two identical status snapshots: both describe the same round.
async fn consistent(cluster: &Cluster) -> (LocalStatus, String, Parsed) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = cluster.status().await;
        let (text, parsed) = scrape(cluster).await;
        let after = cluster.status().await;
        if before.updated_at == after.updated_at {
            return (after, text, parsed);
        }
        assert!(
            Instant::now() < deadline,
            "no scrape between two identical rounds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every per-instance gauge equals the status; returns a description of the first mismatch.
fn matches_status(status: &LocalStatus, parsed: &Parsed) -> Result<(), String> {
    let cluster = status.cluster.as_str();
    for node in &status.nodes {
        let labels = [("cluster", cluster), ("instance", node.name.as_str())];
        let value = |name: &str| parsed.value(name, &labels);
        let is_primary = status.primary.as_deref() == Some(node.name.as_str());
        let expect = |name: &str, expected: Option<f64>| {
            let got = value(name);
            (got == expected).then_some(()).ok_or(format!(
                "{name} of {}: {got:?}, status {expected:?}",
                node.name
            ))
        };
        expect(
            "pgrs_instance_is_primary",
            Some(if is_primary { 1.0 } else { 0.0 }),
        )?;
        expect("pgrs_instance_timeline", node.timeline.map(f64::from))?;
        let role = node.role.as_deref().unwrap_or("unknown");
        let with_role = [labels[0], labels[1], ("role", role)];
        if parsed.value("pgrs_instance_role", &with_role) != Some(1.0) {
            return Err(format!("pgrs_instance_role of {} is not {role}", node.name));
        }
        if role == "replica" {
            expect("pgrs_instance_lag_bytes", node.lag_bytes.map(|b| b as f64))?;
            expect("pgrs_instance_lag_seconds", node.lag_seconds)?;
        }
    }
    let has_primary = parsed.value("pgrs_cluster_has_primary", &[("cluster", cluster)]);
    if has_primary != Some(if status.primary.is_some() { 1.0 } else { 0.0 }) {
        return Err(format!("pgrs_cluster_has_primary {has_primary:?}"));
    }
    let phase = format!("{:?}", status.phase);
    if parsed.value("pgrs_cluster_phase", &[("phase", phase.as_str())]) != Some(1.0) {
        return Err(format!("pgrs_cluster_phase is not {phase}"));
    }
    Ok(())
}

/// Waits until every replica streams with a known lag and the scrape agrees with the status.
async fn wait_agreement(cluster: &Cluster, primary: &str) -> (LocalStatus, Parsed) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, text, parsed) = consistent(cluster).await;
        let streaming = status
            .nodes
            .iter()
            .filter(|n| n.role.as_deref() == Some("replica") && n.lag_bytes.is_some())
            .count();
        let verdict = if status.primary.as_deref() != Some(primary) {
            Err(format!("primary {:?}", status.primary))
        } else if streaming != 2 {
            Err(format!("{streaming} replicas with a known lag"))
        } else {
            matches_status(&status, &parsed).and_then(|_| {
                // Replicas stream: their WAL receivers are up.
                status
                    .nodes
                    .iter()
                    .filter(|n| n.role.as_deref() == Some("replica"))
                    .all(|n| {
                        parsed.value(
                            "pgrs_instance_wal_receiver_up",
                            &[("instance", n.name.as_str())],
                        ) == Some(1.0)
                    })
                    .then_some(())
                    .ok_or("a replica's WAL receiver is not up".to_string())
            })
        };
        match verdict {
            Ok(()) => return (status, parsed),
            Err(why) => assert!(
                Instant::now() < deadline,
                "metrics never agreed with the status: {why}\n{text}\n{status:#?}\n{}",
                cluster.controller_log_tail()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_metrics_are_valid_and_equal_the_status_across_a_switchover() {
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(90)).await;
    let first = status.primary.clone().expect("a primary");
    let (status, parsed) = wait_agreement(&cluster, &first).await;
    for metric in pgrs::metrics::names::ALL {
        assert!(
            parsed.families.contains_key(metric.name),
            "{} missing from the local exposition",
            metric.name
        );
    }
    assert!(
        parsed
            .value("pgrs_reconcile_duration_seconds_count", &[])
            .is_some_and(|c| c > 0.0),
        "controller rounds are timed"
    );
    let total_failovers = |parsed: &Parsed| -> f64 {
        parsed
            .find("pgrs_failovers_total", &[])
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(total_failovers(&parsed), 0.0, "no failover yet");

    // The primary renews its lease through the controller every second.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (text, parsed) = scrape(&cluster).await;
        let renewals = parsed.value("pgrs_lease_renewals_total", &[("instance", first.as_str())]);
        if renewals.is_some_and(|r| r >= 2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease renewals counted for {first}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A planned switchover is counted once, by reason, with its duration.
    let target = status
        .nodes
        .iter()
        .find(|n| n.role.as_deref() == Some("replica"))
        .map(|n| n.name.clone())
        .expect("a replica");
    let output = pgrs(&[
        "local",
        "switchover",
        "--dir",
        &cluster.dir_text(),
        "--to",
        &target,
    ]);
    assert!(
        output.status.success(),
        "switchover failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let new_primary = cluster
        .wait_new_primary(&first, Duration::from_secs(60))
        .await;
    assert_eq!(new_primary, target);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (text, parsed) = scrape(&cluster).await;
        let switchovers = parsed.value("pgrs_failovers_total", &[("reason", "Switchover")]);
        let duration = parsed.value("pgrs_last_failover_duration_seconds", &[]);
        if switchovers == Some(1.0) && total_failovers(&parsed) == 1.0 {
            let seconds = duration.expect("a failover has a duration");
            assert!(seconds > 0.0 && seconds < 60.0, "{seconds} s\n{text}");
            eprintln!("switchover measured by /metrics: {seconds:.3} s");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the switchover is not counted: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once the old primary streams again, the gauges agree with the status under the new one.
    let (status, _) = wait_agreement(&cluster, &target).await;
    assert_eq!(status.primary.as_deref(), Some(target.as_str()));
}
