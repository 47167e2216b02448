//! Leader election between two `pgrs operator` processes on the test bed: only the holder of the
//! Lease `pgrs-operator` reconciles (the other's reconcile counter stays at 0, its `/readyz` says
//! standby); when the leader is SIGKILLed (no release), the standby takes over after the Lease
//! expires on its clock, and it still fails the cluster over when the primary pod is deleted.
//!
//! Both operators run as processes with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

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
        let text = self.get("/metrics").await?;
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("{name} missing from {text}"))
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
    drop(standby);
}
