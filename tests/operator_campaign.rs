//! Issue 13, scenario 6: a seeded randomized campaign of network faults on one sync-mode
//! cluster (`examples/sync.yaml`: `ANY 1`, `dataDurability: required`, failsafe on by
//! default), under writers straight to every pod IP for the whole campaign
//! (`operator_support/writers.rs`), judged at the end by the Jepsen-style checker
//! `pgrs::chaos::check`: zero split-brain writes, zero acknowledged writes lost, no refused
//! write present.
//!
//! Each round draws one fault, a hold of 3–20 s and a direction, applies it, heals it after
//! the hold and waits until the cluster settled (Healthy 3/3, the Lease holder the named
//! primary, every other pod — every former primary — a ready replica in recovery, a
//! synchronous standby, writes flowing) before the next round. The faults
//! (`operator_campaign/faults.rs`):
//!
//! 1. the current primary cut from the API server only;
//! 2. the operator cut from the primary's agent (`Peer::HostPort(8008)`);
//! 3. the primary cut from both replicas only;
//! 4. the primary cut from everyone;
//! 5. kube-apiserver and etcd stopped (in a drawn order), then started again.
//!
//! Cuts go one way (inbound or outbound) or both, as drawn. After every round the history so
//! far is checked against the primary's rows, so that a violation stops the campaign with the
//! evidence of that moment (`target/pgrs-reports/evidence-campaign/`).
//!
//! By default (CI) the test runs 3 rounds with a seed derived from the date (days since
//! 1970-01-01, UTC), both printed. The full campaign, or a replay of a printed seed:
//!
//! ```sh
//! PGRS_CAMPAIGN_ROUNDS=24 PGRS_CAMPAIGN_SEED=<n> cargo test --test operator_campaign -- --nocapture
//! ```
//!
//! `PGRS_CAMPAIGN_FAULTS=1,4` draws from those faults only. The same seed and faults give the
//! same sequence; fewer rounds give a prefix of it. Figures:
//! `target/pgrs-reports/operator-failover-campaign.md`. The operator runs as a process on the
//! host with the admin kubeconfig. Needs the test-bed binaries (`testbed/build.sh`), root and
//! `iptables`.

#[path = "operator_campaign/faults.rs"]
mod faults;
mod operator_report;
mod operator_support;
#[path = "operator_campaign/round.rs"]
mod round;
#[path = "operator_campaign/summary.rs"]
mod summary;
#[path = "operator_support/writers.rs"]
mod writers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use operator_report::Report;
use operator_support::watch::Evidence;
use operator_support::*;
use pgrs::api::{PgReplicaSetStatus, SyncState, names};
use pgrs::chaos::{CheckReport, FinalState, check};
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, TestNamespace};

use faults::{Kind, Plan};
use round::RoundResult;
use writers::Writers;

const TEST: &str = "campaign";
const MANIFEST: &str = "examples/sync.yaml";
const CLUSTER: &str = "pg-sync";
/// The Lease duration of `examples/sync.yaml`.
const LEASE_SECONDS: u64 = 8;
const DEFAULT_ROUNDS: usize = 3;
/// The operator's leader-election identity, kept across its restarts as a pod name would be.
const OPERATOR_IDENTITY: &str = "pgrs-operator-0";

/// The operator as a process, under a fixed election identity: a restarted one resumes as the
/// leader at once, like a restarted operator pod (`POD_NAME`).
fn start_operator(bed: &TestBed, ns: &str) -> OperatorProcess {
    OperatorProcess::start_with(
        bed,
        ns,
        free_port(),
        &["--leader-election-identity", OPERATOR_IDENTITY],
    )
}

/// Whether an operator's log shows that it exited.
fn exited(log: &str) -> bool {
    log.lines().any(|line| {
        line.starts_with("error:") || line.contains("operator stopped") || line.contains("panicked")
    })
}

/// The campaign's parameters, from the environment.
struct Config {
    seed: u64,
    seed_from: &'static str,
    rounds: usize,
    kinds: Vec<Kind>,
}

impl Config {
    fn from_env() -> Config {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let (seed, seed_from) = match var("PGRS_CAMPAIGN_SEED") {
            Some(seed) => (
                seed.trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("PGRS_CAMPAIGN_SEED={seed}: {e}")),
                "PGRS_CAMPAIGN_SEED",
            ),
            None => {
                let since_epoch = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("a clock after 1970");
                (since_epoch.as_secs() / 86_400, "today's date")
            }
        };
        let rounds = var("PGRS_CAMPAIGN_ROUNDS").map_or(DEFAULT_ROUNDS, |r| {
            r.trim()
                .parse()
                .unwrap_or_else(|e| panic!("PGRS_CAMPAIGN_ROUNDS={r}: {e}"))
        });
        let kinds = var("PGRS_CAMPAIGN_FAULTS").map_or_else(
            || Kind::ALL.to_vec(),
            |list| {
                let mut kinds: Vec<Kind> = list
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse()
                            .ok()
                            .and_then(Kind::from_number)
                            .unwrap_or_else(|| panic!("PGRS_CAMPAIGN_FAULTS={list}: {n}?"))
                    })
                    .collect();
                kinds.sort();
                kinds.dedup();
                kinds
            },
        );
        Config {
            seed,
            seed_from,
            rounds,
            kinds,
        }
    }

    /// The command that replays this campaign.
    fn command(&self) -> String {
        let faults = if self.kinds == Kind::ALL {
            String::new()
        } else {
            let numbers: Vec<String> = self.kinds.iter().map(|k| k.number().to_string()).collect();
            format!("PGRS_CAMPAIGN_FAULTS={} ", numbers.join(","))
        };
        format!(
            "{faults}PGRS_CAMPAIGN_ROUNDS={} PGRS_CAMPAIGN_SEED={} cargo test --test \
             operator_campaign -- --nocapture",
            self.rounds, self.seed
        )
    }
}

/// The campaign's cluster: Healthy under writers to every pod IP, its operator, its namespace
/// (deleted on drop, after the evidence of a failure is kept).
pub struct Campaign {
    /// The operator processes: the first, then one per restart (`keep_operator_running`).
    pub evidence: Mutex<Evidence<'static>>,
    pub operator_restarts: AtomicUsize,
    _ns: TestNamespace<'static>,
    pub bed: &'static TestBed,
    pub ns: String,
    pub client: Client,
    /// Pod name → pod IP.
    pub ips: BTreeMap<String, String>,
    pub password: Login,
    /// The writers' clock.
    pub start: Instant,
    pub writers: Option<Writers>,
}

impl Campaign {
    /// Applies the sync example, waits until it is Healthy 3/3 with a synchronous standby,
    /// creates `t (id)` and starts the writers; returns it with the primary once the primary
    /// acknowledged 20 writes.
    async fn start() -> (Campaign, String) {
        let (bed, ns_guard, ns, client) = operator_test_namespace("op-campaign").await;
        let evidence = Evidence {
            bed,
            ns: ns.clone(),
            test: TEST,
            operators: vec![("operator", start_operator(bed, &ns))],
        };
        apply_repo_manifest(bed, &ns, MANIFEST);
        let primary = wait_three_ready_healthy(&client, &ns, CLUSTER, "cluster Healthy").await;
        eventually("a synchronous standby", Duration::from_secs(60), || async {
            let status = cluster_status(&client, &ns, CLUSTER).await?;
            status
                .instances
                .iter()
                .any(|i| matches!(i.sync_state, Some(SyncState::Sync | SyncState::Quorum)))
                .then_some(())
                .ok_or(format!("no synchronous standby: {:?}", status.instances))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let ips = pod_ips(&client, &ns, CLUSTER).await;
        assert_eq!(ips.len(), 3, "three pods with IPs: {ips:?}");
        let password = app_login(&client, &ns, CLUSTER).await;
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
        let campaign = Campaign {
            evidence: Mutex::new(evidence),
            operator_restarts: AtomicUsize::new(0),
            _ns: ns_guard,
            bed,
            ns,
            client,
            ips,
            password,
            start,
            writers: Some(writers),
        };
        (campaign, primary)
    }

    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Starts the operator again if it exited, as Kubernetes restarts an operator pod: the
    /// operator exits when it cannot renew its leader-election Lease for its renew deadline
    /// (10 s), e.g. through an API-server outage (`docs/kubernetes.md`). True if it did.
    pub fn keep_operator_running(&self) -> bool {
        let mut evidence = self.evidence.lock().expect("the operators");
        let (_, current) = evidence.operators.last().expect("an operator");
        let health = std::net::SocketAddr::from(([127, 0, 0, 1], current.health_port()));
        if std::net::TcpStream::connect_timeout(&health, Duration::from_millis(300)).is_ok()
            || !exited(&current.log())
        {
            return false;
        }
        let name: &'static str =
            Box::leak(format!("operator-{}", evidence.operators.len()).into_boxed_str());
        eprintln!(
            "the operator exited at {:.1} s; started again as {name}",
            self.now().as_secs_f64()
        );
        evidence
            .operators
            .push((name, start_operator(self.bed, &self.ns)));
        self.operator_restarts.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Keeps the evidence now (operator logs, pod logs, Leases, statuses, Events).
    pub fn save_evidence(&self) {
        self.evidence.lock().expect("the operators").save();
    }

    pub fn writers(&self) -> &Writers {
        self.writers.as_ref().expect("the writers run")
    }

    pub async fn status(&self) -> Result<PgReplicaSetStatus, String> {
        cluster_status(&self.client, &self.ns, CLUSTER).await
    }

    /// The holder of the database Lease.
    pub async fn lease_holder(&self) -> Result<Option<String>, String> {
        let lease = Api::<Lease>::namespaced(self.client.clone(), &self.ns)
            .get(&names::lease(CLUSTER))
            .await
            .map_err(|e| e.to_string())?;
        Ok(lease.spec.and_then(|s| s.holder_identity))
    }

    /// `pg_is_in_recovery()` of `pod`'s postgres, on a fresh session.
    pub async fn in_recovery(&self, pod: &str) -> Result<bool, String> {
        let ask = async {
            let db = connect(&self.ips[pod], &self.password).await?;
            let row = db
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| format!("{pod}: {e}"))?;
            Ok::<bool, String>(row.get(0))
        };
        tokio::time::timeout(Duration::from_secs(3), ask)
            .await
            .map_err(|_| format!("{pod}: no answer to pg_is_in_recovery() within 3 s"))?
    }

    /// Every id in `pod`'s `t`.
    async fn ids(&self, pod: &str) -> BTreeSet<i64> {
        connect(&self.ips[pod], &self.password)
            .await
            .unwrap_or_else(|e| panic!("connect to {pod}: {e}"))
            .query("SELECT id FROM t", &[])
            .await
            .unwrap_or_else(|e| panic!("read {pod}'s ids: {e}"))
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// The checker on the history so far against `primary`'s rows (read after the history was
    /// taken, so that every write acknowledged in it must be there).
    async fn check_so_far(&self, primary: &str) -> CheckReport {
        let writes = self.writers().records();
        let ids = self.ids(primary).await;
        check(
            &writes,
            &FinalState {
                primary: primary.to_string(),
                ids,
            },
            &[],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_campaign_of_network_faults_loses_no_acknowledged_write() {
    let config = Config::from_env();
    let kinds: Vec<u8> = config.kinds.iter().map(|k| k.number()).collect();
    eprintln!(
        "campaign: seed {} (from {}), {} rounds, faults {kinds:?}; replay with\n  {}",
        config.seed,
        config.seed_from,
        config.rounds,
        config.command()
    );
    let mut plan = Plan::new(config.seed, config.kinds.clone());
    let (mut c, mut primary) = Campaign::start().await;
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let mut results: Vec<RoundResult> = Vec::new();
    for index in 1..=config.rounds {
        let fault = plan.next_fault();
        let result = match round::run(&c, index, fault, &primary).await {
            Ok(result) => result,
            Err(e) => {
                summary::print_rounds(&results);
                panic!("seed {}: {e}", config.seed);
            }
        };
        eprintln!("{}\n{}", round::table_row(&result), round::detail(&result));
        primary = result.primary_after.clone();
        results.push(result);
        let so_far = c.check_so_far(&primary).await;
        let violations = so_far.violations(true);
        if !violations.is_empty() {
            summary::print_rounds(&results);
            eprintln!("{}", so_far.to_markdown());
            c.save_evidence();
            panic!(
                "seed {}: after round {index} ({}): {violations:?}",
                config.seed,
                fault.label()
            );
        }
    }

    // The end: stop the writers, read the final primary, check the whole history.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = c.writers.take().expect("the writers run").finish().await;
    let status = c.status().await.expect("the final status");
    let final_primary = status.current_primary.clone().expect("currentPrimary");
    let ids = c.ids(&final_primary).await;
    let report = check(
        &writes,
        &FinalState {
            primary: final_primary.clone(),
            ids: ids.clone(),
        },
        &[],
    );
    // Every replica replays the final primary's rows.
    let mut replicas_behind = Vec::new();
    for pod in c.ips.keys().filter(|p| **p != final_primary) {
        let caught_up = eventually(
            &format!("{pod} replays every row"),
            Duration::from_secs(60),
            || async {
                let count = c.ids(pod).await.len();
                (count == ids.len())
                    .then_some(())
                    .ok_or(format!("{count} of {} rows", ids.len()))
            },
        )
        .await;
        if let Err(e) = caught_up {
            replicas_behind.push(e);
        }
    }

    let table: Vec<String> = std::iter::once(round::TABLE_HEADER.to_string())
        .chain(results.iter().map(round::table_row))
        .collect();
    // Printed with the whole report below.
    let totals = summary::totals(&results);
    let mut notes = vec![
        format!(
            "Seed {} (from {}), {} rounds, faults {kinds:?}, holds {}–{} s; replay: `{}`.",
            config.seed,
            config.seed_from,
            config.rounds,
            faults::MIN_HOLD.as_secs(),
            faults::MAX_HOLD.as_secs(),
            config.command()
        ),
        table.join("\n"),
        totals.join("\n"),
        results
            .iter()
            .map(round::detail)
            .collect::<Vec<_>>()
            .join("\n\n"),
    ];
    notes.push(report.to_markdown());
    notes.push(summary::events(c.bed, &c.ns));
    Report {
        test: TEST,
        scenario: "a seeded randomized campaign of network faults (sync mode, ANY 1, required)",
        lease_seconds: LEASE_SECONDS,
        steps: Vec::new(),
        write_unavailable: results.iter().map(|r| r.window).max(),
        write_how: "the longest window without an acknowledged write (any pod) of any round",
        record: status.last_failover.clone(),
        fault_at: fault_wall,
        notes,
    }
    .write();

    let violations = report.violations(true);
    if !violations.is_empty() || !replicas_behind.is_empty() {
        c.save_evidence();
    }
    assert!(
        violations.is_empty(),
        "seed {}: checker violations: {violations:?}",
        config.seed
    );
    assert!(
        replicas_behind.is_empty(),
        "seed {}: replicas behind the final primary: {replicas_behind:?}",
        config.seed
    );
    assert!(
        report.acknowledged > 0 && report.split_brain.is_empty() && report.lost.is_empty(),
        "seed {}: {} acknowledged, {} split-brain, {} lost",
        config.seed,
        report.acknowledged,
        report.split_brain.len(),
        report.lost.len()
    );
}
