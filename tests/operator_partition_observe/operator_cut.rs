//! Scenario 2: the operator (a process on the host) cut from the primary's agent port, the
//! agent still reaching the API server. No failover may follow; the status must show the
//! instance as unobserved.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use pgrs::api::{InstanceRole, InstanceStatus, Phase, condition, names};
use pgrs::chaos::{FinalState, WriteOutcome, check};
use pgrs::protocol::api::HEALTHZ_PATH;
use pgrs_testbed::faults::{Direction, Peer};

use crate::operator_report::{Report, Step};
use crate::operator_support::endpoint_addresses;
use crate::writers::Healer;
use crate::{Cluster, LEASE_SECONDS, acks_between, longest_silence, ms};

/// How long the cut lasts: more than twice the Lease duration.
const HOLD: Duration = Duration::from_secs(2 * LEASE_SECONDS + 4);
/// Between two looks at the cluster during the cut.
const SAMPLE_PERIOD: Duration = Duration::from_millis(250);

/// One look at the cluster during the cut (on the writers' clock).
#[derive(Debug)]
struct Sample {
    at: Duration,
    holder: Option<String>,
    lease_version: String,
    phase: Option<Phase>,
    current_primary: Option<String>,
    /// The cut primary as the status lists it.
    instance: Option<InstanceStatus>,
    /// The message of the `Ready` condition.
    ready_message: Option<String>,
    /// The cut pod's `Ready` condition (its readiness probe on the agent port).
    pod_ready: bool,
    /// The addresses `<name>-rw` selects.
    rw: Vec<String>,
}

async fn sample(c: &Cluster, old: &str) -> Result<Sample, String> {
    let (holder, lease_version) = c.lease().await?;
    let status = c.status().await?;
    let pod_ready = c.pod_ready(old).await?;
    let rw = endpoint_addresses(&c.client, &c.ns, &names::rw_service(c.name)).await;
    Ok(Sample {
        at: c.now(),
        holder,
        lease_version,
        phase: status.phase,
        current_primary: status.current_primary.clone(),
        instance: status.instances.iter().find(|i| i.name == old).cloned(),
        ready_message: status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| c.message.clone()),
        pod_ready,
        rw,
    })
}

/// Whether the agent at `ip` answers `GET /healthz` within 1 s, sent from `source` (HTTPS,
/// the certificate unchecked like a kubelet's probe; `operator_tls` checks it).
async fn agent_answers(ip: &str, source: Option<Ipv4Addr>) -> bool {
    let mut client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .danger_accept_invalid_certs(true)
        .no_proxy();
    if let Some(source) = source {
        client = client.local_address(IpAddr::V4(source));
    }
    let url = format!("https://{ip}:{}{HEALTHZ_PATH}", names::AGENT_PORT);
    match client.build().expect("http client").get(&url).send().await {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

/// The longest time between two observed changes of the Lease's `resourceVersion` (the cut's
/// start and end count as changes): an upper bound of the longest time without a renewal,
/// to within a sample period.
fn longest_unrenewed(samples: &[Sample], from: Duration, to: Duration) -> Duration {
    let mut longest = Duration::ZERO;
    let mut changed_at = from;
    for pair in samples.windows(2) {
        if pair[1].lease_version != pair[0].lease_version {
            longest = longest.max(pair[1].at.saturating_sub(changed_at));
            changed_at = pair[1].at;
        }
    }
    longest.max(to.saturating_sub(changed_at))
}

pub async fn run() {
    let test = "partition-operator";
    let mut c = Cluster::start("op-part-oper", test, "examples/basic.yaml", "pg", false).await;
    let old = c.primary.clone();
    let old_ip = c.ips[&old].clone();
    let failover_before = c.status().await.expect("status").last_failover;
    let net = c
        .bed
        .pod_net(&c.ns, &old)
        .expect("the primary's network namespace");
    let healer = Healer(net.clone());
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let cut_at = c.now();
    net.cut(Peer::HostPort(names::AGENT_PORT), Direction::Both)
        .expect("cut the host from the agent port");
    eprintln!(
        "cut the host from {old}'s agent port ({old_ip}:{}) at {} ms",
        names::AGENT_PORT,
        ms(cut_at)
    );
    // The fault is what it claims: the operator's address no longer reaches the agent, the
    // kubelet's probes' address does.
    assert!(
        !agent_answers(&old_ip, None).await,
        "the host still reaches the agent"
    );
    assert!(
        agent_answers(&old_ip, Some(net.probe_source())).await,
        "the probes' address lost the agent"
    );

    let mut samples = Vec::new();
    while c.now() < cut_at + HOLD {
        match sample(&c, &old).await {
            Ok(s) => samples.push(s),
            Err(e) => eprintln!("sample: {e}"),
        }
        tokio::time::sleep(SAMPLE_PERIOD).await;
    }
    let hold_end = c.now();
    let healed_at = c.now();
    drop(healer);
    eprintln!("healed at {} ms", ms(healed_at));
    let status = c.wait_back(&old, true, Duration::from_secs(60)).await;
    let back_at = c.now();
    let (writes, ids) = c.finish(&old).await;
    let report = check(
        &writes,
        &FinalState {
            primary: old.clone(),
            ids,
        },
        &[],
    );
    eprintln!("{}", report.to_markdown());

    // Figures.
    let since = |at: Duration| at.saturating_sub(cut_at);
    let acks = acks_between(&writes, &old, cut_at, hold_end);
    let silence = longest_silence(&acks, cut_at, hold_end);
    let others: Vec<_> = writes
        .iter()
        .filter(|w| w.node != old && w.outcome == WriteOutcome::Acknowledged)
        .collect();
    let holders: BTreeSet<Option<String>> = samples.iter().map(|s| s.holder.clone()).collect();
    let versions: BTreeSet<&str> = samples.iter().map(|s| s.lease_version.as_str()).collect();
    let unrenewed = longest_unrenewed(&samples, cut_at, hold_end);
    let named: BTreeSet<Option<String>> =
        samples.iter().map(|s| s.current_primary.clone()).collect();
    let mut phases: Vec<(Phase, Duration)> = Vec::new();
    for s in &samples {
        if let Some(phase) = s.phase
            && !phases.iter().any(|(p, _)| *p == phase)
        {
            phases.push((phase, since(s.at)));
        }
    }
    let detected = samples
        .iter()
        .find(|s| s.phase != Some(Phase::Healthy))
        .map(|s| since(s.at));
    let rw_dropped = samples
        .iter()
        .find(|s| !s.rw.contains(&old_ip))
        .map(|s| since(s.at));
    let unready = samples.iter().filter(|s| !s.pod_ready).count();
    let last = samples.last().expect("samples during the cut");
    let seen = last.instance.clone().expect("the cut primary is listed");
    let last_seen_after_fault = seen
        .last_seen
        .as_ref()
        .map(|t| t.0.as_second() - fault_wall.as_second());
    let figures = vec![
        format!(
            "Cut {} s (more than twice the {LEASE_SECONDS} s Lease): `{old}` acknowledged {} \
             writes, the longest stretch without one {} ms; other pods acknowledged {} writes.",
            ms(hold_end - cut_at) / 1000,
            acks.len(),
            ms(silence),
            others.len()
        ),
        format!(
            "Lease holders seen: {holders:?}; {} renewals seen, longest time without one {} ms \
             (sampled every {} ms).",
            versions.len(),
            ms(unrenewed),
            ms(SAMPLE_PERIOD)
        ),
        format!(
            "Status during the cut: phases {phases:?} (first seen, after the cut); \
             `currentPrimary` {named:?}; `{old}` at the end: role {:?}, ready {}, lastSeen \
             {last_seen_after_fault:?} s after the cut; Ready condition: {:?}.",
            seen.role, seen.ready, last.ready_message
        ),
        format!(
            "Pod `{old}` Ready in {} of {} samples (readiness probe on the agent port); `-rw` \
             lost it after {:?} ms; Healthy again {} ms after the heal.",
            samples.len() - unready,
            samples.len(),
            rw_dropped.map(ms),
            ms(back_at - healed_at)
        ),
    ];
    for line in &figures {
        eprintln!("{line}");
    }
    let mut notes = figures.clone();
    notes.push(report.to_markdown());
    Report {
        test,
        scenario: "the operator cut from the primary's agent (agent port, from the host); the \
                   agent still reaches the API server",
        lease_seconds: LEASE_SECONDS,
        steps: vec![
            Step::detected(detected),
            Step {
                name: "`-rw` stops selecting the primary",
                after: rw_dropped,
                how: "the primary's pod IP leaves `-rw`'s EndpointSlice",
            },
            Step {
                name: "healed",
                after: Some(since(healed_at)),
                how: "the cut removed",
            },
            Step {
                name: "Healthy again",
                after: Some(since(back_at)),
                how: "Healthy, 3/3 ready, the same primary",
            },
        ],
        write_unavailable: Some(silence),
        write_how: "longest stretch without an acknowledged write during the cut (its primary)",
        record: status.last_failover.clone(),
        fault_at: fault_wall,
        notes,
    }
    .write();

    // No failover: the same holder throughout, renewing; no other pod ever took a write.
    assert_eq!(
        holders,
        BTreeSet::from([Some(old.clone())]),
        "the Lease changed hands"
    );
    assert!(
        unrenewed < Duration::from_secs(5),
        "no Lease renewal seen for {} ms (renew deadline 5 s)",
        ms(unrenewed)
    );
    assert!(
        others.is_empty(),
        "other pods acknowledged writes: {others:#?}"
    );
    // The holder keeps renewing: it stays the primary of the status and of `-rw` although
    // its agent does not answer the operator.
    assert_eq!(
        named,
        BTreeSet::from([Some(old.clone())]),
        "the status stopped naming the renewing primary"
    );
    assert_eq!(
        rw_dropped, None,
        "`-rw` stopped selecting the renewing primary"
    );
    // The primary kept acknowledging writes for more than twice the Lease duration.
    assert!(
        acks.last()
            .is_some_and(|at| *at >= cut_at + Duration::from_secs(2 * LEASE_SECONDS)),
        "{old} acknowledged no write {LEASE_SECONDS}×2 s after the cut: {acks:?}"
    );
    assert!(
        silence < Duration::from_secs(3),
        "{old} stopped acknowledging for {} ms during the cut",
        ms(silence)
    );
    // The probes on the same port were spared: the pod stayed Ready.
    assert_eq!(unready, 0, "the cut pod turned unready: {samples:#?}");
    // The status shows the instance unobserved: its lastSeen stopped at the cut while the
    // others' went on.
    assert!(
        last_seen_after_fault.is_some_and(|s| s <= 1),
        "{old}'s lastSeen went on during the cut: {seen:?}"
    );
    let status_end = &samples.last().expect("a sample");
    assert!(
        status_end
            .instance
            .as_ref()
            .is_some_and(|i| !i.ready && i.role == InstanceRole::Unknown),
        "the cut primary is not listed unobserved (role unknown, not ready): {:?}",
        status_end.instance
    );
    // After the heal: the same primary, no failover recorded, nothing lost.
    assert_eq!(status.current_primary.as_deref(), Some(old.as_str()));
    assert_eq!(
        status.last_failover, failover_before,
        "a failover was recorded"
    );
    assert!(
        report.violations(true).is_empty(),
        "checker violations: {:?}",
        report.violations(true)
    );
}
