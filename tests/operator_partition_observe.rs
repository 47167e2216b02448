//! Network partitions of the primary pod that must not fail it over, or must block its
//! commits (issue 13, scenarios 2 and 3), under writers straight to every pod IP
//! (`operator_support/writers.rs`) judged by the Jepsen-style checker `pgrs::chaos::check`.
//!
//! 2. The operator cut from the primary's agent (`Peer::HostPort(8008)`: the host's TCP to the
//!    agent port; the kubelet's probes of that port come from another address and pass), the
//!    agent still reaching the API server: no failover — the agent keeps renewing the Lease,
//!    the same pod stays primary and acknowledges writes for more than twice the Lease
//!    duration — and the status shows the instance unobserved.
//! 3. Sync mode (`examples/sync.yaml`: `ANY 1`, `dataDurability: required`), the primary cut
//!    from both replicas only (operator, API server and clients still reach everyone): no
//!    write sent after the cut is acknowledged while it lasts (commits block in `SyncRep`).
//!    Then the primary is also cut from the API server, so that it fences itself while its
//!    clients still reach it and would see any acknowledgement of a blocked commit; a replica
//!    is promoted; heal; the old primary rejoins; zero split-brain writes, zero acknowledged
//!    writes lost.
//!
//! The operator runs as a process on the host with the admin kubeconfig. Needs the test-bed
//! binaries (`testbed/build.sh`), root and `iptables`. Figures: `target/pgrs-reports/`.

#[path = "operator_partition_observe/operator_cut.rs"]
mod operator_cut;
mod operator_report;
mod operator_support;
#[path = "operator_partition_observe/sync_cut.rs"]
mod sync_cut;
#[path = "operator_support/writers.rs"]
mod writers;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use operator_support::watch::Evidence;
use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase, SyncState, names};
use pgrs::chaos::{WriteOutcome, WriteRecord};
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, TestNamespace};
use writers::Writers;

/// The Lease duration of both examples.
const LEASE_SECONDS: u64 = 8;

/// A healthy 3-instance cluster under writers to every pod IP, its operator, and its namespace
/// (deleted on drop, after the evidence of a failure is kept).
pub struct Cluster {
    pub evidence: Evidence<'static>,
    _ns: TestNamespace<'static>,
    pub bed: &'static TestBed,
    pub ns: String,
    pub client: Client,
    pub name: &'static str,
    /// The primary when the writers started.
    pub primary: String,
    /// Pod name → pod IP.
    pub ips: BTreeMap<String, String>,
    pub password: Login,
    /// The writers' clock.
    pub start: Instant,
    pub writers: Option<Writers>,
}

impl Cluster {
    /// Applies `manifest` (cluster `name`), waits until it is Healthy 3/3 (and, with `sync`,
    /// until a standby is synchronous), creates `t (id)` and starts the writers; returns once
    /// the primary acknowledged 20 writes.
    pub async fn start(
        prefix: &str,
        test: &'static str,
        manifest: &str,
        name: &'static str,
        sync: bool,
    ) -> Cluster {
        let (bed, ns_guard, ns, client) = operator_test_namespace(prefix).await;
        let evidence = Evidence {
            bed,
            ns: ns.clone(),
            test,
            operators: vec![("operator", OperatorProcess::start(bed, &ns))],
        };
        apply_repo_manifest(bed, &ns, manifest);
        let primary = wait_three_ready_healthy(&client, &ns, name, "cluster Healthy").await;
        if sync {
            eventually("a synchronous standby", Duration::from_secs(60), || async {
                let status = cluster_status(&client, &ns, name).await?;
                status
                    .instances
                    .iter()
                    .any(|i| matches!(i.sync_state, Some(SyncState::Sync | SyncState::Quorum)))
                    .then_some(())
                    .ok_or(format!("no synchronous standby: {:?}", status.instances))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let ips = pod_ips(&client, &ns, name).await;
        assert_eq!(ips.len(), 3, "three pods with IPs: {ips:?}");
        let password = app_login(&client, &ns, name).await;
        connect(&ips[&primary], &password)
            .await
            .expect("connect to the primary")
            .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
            .await
            .expect("create a table");
        let start = Instant::now();
        let writers = Writers::start(&ips, &password, start);
        eventually(
            "writes flow to the primary",
            Duration::from_secs(30),
            || async {
                let acked = writers.acknowledged_by(&primary);
                (acked >= 20)
                    .then_some(())
                    .ok_or(format!("{acked} acknowledged"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        Cluster {
            evidence,
            _ns: ns_guard,
            bed,
            ns,
            client,
            name,
            primary,
            ips,
            password,
            start,
            writers: Some(writers),
        }
    }

    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn writers(&self) -> &Writers {
        self.writers.as_ref().expect("the writers run")
    }

    /// The holder and `resourceVersion` of the database Lease.
    pub async fn lease(&self) -> Result<(Option<String>, String), String> {
        let lease = Api::<Lease>::namespaced(self.client.clone(), &self.ns)
            .get(&names::lease(self.name))
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            lease.spec.and_then(|s| s.holder_identity),
            lease.metadata.resource_version.unwrap_or_default(),
        ))
    }

    pub async fn status(&self) -> Result<PgReplicaSetStatus, String> {
        cluster_status(&self.client, &self.ns, self.name).await
    }

    /// Whether pod `pod`'s `Ready` condition is True (its readiness probe passes).
    pub async fn pod_ready(&self, pod: &str) -> Result<bool, String> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .get(pod)
            .await
            .map_err(|e| e.to_string())?;
        Ok(pod
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
    }

    /// Waits (up to `timeout`) until the cluster is Healthy 3/3 with `pod` a ready replica,
    /// or the ready primary when `primary`; returns the status.
    pub async fn wait_back(
        &self,
        pod: &str,
        primary: bool,
        timeout: Duration,
    ) -> PgReplicaSetStatus {
        let want = if primary {
            InstanceRole::Primary
        } else {
            InstanceRole::Replica
        };
        eventually(
            &format!("Healthy 3/3 with {pod} a ready {want:?}"),
            timeout,
            || async {
                let status = self.status().await?;
                let instance = listed_instance(&status, pod)?;
                match (&status.phase, status.ready.as_deref()) {
                    (Some(Phase::Healthy), Some("3/3"))
                        if instance.role == want && instance.ready =>
                    {
                        Ok(status.clone())
                    }
                    _ => Err(format!(
                        "{:?} {:?}: {instance:?}",
                        status.phase, status.ready
                    )),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Stops the writers after half a second more and reads every id of `final_primary`.
    pub async fn finish(&mut self, final_primary: &str) -> (Vec<WriteRecord>, BTreeSet<i64>) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let writes = self.writers.take().expect("the writers run").finish().await;
        let ids = connect(&self.ips[final_primary], &self.password)
            .await
            .expect("connect to the final primary")
            .query("SELECT id FROM t", &[])
            .await
            .expect("read the final primary's ids")
            .iter()
            .map(|row| row.get(0))
            .collect();
        (writes, ids)
    }
}

/// Acknowledgement instants of `pod`'s writes in `[from, to]`.
pub fn acks_between(
    writes: &[WriteRecord],
    pod: &str,
    from: Duration,
    to: Duration,
) -> Vec<Duration> {
    let mut acks: Vec<Duration> = writes
        .iter()
        .filter(|w| w.node == pod)
        .filter_map(WriteRecord::acknowledged_at)
        .filter(|at| *at >= from && *at <= to)
        .collect();
    acks.sort();
    acks
}

/// The longest time in `[from, to]` without an instant of `acks` (sorted), edges included.
pub fn longest_silence(acks: &[Duration], from: Duration, to: Duration) -> Duration {
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for at in acks.iter().copied().chain([to]) {
        longest = longest.max(at.saturating_sub(previous));
        previous = previous.max(at);
    }
    longest
}

/// Writes to `pod` in `[from, to]` (by answer) that ended `outcome`.
pub fn count_outcome(
    writes: &[WriteRecord],
    pod: &str,
    outcome: WriteOutcome,
    from: Duration,
    to: Duration,
) -> usize {
    writes
        .iter()
        .filter(|w| w.node == pod && w.outcome == outcome)
        .filter(|w| w.answered >= from && w.answered <= to)
        .count()
}

pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_cut_from_the_operator_only_keeps_its_lease_and_serves_writes() {
    operator_cut::run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_primary_cut_from_its_replicas_blocks_commits_and_fails_over_losing_none() {
    sync_cut::run().await;
}
