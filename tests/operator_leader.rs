//! Leader election between two `pgrs operator` processes on the test bed: only the holder of the
//! Lease `pgrs-operator` reconciles (the other's reconcile counter stays at 0, its `/readyz` says
//! standby); when the leader is SIGKILLed (no release), the standby takes over after the Lease
//! expires on its clock, and it still fails the cluster over when the primary pod is deleted.
//!
//! A sampler polls the Lease and both operators' reconcile counters every 200 ms for the whole
//! test. From it the test asserts that the standby took the Lease no earlier than a Lease
//! duration after the leader's last renewal the sampler saw (bounds taken so that sampling
//! delays can only make the measured interval longer), and that the two counters never grew in
//! the same sample interval (one such interval is tolerated at the handover).
//!
//! Both operators run as processes with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use operator_support::*;
use pgrs_testbed::TestBed;
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";
const LEASE: &str = "pgrs-operator";
/// Election timings of both operators (seconds): short, to keep the test quick.
const LEASE_DURATION: u64 = 8;
const RENEW_DEADLINE: u64 = 5;
const RETRY_PERIOD: u64 = 1;

/// One operator process with its identity and health port.
struct Operator {
    identity: String,
    process: OperatorProcess,
}

impl Operator {
    fn start(bed: &TestBed, namespace: &str, identity: &str, port: u16) -> Operator {
        let process = OperatorProcess::start_with(
            bed,
            namespace,
            port,
            &[
                "--leader-election-identity",
                identity,
                "--leader-election-lease-duration",
                &LEASE_DURATION.to_string(),
                "--leader-election-renew-deadline",
                &RENEW_DEADLINE.to_string(),
                "--leader-election-retry-period",
                &RETRY_PERIOD.to_string(),
            ],
        );
        Operator {
            identity: identity.to_string(),
            process,
        }
    }

    async fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.process.health_port());
        let response = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        response.text().await.map_err(|e| format!("GET {url}: {e}"))
    }

    /// The value of an unlabelled metric.
    async fn metric(&self, name: &str) -> Result<u64, String> {
        metric(self.process.health_port(), name).await
    }

    fn kill(&mut self) {
        self.process.kill();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        // The process prints its log tail right after this header.
        if std::thread::panicking() {
            eprintln!("--- operator {} ---", self.identity);
        }
    }
}

/// The value of an unlabelled metric of the operator whose endpoint is on `port`.
async fn metric(port: u16, name: &str) -> Result<u64, String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{name} missing from {text}"))
}

/// One sample: the Lease (holder, resourceVersion) and both reconcile counters (None when the
/// operator did not answer), between `sent` and `received` on the test's clock.
#[derive(Debug, Clone)]
struct Sample {
    sent: Instant,
    received: Instant,
    holder: Option<String>,
    version: Option<String>,
    reconciles: [Option<u64>; 2],
}

/// Samples the Lease and the counters of the operators on `ports` every 200 ms until `stop`.
fn sample(
    client: Client,
    ns: &str,
    ports: [u16; 2],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let leases = Api::<Lease>::namespaced(client, ns);
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let (lease, a, b) = tokio::join!(
                leases.get_opt(LEASE),
                metric(ports[0], "pgrs_operator_reconciles_total"),
                metric(ports[1], "pgrs_operator_reconciles_total"),
            );
            let received = Instant::now();
            let lease = lease.ok().flatten();
            samples.push(Sample {
                sent,
                received,
                holder: lease
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.clone())
                    .filter(|h| !h.is_empty()),
                version: lease.and_then(|l| l.metadata.resource_version),
                reconciles: [a.ok(), b.ok()],
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    })
}

/// The standby (`new`) took the Lease from `old` no earlier than a Lease duration after the
/// last renewal of `old` the sampler saw. The renewal happened after the sample before the one
/// that first showed its version was sent; the takeover before the first sample showing `new`
/// was received: their distance is an upper bound of the real one, so it must reach the Lease
/// duration. Returns it.
fn takeover_interval(samples: &[Sample], old: &str, new: &str) -> Duration {
    let took = samples
        .iter()
        .position(|s| s.holder.as_deref() == Some(new))
        .expect("the sampler saw the new holder");
    let last_old = samples[..took]
        .iter()
        .rposition(|s| s.holder.as_deref() == Some(old))
        .expect("the sampler saw the old holder before");
    let version = samples[last_old].version.clone();
    let first_sighting = samples[..=last_old]
        .iter()
        .position(|s| s.holder.as_deref() == Some(old) && s.version == version)
        .expect("sighting");
    assert!(
        first_sighting > 0,
        "the sampler started after the last renewal"
    );
    let renewed_after = samples[first_sighting - 1].sent;
    let taken_before = samples[took].received;
    let interval = taken_before.duration_since(renewed_after);
    assert!(
        interval >= Duration::from_secs(LEASE_DURATION),
        "{new} took the Lease at most {} ms after {old}'s last renewal seen, before the {LEASE_DURATION} s Lease expired",
        interval.as_millis()
    );
    interval
}

/// Both reconcile counters never grow in the same sample interval, except in at most one
/// interval in which the Lease changed hands; while the first operator holds the Lease, the
/// second's never grows. Returns how many intervals saw each grow.
fn reconciles_never_overlap(samples: &[Sample], identities: [&str; 2]) -> [usize; 2] {
    let mut grew = [0, 0];
    let mut both = Vec::new();
    for pair in samples.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let growth: Vec<bool> = (0..2)
            .map(|i| match (before.reconciles[i], after.reconciles[i]) {
                (Some(x), Some(y)) => y > x,
                _ => false,
            })
            .collect();
        for i in 0..2 {
            if growth[i] {
                grew[i] += 1;
            }
        }
        let held = |s: &Sample, i: usize| s.holder.as_deref() == Some(identities[i]);
        if held(before, 0) && held(after, 0) {
            assert!(
                !growth[1],
                "{} reconciled while {} led",
                identities[1], identities[0]
            );
        }
        if held(before, 1) && held(after, 1) {
            assert!(
                !growth[0],
                "{} reconciled while {} led",
                identities[0], identities[1]
            );
        }
        if growth[0] && growth[1] {
            let handover = before.holder != after.holder;
            assert!(
                handover,
                "both operators reconciled between two samples while {:?} held the Lease",
                before.holder
            );
            both.push(after.received);
        }
    }
    assert!(
        both.len() <= 1,
        "both operators reconciled in {} sample intervals",
        both.len()
    );
    grew
}

async fn holder(client: &Client, ns: &str) -> Result<String, String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get(LEASE)
        .await
        .map_err(|e| e.to_string())?;
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "the Lease has no holder".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-leader").await;
    let first = Operator::start(bed, &ns_name, "operator-a", 28471);
    // The first one takes the free Lease; the second starts once it is held.
    let leader_id = eventually("operator-a leads", Duration::from_secs(30), || async {
        holder(&client, &ns_name).await
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(leader_id, "operator-a");
    let second = Operator::start(bed, &ns_name, "operator-b", 28472);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(
        client.clone(),
        &ns_name,
        [first.process.health_port(), second.process.health_port()],
        stop.clone(),
    );
    let (mut leader, standby) = (first, second);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;

    // Only the leader reconciled; both are ready and say which they are.
    let reconciles = leader
        .metric("pgrs_operator_reconciles_total")
        .await
        .expect("leader metrics");
    assert!(reconciles > 0, "the leader reconciled");
    assert_eq!(
        leader.metric("pgrs_operator_leader").await.expect("metric"),
        1
    );
    assert_eq!(
        standby
            .metric("pgrs_operator_reconciles_total")
            .await
            .expect("standby metrics"),
        0,
        "the standby must not reconcile"
    );
    assert_eq!(
        standby
            .metric("pgrs_operator_leader")
            .await
            .expect("metric"),
        0
    );
    let ready = standby.get("/readyz").await.expect("standby /readyz");
    assert!(
        ready.contains("standby") && ready.contains("operator-a"),
        "{ready}"
    );
    assert_eq!(
        holder(&client, &ns_name).await.expect("holder"),
        "operator-a"
    );

    // SIGKILL: the Lease is not released; the standby waits for it to expire on its own clock.
    leader.kill();
    let killed_at = Instant::now();
    eventually(
        "operator-b takes the Lease over",
        Duration::from_secs(LEASE_DURATION + 30),
        || async {
            let holder = holder(&client, &ns_name).await?;
            (holder == "operator-b")
                .then_some(())
                .ok_or(format!("held by {holder}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let took_over = killed_at.elapsed();
    // Leading, and it has seen the healthy cluster (a few rounds) before the next fault.
    eventually(
        "operator-b reports leadership and reconciles",
        Duration::from_secs(30),
        || async {
            let leading = standby.metric("pgrs_operator_leader").await?;
            let ready = standby.get("/readyz").await?;
            let rounds = standby.metric("pgrs_operator_reconciles_total").await?;
            (leading == 1 && ready.contains("leader") && rounds >= 3)
                .then_some(())
                .ok_or(format!("leader={leading} readyz={ready} rounds={rounds}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "operator leader election: operator-b took over {} ms after operator-a was killed (lease {LEASE_DURATION} s)",
        took_over.as_millis()
    );

    // The new leader does the work: a deleted primary pod is failed over.
    kubectl(
        bed,
        &["delete", "pod", &primary, "-n", &ns_name, "--wait=false"],
    );
    let deleted_at = Instant::now();
    let new_primary = eventually(
        "the new leader fails the cluster over",
        Duration::from_secs(120),
        || async {
            let status = cluster(&client, &ns_name, CLUSTER)
                .await?
                .status
                .ok_or("no status")?;
            let record = status.last_failover.ok_or("no lastFailover yet")?;
            let current = status.current_primary.ok_or("no primary")?;
            (record.from.as_deref() == Some(primary.as_str())
                && record.to == current
                && current != primary)
                .then_some(current)
                .ok_or_else(|| format!("{record:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "operator leader election: failover {primary} -> {new_primary} by the new leader {} ms after the pod deletion",
        deleted_at.elapsed().as_millis()
    );
    assert!(
        standby
            .metric("pgrs_operator_reconciles_total")
            .await
            .expect("metrics")
            > 0
    );

    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.expect("the sampler");
    let interval = takeover_interval(&samples, "operator-a", "operator-b");
    let grew = reconciles_never_overlap(&samples, ["operator-a", "operator-b"]);
    assert!(
        grew[0] > 0 && grew[1] > 0,
        "the sampler saw both operators reconcile ({grew:?} intervals of {})",
        samples.len()
    );
    eprintln!(
        "operator leader election: {} samples; operator-b took the Lease at most {} ms after the last renewal by operator-a the sampler saw (Lease {LEASE_DURATION} s); counters grew in {} (a) and {} (b) sample intervals, both in the same one only at a handover",
        samples.len(),
        interval.as_millis(),
        grew[0],
        grew[1]
    );
    drop(standby);
}
