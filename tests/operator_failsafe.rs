//! The failsafe (issue 13, scenario 5 and the failsafe's side of scenario 1): a primary whose
//! agent cannot reach the Kubernetes API keeps serving while every member the Lease names
//! confirms over the agents' API that it follows it. Writers go straight to every pod IP
//! (`operator_support/writers.rs`) and each phase's history is judged by the Jepsen-style
//! checker `pgrs::chaos::check`; the agents' `GET /v1/status` is sampled from the host every
//! 250 ms (it needs no API server).
//!
//! One cluster (`examples/basic.yaml`, 8 s Lease, 5 s renew deadline), three phases one after
//! the other, healed and Healthy again in between: each phase stops the shared control plane or
//! needs it, so they cannot run side by side, and one cluster instead of three saves two
//! set-ups (about 40 s each on this machine).
//!
//! 1. **etcd and kube-apiserver down for 60 s, failsafe on** (the default): no failover, the same
//!    primary acknowledges writes throughout (write unavailability far below the renew
//!    deadline), its agent reports `serving_on_confirmations_ms` and the replicas
//!    `confirmed_primary` during the outage; 0 split-brain writes, 0 acknowledged writes lost.
//! 2. **The primary cut from the API server only, failsafe on** (3 Lease durations; it still
//!    reaches its replicas, its clients and the operator): no failover, the same Lease holder,
//!    the status stays Healthy, the same primary acknowledges writes; 0 split-brain, 0 lost.
//!    (Failsafe off, this fails over: `operator_partition`.)
//! 3. **The outage again with `spec.failover.failsafe: false`** (today's behaviour): the primary
//!    fences itself at its renew deadline and a replica is promoted once the API is back and the
//!    Lease expired. Only the write unavailability is measured (and no split-brain write
//!    asserted): it grows one for one with the outage, so the outage is 20 s here to keep the
//!    test cheap; `PGRS_FAILSAFE_OUTAGE_SECS=60` gives the 60 s figure of `docs/failover.md`.
//!
//! The operator exits when it cannot renew its leader-election Lease for 10 s (as client-go's
//! leader election does), so it is gone during both outages; the test starts it again once the
//! API is back, under the same identity, as the kubelet restarts a Deployment's container (after
//! its back-off). The database does not need it during the outage.
//!
//! Needs the test-bed binaries (`testbed/build.sh`), root and `iptables`. Figures are printed and
//! written to `target/pgrs-reports/operator-failsafe.md`.

#[path = "operator_failsafe/api_cut.rs"]
mod api_cut;
mod operator_support;
#[path = "operator_failsafe/outage.rs"]
mod outage;
#[path = "operator_support/writers.rs"]
mod writers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use operator_support::watch::Evidence;
use operator_support::*;
use pgrs::api::{PgReplicaSetStatus, Phase, names};
use pgrs::chaos::{CheckReport, FinalState, WriteRecord, check};
use pgrs::protocol::api::AgentStatus;
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, TestNamespace};
use writers::Writers;

pub const CLUSTER: &str = "pg";
pub const LEASE: Duration = Duration::from_secs(8);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(5);
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(2);
/// Between two samples of the agents' statuses.
const AGENT_SAMPLE_PERIOD: Duration = Duration::from_millis(250);

/// The operator's leader-election identity, fixed like a Deployment pod's name: a restarted
/// container (same pod) takes its Lease back at once instead of waiting for it to expire.
const OPERATOR_IDENTITY: &str = "pgrs-operator-0";

fn start_operator(bed: &TestBed, ns: &str) -> OperatorProcess {
    OperatorProcess::start_with(
        bed,
        ns,
        free_port(),
        &["--leader-election-identity", OPERATOR_IDENTITY],
    )
}

/// The cluster under test: its namespace (deleted on drop), operator (evidence kept on a
/// failure), pods and the primary.
pub struct Cluster {
    pub evidence: Evidence<'static>,
    _ns: TestNamespace<'static>,
    pub bed: &'static TestBed,
    pub ns: String,
    pub client: Client,
    /// Pod name → pod IP.
    pub ips: BTreeMap<String, String>,
    pub password: Login,
    /// The agents' bearer token (their status needs it), read before any outage.
    pub agent_token: String,
    pub primary: String,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let (bed, ns_guard, ns, client) = operator_test_namespace("op-failsafe").await;
        let evidence = Evidence {
            bed,
            ns: ns.clone(),
            test: "failsafe",
            operators: vec![("operator", start_operator(bed, &ns))],
        };
        apply_repo_manifest(bed, &ns, "examples/basic.yaml");
        let primary = wait_three_ready_healthy(&client, &ns, CLUSTER, "cluster Healthy").await;
        let ips = pod_ips(&client, &ns, CLUSTER).await;
        assert_eq!(ips.len(), 3, "three pods with IPs: {ips:?}");
        let password = app_login(&client, &ns, CLUSTER).await;
        let agent_token = agent_token(&client, &ns).await;
        connect(&ips[&primary], &password)
            .await
            .expect("connect to the primary")
            .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
            .await
            .expect("create a table");
        Cluster {
            evidence,
            _ns: ns_guard,
            bed,
            ns,
            client,
            ips,
            password,
            agent_token,
            primary,
        }
    }

    /// The operator exits when it cannot renew its leader-election Lease for 10 s (as
    /// client-go's leader election does); in a cluster its container is restarted (after the
    /// kubelet's back-off). After an outage, starts it again (same identity) if it exited.
    /// Returns whether it did.
    pub fn restart_operator_if_exited(&mut self) -> bool {
        let (_, last) = self.evidence.operators.last().expect("an operator");
        let log = last.log();
        if !log.contains("operator stopped") {
            return false;
        }
        let why = log
            .lines()
            .find(|l| l.contains("lost the leader election"))
            .unwrap_or("(no reason logged)")
            .to_string();
        let name: &'static str =
            Box::leak(format!("operator-{}", self.evidence.operators.len() + 1).into_boxed_str());
        eprintln!("the operator exited during the outage: {why}; starting {name}");
        self.evidence
            .operators
            .push((name, start_operator(self.bed, &self.ns)));
        true
    }

    pub fn replicas(&self) -> Vec<String> {
        let primary = &self.primary;
        self.ips.keys().filter(|p| *p != primary).cloned().collect()
    }

    pub async fn status(&self) -> Result<PgReplicaSetStatus, String> {
        cluster_status(&self.client, &self.ns, CLUSTER).await
    }

    /// The database Lease: holder, `resourceVersion` and annotations.
    pub async fn lease(
        &self,
    ) -> Result<(Option<String>, String, BTreeMap<String, String>), String> {
        let lease = Api::<Lease>::namespaced(self.client.clone(), &self.ns)
            .get(&names::lease(CLUSTER))
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            lease.spec.and_then(|s| s.holder_identity),
            lease.metadata.resource_version.unwrap_or_default(),
            lease.metadata.annotations.unwrap_or_default(),
        ))
    }

    /// Waits until every agent answers and `ok` holds for all their statuses.
    pub async fn wait_agents(
        &self,
        what: &str,
        ok: impl Fn(&BTreeMap<String, AgentStatus>) -> bool,
    ) -> BTreeMap<String, AgentStatus> {
        let http = agent_http(&self.agent_token);
        eventually(what, Duration::from_secs(60), || async {
            let mut statuses = BTreeMap::new();
            for (pod, ip) in &self.ips {
                statuses.insert(pod.clone(), agent_status(&http, ip).await?);
            }
            let failsafe: Vec<_> = statuses.values().map(|s| &s.failsafe).collect();
            ok(&statuses)
                .then_some(statuses.clone())
                .ok_or(format!("{failsafe:?}"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Empties `t` (ids start at 1 again), starts writers to every pod on a new clock and
    /// returns once the primary acknowledged 20 writes.
    pub async fn start_writes(&self) -> (Instant, Writers) {
        connect(&self.ips[&self.primary], &self.password)
            .await
            .expect("connect to the primary")
            .batch_execute("TRUNCATE t")
            .await
            .expect("empty t");
        let start = Instant::now();
        let writers = Writers::start(&self.ips, &self.password, start);
        let primary = &self.primary;
        eventually(
            "writes flow to the primary",
            Duration::from_secs(30),
            || async {
                let acked = writers.acknowledged_by(primary);
                (acked >= 20)
                    .then_some(())
                    .ok_or(format!("{acked} acknowledged"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        (start, writers)
    }

    /// Stops the writers half a second later, reads the final primary's ids and checks.
    pub async fn finish_writes(
        &self,
        writers: Writers,
        final_primary: &str,
    ) -> (Vec<WriteRecord>, CheckReport) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let writes = writers.finish().await;
        let ids: BTreeSet<i64> = connect(&self.ips[final_primary], &self.password)
            .await
            .expect("connect to the final primary")
            .query("SELECT id FROM t", &[])
            .await
            .expect("read the final primary's ids")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let report = check(
            &writes,
            &FinalState {
                primary: final_primary.to_string(),
                ids,
            },
            &[],
        );
        eprintln!("{}", report.to_markdown());
        (writes, report)
    }

    /// Waits until the status is Healthy, 3/3 ready, and written after `since` (every instance
    /// seen in a later second: a status from before an outage says Healthy too).
    pub async fn wait_fresh_healthy(
        &self,
        since: Timestamp,
        timeout: Duration,
    ) -> PgReplicaSetStatus {
        eventually("a fresh Healthy 3/3 status", timeout, || async {
            let status = self.status().await?;
            let fresh = status.instances.len() == 3
                && status.instances.iter().all(|i| {
                    i.ready
                        && i.last_seen
                            .as_ref()
                            .is_some_and(|t| t.0.as_second() > since.as_second())
                });
            match (
                &status.phase,
                status.ready.as_deref(),
                &status.current_primary,
            ) {
                (Some(Phase::Healthy), Some("3/3"), Some(_)) if fresh => Ok(status.clone()),
                _ => Err(format!(
                    "{:?} {:?}: {:?}",
                    status.phase, status.ready, status.instances
                )),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The agents' token, from the cluster's Secret.
async fn agent_token(client: &Client, ns: &str) -> String {
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .get(&names::secret(CLUSTER))
        .await
        .expect("read the cluster Secret");
    let data = secret.data.expect("Secret data");
    String::from_utf8(data[names::SECRET_AGENT_TOKEN].0.clone()).expect("UTF-8 token")
}

/// An HTTPS client for the agents, sending `token` (the status needs it). The certificate is
/// not checked here (`operator_tls` checks it).
pub fn agent_http(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .expect("a token usable in a header");
    bearer.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, bearer);
    reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client")
}

/// `GET https://<ip>:8008/v1/status` from the host (with the token, see [`agent_http`]).
pub async fn agent_status(http: &reqwest::Client, ip: &str) -> Result<AgentStatus, String> {
    let url = format!("https://{ip}:8008/v1/status");
    http.get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("GET {url}: {e}"))
}

/// One agent's status as sampled (`None`: no answer within 1 s).
pub struct AgentSample {
    pub at: Duration,
    pub pod: String,
    pub status: Option<AgentStatus>,
}

/// Samples every agent's status every 250 ms (all at once) on the writers' clock.
pub struct AgentWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<AgentSample>>,
}

impl AgentWatch {
    pub fn start(ips: &BTreeMap<String, String>, token: &str, start: Instant) -> AgentWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let ips = ips.clone();
        let token = token.to_string();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = agent_http(&token);
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let asks = ips.iter().map(|(pod, ip)| {
                        let http = &http;
                        async move {
                            let status = agent_status(http, ip).await.ok();
                            AgentSample {
                                at: start.elapsed(),
                                pod: pod.clone(),
                                status,
                            }
                        }
                    });
                    samples.extend(futures::future::join_all(asks).await);
                    tokio::time::sleep(AGENT_SAMPLE_PERIOD).await;
                }
                samples
            })
        };
        AgentWatch { stop, task }
    }

    pub async fn finish(self) -> Vec<AgentSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the agent watcher")
    }
}

/// The samples of `pod` taken in `[from, to]`.
pub fn samples_of<'a>(
    samples: &'a [AgentSample],
    pod: &'a str,
    from: Duration,
    to: Duration,
) -> impl Iterator<Item = &'a AgentSample> + 'a {
    samples
        .iter()
        .filter(move |s| s.pod == pod && s.at >= from && s.at <= to)
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The longest window without an acknowledged write, from the checker.
pub fn longest_gap(report: &CheckReport) -> Duration {
    report.longest_gap.map_or(Duration::MAX, |g| g.length())
}

/// Writes `target/pgrs-reports/operator-failsafe.md`.
fn write_report(rows: &[String]) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|p| p.join("pgrs-reports"))
        .unwrap_or_else(|| "target/pgrs-reports".into());
    let text = format!(
        "# The failsafe on the test bed\n\n`cargo test --test operator_failsafe -- --nocapture`\n\n\
         | fault | failsafe | failover | same primary | longest window without an acknowledged write | split-brain writes | acknowledged lost |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{}\n",
        rows.join("\n")
    );
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("operator-failsafe.md"), &text);
    }
    eprintln!("{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_failsafe_keeps_the_primary_serving_through_a_lease_store_outage() {
    let began = Instant::now();
    let mut cluster = Cluster::start().await;
    eprintln!(
        "cluster Healthy after {}, primary {}",
        secs(began.elapsed()),
        cluster.primary
    );
    let mut rows = Vec::new();

    rows.push(outage::with_failsafe(&mut cluster).await);
    write_report(&rows);
    rows.push(api_cut::run(&cluster).await);
    write_report(&rows);
    let outage = std::env::var("PGRS_FAILSAFE_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(20), Duration::from_secs);
    rows.push(outage::without_failsafe(&mut cluster, outage).await);
    write_report(&rows);
    if std::env::var_os("PGRS_FAILSAFE_KEEP_EVIDENCE").is_some() {
        cluster.evidence.save();
    }
    eprintln!("the whole test took {}", secs(began.elapsed()));
}
