//! Phase 2: the primary pod cut from the API server only (it still reaches its replicas, its
//! clients and the operator), failsafe on: no failover.

use pgrs::api::condition;
use pgrs_testbed::faults::{Direction, Peer};

use super::outage::assert_failsafe_held;
use super::writers::Healer;
use super::*;

/// What the API said during the cut (on the writers' clock).
struct ApiSample {
    at: Duration,
    phase: Option<Phase>,
    primary: Option<String>,
    holder: Option<Option<String>>,
    ready_message: Option<String>,
    /// The `ServingOnFailsafe` condition's status.
    on_failsafe: Option<String>,
}

/// Returns the figures' table row.
pub async fn run(cluster: &Cluster) -> String {
    let cut_for = LEASE * 3;
    let primary = cluster.primary.clone();
    let replicas = cluster.replicas();
    cluster
        .wait_agents("the primary's failsafe armed", |s| {
            s[&primary].failsafe.as_ref().is_some_and(|f| f.armed)
        })
        .await;
    let before = cluster.status().await.expect("the status");

    let (start, writers) = cluster.start_writes().await;
    let agents = AgentWatch::start(&cluster.ips, &cluster.agent_token, start);
    let net = cluster
        .bed
        .pod_net(&cluster.ns, &primary)
        .expect("the primary's network namespace");
    let healer = Healer(net.clone());
    let cut_at = start.elapsed();
    net.cut(Peer::ApiServer, Direction::Both)
        .expect("cut the primary from the API server");
    eprintln!(
        "phase 2: {primary} ({}) cut from the API server at {} for {}",
        net.ip(),
        secs(cut_at),
        secs(cut_for)
    );
    let mut api = Vec::new();
    while start.elapsed() < cut_at + cut_for {
        let status = cluster.status().await.ok();
        let lease = cluster.lease().await.ok();
        api.push(ApiSample {
            at: start.elapsed(),
            phase: status.as_ref().and_then(|s| s.phase),
            primary: status.as_ref().and_then(|s| s.current_primary.clone()),
            holder: lease.map(|(holder, _, _)| holder),
            ready_message: status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == condition::READY)
                    .map(|c| c.message.clone())
            }),
            on_failsafe: status.and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == condition::SERVING_ON_FAILSAFE)
                    .map(|c| c.status)
            }),
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let healed_at = start.elapsed();
    let healed_wall = Timestamp::now();
    drop(healer);
    cluster
        .wait_agents("the primary renews its Lease again", |s| {
            s[&primary]
                .failsafe
                .as_ref()
                .is_some_and(|f| f.serving_on_confirmations_ms.is_none())
        })
        .await;
    let renewed = start.elapsed();
    let status = cluster
        .wait_fresh_healthy(healed_wall, Duration::from_secs(60))
        .await;
    let samples = agents.finish().await;
    let (writes, report) = cluster.finish_writes(writers, &primary).await;

    let mut seen: Vec<(Option<Phase>, Option<String>)> = Vec::new();
    for sample in &api {
        let entry = (sample.phase, sample.ready_message.clone());
        if !seen.contains(&entry) {
            seen.push(entry);
        }
    }
    eprintln!(
        "phase 2: {} API samples; phases and Ready messages seen: {seen:#?}; renewing again {} \
         after the heal",
        api.len(),
        secs(renewed - healed_at)
    );
    for sample in &api {
        assert!(
            sample.phase == Some(Phase::Healthy)
                && sample.primary.as_deref() == Some(primary.as_str())
                && sample
                    .holder
                    .as_ref()
                    .is_none_or(|h| h.as_deref() == Some(&primary)),
            "at {} ({} into the cut): phase {:?}, primary {:?}, Lease holder {:?}, Ready {:?}",
            secs(sample.at),
            secs(sample.at - cut_at),
            sample.phase,
            sample.primary,
            sample.holder,
            sample.ready_message
        );
    }
    // The operator still reaches the API server and the primary's agent: its status says that
    // the primary serves on the failsafe.
    assert!(
        api.iter().any(|s| s.on_failsafe.as_deref() == Some("True")),
        "the ServingOnFailsafe condition was never True during the cut: {:?}",
        api.iter().map(|s| &s.on_failsafe).collect::<Vec<_>>()
    );
    assert_eq!(
        status.current_primary.as_deref(),
        Some(primary.as_str()),
        "the same primary after the heal"
    );
    assert_eq!(
        status.last_failover, before.last_failover,
        "no failover recorded"
    );
    assert!(
        report.split_brain.is_empty() && report.lost.is_empty(),
        "split-brain writes {:?}, acknowledged writes lost {:?}",
        report.split_brain,
        report.lost
    );
    let violations = report.violations(false);
    assert!(violations.is_empty(), "checker violations: {violations:?}");
    let terms: Vec<&str> = report.succession.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(terms, [primary.as_str()], "one term, of the same primary");
    let during = writes
        .iter()
        .filter(|w| w.node == primary && w.answered >= cut_at && w.answered <= healed_at)
        .filter(|w| w.acknowledged_at().is_some())
        .count();
    let gap = longest_gap(&report);
    eprintln!(
        "phase 2 (API cut {}, failsafe on): {during} writes acknowledged by {primary} during the \
         cut; longest window without an acknowledged write {} ms ({:?})",
        secs(cut_for),
        gap.as_millis(),
        report.longest_gap
    );
    assert!(
        gap < RENEW_DEADLINE / 2,
        "write unavailability {} ms: the primary must keep acknowledging",
        gap.as_millis()
    );
    assert_failsafe_held(
        &samples,
        &primary,
        &replicas,
        cut_at + RENEW_DEADLINE,
        healed_at,
    );
    format!(
        "| primary cut from the API server only, {} | on | none | yes | {} ms | {} | {} of {} |",
        secs(cut_for),
        gap.as_millis(),
        report.split_brain.len(),
        report.lost.len(),
        report.acknowledged
    )
}
