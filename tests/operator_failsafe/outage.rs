//! Phases 1 and 3: etcd and kube-apiserver stopped, then restarted, with the failsafe on and off.

use pgrs::protocol::api::Role;
use pgrs_testbed::control_plane::Restartable;

use super::*;

/// An outage of etcd and kube-apiserver, on the writers' clock.
struct Outage {
    /// Before etcd was stopped.
    began: Duration,
    /// Both stopped.
    stopped: Duration,
    /// Restarting etcd.
    restarting: Duration,
    /// kube-apiserver ready again (`/readyz`).
    ready: Duration,
    ready_wall: Timestamp,
}

/// Stops etcd, then kube-apiserver (a store crash, then the API server gone: the renewals first
/// time out, then are refused a connection), keeps both down for `down`, restarts them.
/// Nothing in it panics between the stop and the restart but a failure of the bed itself.
async fn outage(bed: &TestBed, start: Instant, down: Duration) -> Outage {
    let began = start.elapsed();
    bed.stop_component(Restartable::Etcd)
        .await
        .expect("stop etcd");
    bed.stop_component(Restartable::KubeApiserver)
        .await
        .expect("stop kube-apiserver");
    let stopped = start.elapsed();
    eprintln!(
        "etcd and kube-apiserver down at {} (stop began at {}); down for {}",
        secs(stopped),
        secs(began),
        secs(down)
    );
    tokio::time::sleep(down).await;
    let restarting = start.elapsed();
    bed.start_component(Restartable::Etcd)
        .await
        .expect("restart etcd");
    bed.start_component(Restartable::KubeApiserver)
        .await
        .expect("restart kube-apiserver");
    let ready = start.elapsed();
    eprintln!(
        "restart began at {}, kube-apiserver ready at {}",
        secs(restarting),
        secs(ready)
    );
    Outage {
        began,
        stopped,
        restarting,
        ready,
        ready_wall: Timestamp::now(),
    }
}

fn serving_ms(sample: &AgentSample) -> Option<u64> {
    sample
        .status
        .as_ref()?
        .failsafe
        .as_ref()?
        .serving_on_confirmations_ms
}

/// What the agents reported between `from` and `to`: the primary serving on its members'
/// confirmations, every replica confirming it. Panics naming the first sample that is not.
pub fn assert_failsafe_held(
    samples: &[AgentSample],
    primary: &str,
    replicas: &[String],
    from: Duration,
    to: Duration,
) {
    let expected = (to.saturating_sub(from).as_millis() / 400) as usize;
    for pod in std::iter::once(primary).chain(replicas.iter().map(String::as_str)) {
        let window: Vec<&AgentSample> = samples_of(samples, pod, from, to).collect();
        let answered: Vec<&AgentStatus> = window.iter().filter_map(|s| s.status.as_ref()).collect();
        eprintln!(
            "{pod}: {} of {} samples answered in [{}, {}]",
            answered.len(),
            window.len(),
            secs(from),
            secs(to)
        );
        assert!(
            answered.len() >= expected / 2,
            "{pod}'s agent answered {} of {} samples from the host during [{}, {}] \
             ({expected} expected at least)",
            answered.len(),
            window.len(),
            secs(from),
            secs(to)
        );
        for sample in window {
            let Some(status) = &sample.status else {
                continue;
            };
            let failsafe = status.failsafe.as_ref();
            if pod == primary {
                assert!(
                    status.role == Role::Primary && serving_ms(sample).is_some(),
                    "{pod} at {}: expected the primary serving on confirmations: role {:?}, \
                     failsafe {failsafe:?}",
                    secs(sample.at),
                    status.role
                );
            } else {
                assert!(
                    status.role == Role::Replica
                        && failsafe.and_then(|f| f.confirmed_primary.as_deref()) == Some(primary),
                    "{pod} at {}: expected a replica that confirmed {primary}: role {:?}, \
                     failsafe {failsafe:?}",
                    secs(sample.at),
                    status.role
                );
            }
        }
    }
    let longest = samples_of(samples, primary, from, to)
        .filter_map(serving_ms)
        .max();
    let failed_rounds = samples_of(samples, primary, from, to)
        .filter(|s| {
            s.status
                .as_ref()
                .and_then(|s| s.failsafe.as_ref())
                .is_some_and(|f| f.last_round_error.is_some())
        })
        .count();
    let least_remaining = replicas
        .iter()
        .flat_map(|r| samples_of(samples, r, from, to))
        .filter_map(|s| {
            s.status
                .as_ref()?
                .failsafe
                .as_ref()?
                .confirmation_remaining_ms
        })
        .min();
    eprintln!(
        "{primary} served on confirmations for up to {longest:?} ms; samples showing a failed \
         round: {failed_rounds}; least confirmation remaining on a replica: {least_remaining:?} ms"
    );
}

/// Phase 1: the outage with the failsafe on. Returns the figures' table row.
pub async fn with_failsafe(cluster: &mut Cluster) -> String {
    const DOWN: Duration = Duration::from_secs(60);
    let primary = cluster.primary.clone();
    let replicas = cluster.replicas();
    cluster
        .wait_agents(
            "the primary's failsafe armed, every agent told the three members",
            |s| {
                s[&primary].failsafe.as_ref().is_some_and(|f| f.armed)
                    && s.values().all(|a| {
                        a.failsafe
                            .as_ref()
                            .is_some_and(|f| f.enabled && f.members.len() == 3)
                    })
            },
        )
        .await;
    let (_, _, annotations) = cluster.lease().await.expect("read the Lease");
    eprintln!(
        "phase 1: the Lease names the members {:?}",
        annotations.get("pgrs.dev/failsafe-members")
    );
    let before = cluster.status().await.expect("the status");

    let (start, writers) = cluster.start_writes().await;
    let agents = AgentWatch::start(&cluster.ips, &cluster.agent_token, start);
    let down = outage(cluster.bed, start, DOWN).await;
    cluster.restart_operator_if_exited();
    let status = cluster
        .wait_fresh_healthy(down.ready_wall, Duration::from_secs(120))
        .await;
    let healthy = start.elapsed();
    cluster
        .wait_agents("the primary renews its Lease again", |s| {
            s[&primary]
                .failsafe
                .as_ref()
                .is_some_and(|f| f.serving_on_confirmations_ms.is_none())
        })
        .await;
    let renewed = start.elapsed();
    let samples = agents.finish().await;
    let (holder, _, _) = cluster.lease().await.expect("read the Lease");
    assert_eq!(
        status.current_primary.as_deref(),
        Some(primary.as_str()),
        "the same primary after the outage"
    );
    let (writes, report) = cluster.finish_writes(writers, &primary).await;
    eprintln!(
        "phase 1: Healthy (fresh) {} after the API was ready, renewing again {} after",
        secs(healthy - down.ready),
        secs(renewed - down.ready)
    );

    assert_eq!(
        holder.as_deref(),
        Some(primary.as_str()),
        "the Lease holder"
    );
    assert_eq!(
        status.last_failover, before.last_failover,
        "no failover or switchover was recorded"
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
        .filter(|w| w.node == primary && w.answered >= down.stopped && w.answered <= down.ready)
        .filter(|w| w.acknowledged_at().is_some())
        .count();
    let gap = longest_gap(&report);
    eprintln!(
        "phase 1 (failsafe on, {} down): {during} writes acknowledged by {primary} while the \
         API was down; longest window without an acknowledged write {} ms ({:?})",
        secs(DOWN),
        gap.as_millis(),
        report.longest_gap
    );
    assert!(during > 0, "no write was acknowledged during the outage");
    assert!(
        gap < RENEW_DEADLINE / 2,
        "write unavailability {} ms: the primary must keep acknowledging (renew deadline {} ms)",
        gap.as_millis(),
        RENEW_DEADLINE.as_millis()
    );
    // From the renew deadline on, the primary would have fenced without its members.
    assert_failsafe_held(
        &samples,
        &primary,
        &replicas,
        down.began + RENEW_DEADLINE,
        down.restarting,
    );
    format!(
        "| etcd + kube-apiserver down {} | on | none | yes | {} ms | {} | {} of {} |",
        secs(DOWN),
        gap.as_millis(),
        report.split_brain.len(),
        report.lost.len(),
        report.acknowledged
    )
}

/// Phase 3: the outage with `spec.failover.failsafe: false`. Returns the figures' table row.
pub async fn without_failsafe(cluster: &mut Cluster, down_for: Duration) -> String {
    let old = cluster.primary.clone();
    merge_patch_spec(
        cluster.bed,
        &cluster.ns,
        CLUSTER,
        r#"{"failover":{"failsafe":false}}"#,
    );
    cluster
        .wait_agents("every agent told the failsafe is off", |s| {
            s.values()
                .all(|a| a.failsafe.as_ref().is_some_and(|f| !f.enabled && !f.armed))
        })
        .await;
    eventually(
        "the primary removes the member list from the Lease",
        Duration::from_secs(30),
        || async {
            let (_, _, annotations) = cluster.lease().await?;
            match annotations.get("pgrs.dev/failsafe-members") {
                None => Ok(()),
                Some(members) => Err(format!("still {members}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let (start, writers) = cluster.start_writes().await;
    let agents = AgentWatch::start(&cluster.ips, &cluster.agent_token, start);
    let down = outage(cluster.bed, start, down_for).await;
    cluster.restart_operator_if_exited();
    let status = cluster
        .wait_fresh_healthy(down.ready_wall, Duration::from_secs(180))
        .await;
    let healthy = start.elapsed();
    let samples = agents.finish().await;
    let new = status
        .current_primary
        .clone()
        .expect("status.currentPrimary");
    let (writes, report) = cluster.finish_writes(writers, &new).await;
    cluster.primary = new.clone();

    let fenced = samples_of(&samples, &old, down.began, Duration::MAX)
        .find(|s| s.status.as_ref().is_some_and(|s| s.role != Role::Primary))
        .map(|s| s.at - down.began);
    let acks = |pod: &str| {
        writes
            .iter()
            .filter(move |w| w.node == pod)
            .filter_map(WriteRecord::acknowledged_at)
            .collect::<Vec<_>>()
    };
    let old_last = acks(&old)
        .into_iter()
        .filter(|at| *at <= down.ready)
        .max()
        .expect("the old primary acknowledged writes");
    let first_after = writes
        .iter()
        .filter_map(WriteRecord::acknowledged_at)
        .filter(|at| *at > old_last)
        .min();
    let gap = longest_gap(&report);
    eprintln!(
        "phase 3 (failsafe off, {} down): {old}'s agent seen not primary {} after the stop \
         began, its last acknowledged write {} after; the API ready {} after; Healthy (fresh) \
         {} after, primary {new} ({}); next acknowledged write {} after; longest window \
         without an acknowledged write {} ms; lost {} of {}",
        secs(down_for),
        fenced.map_or("—".into(), secs),
        secs(old_last.saturating_sub(down.began)),
        secs(down.ready - down.began),
        secs(healthy - down.began),
        if new == old {
            "no failover"
        } else {
            "failed over"
        },
        first_after.map_or("—".into(), |a| secs(a - down.began)),
        gap.as_millis(),
        report.lost.len(),
        report.acknowledged
    );
    let violations = report.violations(false);
    assert!(violations.is_empty(), "checker violations: {violations:?}");
    assert!(
        old_last <= down.began + RENEW_DEADLINE + SHUTDOWN_BUDGET + Duration::from_secs(2),
        "without the failsafe {old} stops acknowledging at its renew deadline: last \
         acknowledgement {} after the outage began",
        secs(old_last - down.began)
    );
    assert!(
        gap + RENEW_DEADLINE + Duration::from_secs(1) >= down_for,
        "the write outage ({} ms) lasts at least the API outage minus the renew deadline",
        gap.as_millis()
    );
    format!(
        "| etcd + kube-apiserver down {} | off | {} | {} | {} ms | {} | {} of {} |",
        secs(down_for),
        if new == old {
            "none".to_string()
        } else {
            format!("{old} → {new}")
        },
        if new == old { "yes" } else { "no" },
        gap.as_millis(),
        report.split_brain.len(),
        report.lost.len(),
        report.acknowledged
    )
}
