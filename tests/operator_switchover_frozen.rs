//! A planned switchover whose participant freezes right after the request: the operator's
//! rounds still complete within their lease-based bounds, and the cluster ends with exactly one
//! primary.
//!
//! Two phases on one cluster (`examples/basic.yaml`, 8 s Lease), each started by
//! `kubectl annotate pgrs pg pgrs.dev/switchover-to=<standby>` followed at once by a SIGSTOP:
//!
//! 1. the **target's** agent freezes: the operator cannot see it caught up nor promote it; the
//!    switchover must be refused, abandoned or fall back to the failover rules, never hang;
//! 2. the **current primary's** agent freezes: the demotion's stop request never answers, so
//!    the round's demotion must end at its bound (`Bounds::for_lease`: checkpoint + demote),
//!    while the frozen agent's watchdog stops postgres and the Lease expires.
//!
//! A watcher scrapes the operator's `/metrics` every 100 ms: `pgrs_operator_reconciles_total`
//! (counted when a round starts) and `pgrs_reconcile_duration_seconds` (when it ends). While the
//! agent is frozen, the longest round must stay within
//! `STATUS_TIMEOUT + LEASE_READ_TIMEOUT + checkpoint + demote + API allowance`, and the longest
//! time between two round starts within that plus the 1 s status interval. Each phase lasts
//! until the status names a serving primary other than the frozen pod (at least the demotion's
//! bound after the freeze); then the agent is resumed (SIGCONT) and the cluster must be Healthy
//! 3/3 with one primary. Every pod's postgres is probed every 200 ms: never two writable.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Client;
use operator_support::faults::{Frozen, agent_pid};
use operator_support::watch::{
    Evidence, PrimaryProbe, RoundFigures, RoundWatch, first_writable, never_two_primaries,
    round_figures,
};
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs::control::Bounds;
use pgrs::control::round::LEASE_READ_TIMEOUT;
use pgrs::operator::pods::STATUS_TIMEOUT;
use pgrs_testbed::TestBed;
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";
/// `examples/basic.yaml`: `failover.leaseDurationSeconds`.
const LEASE: Duration = Duration::from_secs(8);
/// `monitoring.statusIntervalSeconds` (default): the requeue of a quiet round.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// What a round spends on the API server besides its bounded calls (apply, pods, control
/// ConfigMap, labels, status, Events) on a loaded 2-core test bed.
const API_ALLOWANCE: Duration = Duration::from_secs(3);

/// The longest a round may take with one frozen agent: its poll times out, the Lease read and
/// the longest bounded action (a demotion: checkpoint, then the stop request) run to their
/// bounds.
fn round_bound() -> Duration {
    let bounds = Bounds::for_lease(LEASE);
    STATUS_TIMEOUT + LEASE_READ_TIMEOUT + bounds.checkpoint + bounds.demote + API_ALLOWANCE
}

/// The longest time between two round starts: a round, then the requeue (the status interval,
/// or the one-second backoff after a failed round), plus the watcher's 100 ms scrapes.
fn gap_bound() -> Duration {
    round_bound() + STATUS_INTERVAL + Duration::from_millis(300)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Participant {
    Target,
    Primary,
}

/// What one phase saw.
struct PhaseReport {
    frozen: Participant,
    /// The freeze and the end of the frozen window (the resume follows 250 ms later).
    frozen_at: Instant,
    until: Instant,
    from: String,
    target: String,
    frozen_pod: String,
    /// From the freeze to the end of the phase (a serving primary other than the frozen pod).
    settled: Duration,
    /// When the status first named a primary other than `from`, if it did.
    promoted: Option<Duration>,
    ending_primary: String,
    figures: Option<RoundFigures>,
    /// From the resume to Healthy 3/3.
    recovered: Duration,
    events: Vec<String>,
}

async fn current_primary(client: &Client, ns: &str) -> String {
    cluster_status(client, ns, CLUSTER)
        .await
        .ok()
        .and_then(|s| s.current_primary)
        .expect("a current primary")
}

/// Healthy, 3/3 ready, exactly one instance a primary and it the current one; returns it.
async fn wait_healthy_one_primary(client: &Client, ns: &str, what: &str) -> String {
    eventually(what, Duration::from_secs(120), || async {
        let status = cluster_status(client, ns, CLUSTER).await?;
        let primaries: Vec<&str> = status
            .instances
            .iter()
            .filter(|i| i.role == InstanceRole::Primary)
            .map(|i| i.name.as_str())
            .collect();
        match (
            &status.phase,
            status.ready.as_deref(),
            &status.current_primary,
        ) {
            (Some(Phase::Healthy), Some("3/3"), Some(current))
                if primaries == [current.as_str()] && status.instances.iter().all(|i| i.ready) =>
            {
                Ok(current.clone())
            }
            _ => Err(format!(
                "{:?} {:?} {:?}: {:?}",
                status.phase, status.ready, status.current_primary, status.instances
            )),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Event lines (`reason: message`) not in `before`.
fn new_events(bed: &TestBed, ns: &str, before: &str) -> Vec<String> {
    let seen: Vec<&str> = before.lines().collect();
    event_lines(bed, ns)
        .lines()
        .filter(|l| !seen.contains(l))
        .map(str::to_string)
        .collect()
}

async fn phase(bed: &TestBed, client: &Client, ns: &str, frozen: Participant) -> PhaseReport {
    let from = wait_healthy_one_primary(client, ns, "Healthy before the phase").await;
    let target = ["pg-0", "pg-1", "pg-2"]
        .into_iter()
        .find(|p| *p != from)
        .expect("a standby")
        .to_string();
    let frozen_pod = match frozen {
        Participant::Target => target.clone(),
        Participant::Primary => from.clone(),
    };
    let pid = agent_pid(ns, &frozen_pod).expect("the agent process");
    let events_before = event_lines(bed, ns);

    request_switchover(bed, ns, CLUSTER, &target);
    let agent = Frozen::freeze(pid);
    let frozen_at = Instant::now();

    // Until a primary other than the frozen pod serves (Healthy or Degraded: the frozen one is
    // not ready), and at least the demotion's bound has passed.
    let bounds = Bounds::for_lease(LEASE);
    let min_frozen = bounds.checkpoint + bounds.demote + STATUS_TIMEOUT;
    let mut promoted = None;
    let ending_primary = loop {
        assert!(
            frozen_at.elapsed() < Duration::from_secs(75),
            "{frozen:?} frozen: no primary other than {frozen_pod} serves 75 s after the freeze: {:?}",
            cluster_status(client, ns, CLUSTER).await
        );
        if let Ok(status) = cluster_status(client, ns, CLUSTER).await {
            if promoted.is_none() && status.current_primary.as_ref().is_some_and(|p| *p != from) {
                promoted = Some(frozen_at.elapsed());
            }
            if let (Some(Phase::Healthy | Phase::Degraded), Some(current)) =
                (&status.phase, &status.current_primary)
                && *current != frozen_pod
                && frozen_at.elapsed() >= min_frozen
            {
                break current.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let settled = frozen_at.elapsed();
    // The figures of the frozen window: scraped while the agent was still stopped.
    let until = Instant::now();
    tokio::time::sleep(Duration::from_millis(250)).await;
    agent.resume();
    let resumed = Instant::now();
    wait_healthy_one_primary(client, ns, "Healthy 3/3 with one primary after the resume").await;
    let recovered = resumed.elapsed();
    let events = new_events(bed, ns, &events_before);
    PhaseReport {
        frozen,
        frozen_at,
        until,
        from,
        target,
        frozen_pod,
        settled,
        promoted,
        ending_primary,
        figures: None,
        recovered,
        events,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_right_after_a_switchover_request_does_not_stall_the_operator() {
    let started = Instant::now();
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-swfrozen").await;
    let port = free_port();
    let operators = Evidence {
        bed,
        ns: ns_name.clone(),
        test: "switchover-frozen",
        operators: vec![(
            "operator",
            OperatorProcess::start_with(bed, &ns_name, port, &[]),
        )],
    };

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let ips: BTreeMap<String, String> = pod_ips(&client, &ns_name, CLUSTER).await;
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let primary = current_primary(&client, &ns_name).await;
    let writer =
        WriteLoad::start_on_new_table(&client, &ns_name, CLUSTER, &ips[&primary], &password).await;
    let probe = PrimaryProbe::start(ips.clone(), password.clone());
    let rounds = RoundWatch::start(port);
    eprintln!(
        "switchover frozen: cluster Healthy on {primary} after {} ms; round bound {} ms (status timeout {} ms + lease read {} ms + checkpoint {} ms + demote {} ms + API {} ms), round-start gap bound {} ms",
        started.elapsed().as_millis(),
        round_bound().as_millis(),
        STATUS_TIMEOUT.as_millis(),
        LEASE_READ_TIMEOUT.as_millis(),
        Bounds::for_lease(LEASE).checkpoint.as_millis(),
        Bounds::for_lease(LEASE).demote.as_millis(),
        API_ALLOWANCE.as_millis(),
        gap_bound().as_millis()
    );

    let mut reports = Vec::new();
    for frozen in [Participant::Target, Participant::Primary] {
        reports.push(phase(bed, &client, &ns_name, frozen).await);
    }

    let samples = rounds.finish().await;
    let writable = probe.finish().await;
    let acked = writer.finish().await;
    never_two_primaries(&writable);

    let mut failures = Vec::new();
    for report in &mut reports {
        let figures =
            *report
                .figures
                .insert(round_figures(&samples, report.frozen_at, report.until));
        let writable_new = first_writable(&writable, &report.ending_primary, report.frozen_at)
            .filter(|_| report.ending_primary != report.from);
        eprintln!(
            "switchover frozen, {:?} ({}) frozen, switchover {} -> {}: {} rounds started, {} finished in {} ms frozen; longest round {} ms (bound {} ms), longest gap between round starts {} ms (bound {} ms); primary at the end of the phase {} (status named a new one after {:?} ms, writable after {:?} ms); Healthy 3/3 {} ms after SIGCONT; events: {:?}",
            report.frozen,
            report.frozen_pod,
            report.from,
            report.target,
            figures.started,
            figures.finished,
            report.settled.as_millis(),
            figures.longest_round.as_millis(),
            round_bound().as_millis(),
            figures.longest_gap.as_millis(),
            gap_bound().as_millis(),
            report.ending_primary,
            report.promoted.map(|d| d.as_millis()),
            writable_new.map(|d| d.as_millis()),
            report.recovered.as_millis(),
            report.events
        );
        if figures.longest_round > round_bound() {
            failures.push(format!(
                "{:?} frozen: a round took {} ms, over the bound of {} ms",
                report.frozen,
                figures.longest_round.as_millis(),
                round_bound().as_millis()
            ));
        }
        if figures.longest_gap > gap_bound() {
            failures.push(format!(
                "{:?} frozen: {} ms between two round starts, over the bound of {} ms",
                report.frozen,
                figures.longest_gap.as_millis(),
                gap_bound().as_millis()
            ));
        }
        if figures.started < 3 {
            failures.push(format!(
                "{:?} frozen: only {} rounds started in {} ms",
                report.frozen,
                figures.started,
                report.settled.as_millis()
            ));
        }
    }

    // Exactly one primary at the end, the one the status names, and the request was consumed.
    let status = cluster_status(&client, &ns_name, CLUSTER)
        .await
        .expect("status");
    let current = status.current_primary.clone().expect("a current primary");
    let last = writable
        .iter()
        .rev()
        .find(|s| s.answered == ips.len())
        .map(|s| s.writable.clone())
        .unwrap_or_default();
    assert_eq!(last, [current.as_str()], "writable in the last full probe");
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
    let final_db = connect(&ips[&current], &password)
        .await
        .expect("connect to the final primary");
    let ids: Vec<i64> = acked.iter().map(|(id, _, _)| *id).collect();
    let present = final_db
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&ids])
        .await
        .expect("read back")
        .len();
    eprintln!(
        "switchover frozen: final primary {current}; {} writes acknowledged, {} missing on the final primary (asynchronous replication: counted, not asserted); {} probes, never two writable; whole test {} s",
        ids.len(),
        ids.len() - present,
        writable.len(),
        started.elapsed().as_secs()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    drop(operators);
}
