//! Network partitions of the primary pod on the test bed (issue 13, scenarios 1 and 4), under
//! writers connected straight to every pod's postgres (not through `-rw`): a superseded primary
//! that still acknowledges writes is seen, and each pod's refusals mark where its terms as
//! primary end. The history goes through the Jepsen-style checker `pgrs::chaos::check`.
//!
//! 1. The primary pod is cut from the API server only (its clients still reach it), with the
//!    failsafe off (`spec.failover.failsafe: false`; with it on the primary keeps serving on its
//!    replicas' confirmations: `tests/operator_failsafe.rs`): its agent can no longer renew the
//!    Lease, so it must stop acknowledging writes before the operator promotes a standby once
//!    the Lease expired.
//! 2. The primary pod is cut from everyone (node lost): the operator fails over within the
//!    Lease duration plus a margin, and the cut pod never acknowledges a write again until it
//!    rejoined as a replica after the heal.
//!
//! Both heal the cut, wait until the old primary rejoined as a replica, read the final
//! primary's ids and assert no split-brain write. Lost acknowledged writes are counted, not
//! asserted absent (asynchronous replication). The operator runs as a process with the admin
//! kubeconfig. Needs the test-bed binaries (`testbed/build.sh`), root and `iptables`.

mod operator_report;
mod operator_support;
#[path = "operator_support/writers.rs"]
mod writers;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use operator_report::{Report, Step};
use operator_support::watch::Evidence;
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs::chaos::{CheckReport, FinalState, WriteOutcome, WriteRecord, check};
use pgrs_testbed::faults::{Direction, Peer};
use pgrs_testbed::wait::eventually;
use writers::{Healer, Writers};

const CLUSTER: &str = "pg";
const LEASE_SECONDS: u64 = 8;
/// Writing goes on this long after the status names the new primary, before the heal.
const WRITE_AFTER_FAILOVER: Duration = Duration::from_secs(3);

/// What a partition run saw, on the writers' clock (`Duration` since their start).
struct Run {
    old_primary: String,
    new_primary: String,
    cut_at: Duration,
    detected: Option<Duration>,
    /// When the status first named another primary (since the cut).
    promoted: Duration,
    healed_at: Duration,
    rejoined_at: Duration,
    writes: Vec<WriteRecord>,
    report: CheckReport,
    status: pgrs::api::PgReplicaSetStatus,
    /// The old primary's `pg_is_in_recovery()` at the end.
    old_in_recovery: bool,
    /// The old primary held every id of the final primary within 30 s of the final read.
    old_replays: bool,
}

impl Run {
    fn acks_of<'a>(&'a self, pod: &'a str) -> impl Iterator<Item = Duration> + 'a {
        self.writes
            .iter()
            .filter(move |w| w.node == pod)
            .filter_map(WriteRecord::acknowledged_at)
    }

    fn old_last_ack(&self) -> Option<Duration> {
        self.acks_of(&self.old_primary).max()
    }

    /// The new primary's first acknowledgement after the cut.
    fn new_first_ack(&self) -> Option<Duration> {
        self.acks_of(&self.new_primary)
            .filter(|at| *at >= self.cut_at)
            .min()
    }

    /// Old primary's last acknowledgement to the new primary's first, signed (ms).
    fn window_ms(&self) -> Option<i128> {
        Some(self.new_first_ack()?.as_millis() as i128 - self.old_last_ack()?.as_millis() as i128)
    }

    fn since_cut(&self, at: Option<Duration>) -> Option<Duration> {
        at.map(|a| a.saturating_sub(self.cut_at))
    }
}

/// The scenario: a healthy basic cluster under writers to every pod; `peer` cut from the
/// primary pod in both directions; wait for the new primary; write 3 s more; heal; wait
/// until the old primary rejoined; check the history.
async fn partition_run(prefix: &str, test: &'static str, peer: Peer) -> Run {
    let (bed, _ns, ns_name, client) = operator_test_namespace(prefix).await;
    let evidence = Evidence {
        bed,
        ns: ns_name.clone(),
        test,
        operators: vec![("operator", OperatorProcess::start(bed, &ns_name))],
    };

    let basic = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/basic.yaml"),
    )
    .expect("examples/basic.yaml");
    // The failsafe would keep a primary cut from the API server only serving (no failover):
    // this scenario is the fencing path without it.
    let manifest = if peer == Peer::ApiServer {
        basic.replace(
            "  replicas: 3\n",
            "  replicas: 3\n  failover:\n    failsafe: false\n",
        )
    } else {
        basic
    };
    assert!(manifest.contains("replicas: 3"), "{manifest}");
    apply_manifest_text(bed, &ns_name, &manifest);
    let old_primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    assert_eq!(ips.len(), 3, "three pods with IPs: {ips:?}");
    let password = app_login(&client, &ns_name, CLUSTER).await;
    connect(&ips[&old_primary], &password)
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
            let acked = writers.acknowledged_by(&old_primary);
            (acked >= 20)
                .then_some(())
                .ok_or(format!("{acked} acknowledged"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let net = bed
        .pod_net(&ns_name, &old_primary)
        .expect("the primary's network namespace");
    let healer = Healer(net.clone());
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let cut_at = start.elapsed();
    net.cut(peer, Direction::Both).expect("cut");
    eprintln!(
        "cut {old_primary} ({}) from {peer:?} at {} ms",
        net.ip(),
        cut_at.as_millis()
    );

    let mut detected = None;
    let new_primary = loop {
        let since = start.elapsed() - cut_at;
        assert!(
            since < Duration::from_secs(60),
            "no new primary 60 s after cutting {old_primary} from {peer:?}"
        );
        let status = cluster_status(&client, &ns_name, CLUSTER)
            .await
            .unwrap_or_default();
        if detected.is_none() && status.phase != Some(Phase::Healthy) {
            detected = Some(since);
        }
        if let Some(current) = status.current_primary
            && current != old_primary
        {
            break current;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let promoted = start.elapsed() - cut_at;
    eprintln!(
        "status names {new_primary} primary {} ms after the cut",
        promoted.as_millis()
    );
    tokio::time::sleep(WRITE_AFTER_FAILOVER).await;

    let healed_at = start.elapsed();
    drop(healer);
    eprintln!("healed at {} ms", healed_at.as_millis());
    let status = eventually(
        "the old primary rejoins as a replica",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let old = listed_instance(&status, &old_primary)?;
            match (&status.phase, status.ready.as_deref(), old.role, old.ready) {
                (Some(Phase::Healthy), Some("3/3"), InstanceRole::Replica, true) => {
                    Ok(status.clone())
                }
                _ => Err(format!("{:?} {:?}: {old:?}", status.phase, status.ready)),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rejoined_at = start.elapsed();
    // A moment of writes on the rejoined cluster, then the final read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = writers.finish().await;

    let final_primary = status
        .current_primary
        .clone()
        .expect("status.currentPrimary");
    let db = connect(&ips[&final_primary], &password)
        .await
        .expect("connect to the final primary");
    let ids: BTreeSet<i64> = db
        .query("SELECT id FROM t", &[])
        .await
        .expect("read the final primary's ids")
        .iter()
        .map(|row| row.get(0))
        .collect();
    // The old primary really follows the new one: in recovery, and it replays every id.
    let old_db = connect(&ips[&old_primary], &password)
        .await
        .expect("connect to the old primary");
    let old_in_recovery: bool = old_db
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("ask the old primary pg_is_in_recovery()")
        .get(0);
    let expected = ids.len() as i64;
    let old_replays = eventually(
        "the old primary replays the final primary's writes",
        Duration::from_secs(30),
        || async {
            let count: i64 = old_db
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            (count == expected)
                .then_some(())
                .ok_or(format!("{count} of {expected} rows"))
        },
    )
    .await
    .is_ok();
    let report = check(
        &writes,
        &FinalState {
            primary: final_primary,
            ids,
        },
        &[],
    );
    eprintln!("{}", report.to_markdown());
    if !report.violations(false).is_empty() {
        evidence.save();
    }
    Run {
        old_primary,
        new_primary,
        cut_at,
        detected,
        promoted,
        healed_at,
        rejoined_at,
        writes,
        report,
        status,
        old_in_recovery,
        old_replays,
    }
    .with_report(test, fault_wall, peer)
}

impl Run {
    /// Prints the figures and writes `target/pgrs-reports/operator-failover-<test>.md`.
    fn with_report(
        self,
        test: &'static str,
        fault_at: k8s_openapi::jiff::Timestamp,
        peer: Peer,
    ) -> Run {
        let window = self.window_ms();
        eprintln!(
            "old primary {} last acknowledged at {:?} ms, new primary {} first at {:?} ms: \
             window {window:?} ms",
            self.old_primary,
            self.old_last_ack().map(|d| d.as_millis()),
            self.new_primary,
            self.new_first_ack().map(|d| d.as_millis()),
        );
        let scenario = match peer {
            Peer::ApiServer => {
                "the primary pod cut from the API server only (clients still reach it)"
            }
            _ => "the primary pod cut from everyone (node lost)",
        };
        Report {
            test,
            scenario,
            lease_seconds: LEASE_SECONDS,
            steps: vec![
                Step::detected(self.detected),
                Step {
                    name: "old primary's last acknowledged write",
                    after: self.since_cut(self.old_last_ack()),
                    how: "last INSERT acknowledged by the old primary (writer to its pod IP)",
                },
                Step::promoted(Some(self.promoted)),
                Step {
                    name: "new primary's first acknowledged write",
                    after: self.since_cut(self.new_first_ack()),
                    how: "first INSERT acknowledged by the new primary (writer to its pod IP)",
                },
                Step {
                    name: "healed",
                    after: self.since_cut(Some(self.healed_at)),
                    how: "the cut removed",
                },
                Step {
                    name: "old primary rejoined",
                    after: self.since_cut(Some(self.rejoined_at)),
                    how: "Healthy, 3/3 ready, the old primary a ready replica",
                },
            ],
            write_unavailable: self.report.longest_gap.map(|g| g.length()),
            write_how: "longest gap between acknowledged writes (any pod), from the checker",
            record: self.status.last_failover.clone(),
            fault_at,
            notes: vec![
                format!(
                    "Old primary `{}`'s last acknowledged write to new primary `{}`'s first: {} \
                     (negative: both acknowledged at once).",
                    self.old_primary,
                    self.new_primary,
                    window.map_or("—".to_string(), |w| format!("{w} ms"))
                ),
                self.report.to_markdown(),
            ],
        }
        .write();
        self
    }
}

/// The assertions both scenarios share.
fn assert_common(run: &Run) {
    assert_ne!(run.new_primary, run.old_primary, "a new primary exists");
    assert!(
        run.report.split_brain.is_empty(),
        "split-brain writes (acknowledged by a superseded primary): {:#?}",
        run.report.split_brain
    );
    let violations = run.report.violations(false);
    assert!(violations.is_empty(), "checker violations: {violations:?}");
    assert_eq!(
        run.status.current_primary.as_deref(),
        Some(run.new_primary.as_str()),
        "the new primary is still the primary once the old one rejoined"
    );
    let old = listed_instance(&run.status, &run.old_primary).expect("the old primary listed");
    assert!(
        old.role == InstanceRole::Replica && old.ready,
        "the old primary rejoined as a ready replica: {old:?}"
    );
    assert!(
        run.old_in_recovery && run.old_replays,
        "the old primary {} follows the new one: in recovery {}, replays its writes {}",
        run.old_primary,
        run.old_in_recovery,
        run.old_replays
    );
    let new_first = run
        .new_first_ack()
        .expect("the new primary acknowledged writes");
    let after: Vec<&WriteRecord> = run
        .writes
        .iter()
        .filter(|w| w.node == run.old_primary && w.outcome == WriteOutcome::Acknowledged)
        .filter(|w| w.answered >= new_first)
        .collect();
    assert!(
        after.is_empty(),
        "the old primary {} acknowledged {} writes after the new primary's first \
         acknowledgement at {} ms: {after:#?}",
        run.old_primary,
        after.len(),
        new_first.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_primary_stops_acknowledging_before_a_replica_is_promoted() {
    let run = partition_run("op-part-api", "partition-api", Peer::ApiServer).await;
    assert_common(&run);
    let (old_last, new_first) = (
        run.old_last_ack()
            .expect("the old primary acknowledged writes"),
        run.new_first_ack()
            .expect("the new primary acknowledged writes"),
    );
    assert!(
        old_last < new_first,
        "the old primary stopped acknowledging ({} ms) before the new primary's first \
         acknowledgement ({} ms)",
        old_last.as_millis(),
        new_first.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_pod_is_failed_over_and_never_serves_again_until_it_rejoined() {
    let run = partition_run("op-part-node", "partition-node", Peer::Everyone).await;
    assert!(
        run.promoted <= Duration::from_secs(20),
        "failover within the Lease ({LEASE_SECONDS} s) plus a margin (20 s): took {} ms",
        run.promoted.as_millis()
    );
    assert_common(&run);
}
