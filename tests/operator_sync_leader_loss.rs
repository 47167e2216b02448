//! The operator leader and the primary lost at the same instant, in synchronous mode
//! (`examples/sync.yaml`: `ANY 1` of the two standbys, `dataDurability: required`), under a
//! write load: zero acknowledged writes lost.
//!
//! Two operators take part in leader election (8 s election Lease, as in `operator_leader`).
//! Under a write load through `pg-sync-rw`, two rounds:
//!
//! 1. **same instant**: the test SIGKILLs the leading operator (no Lease release) and every
//!    process of the primary pod (agent, watchdog, postgres and its backends; no API call);
//! 2. **mid-failover**: with a fresh standby operator started, the new primary pod is
//!    hard-killed first, and the leading operator is SIGKILLed as soon as the status shows it
//!    has noticed (phase `PrimaryUnavailable`: it waits for the database Lease to expire, or
//!    already `FailingOver`).
//!
//! Each time the standby operator must take the election Lease over, read the recorded
//! synchronous quorum back from the control ConfigMap and then either fail over to a standby
//! that holds every acknowledged commit, or refuse and say why (a `FailoverBlocked` condition
//! and a `FailoverRefused` Event, e.g. `SyncRecordLost` or `QuorumUnreachable`): then the test
//! lets the old primary come back. The cluster must be Healthy 3/3 again before the next round.
//!
//! As in `operator_hardkill`, the killed pod's restarted processes are killed again until a
//! failover record names the old primary (or a refusal is seen): the restarted agent, still the
//! holder, would otherwise resume as primary before its Lease expires.
//!
//! Throughout, every pod's postgres is asked `pg_is_in_recovery()` every 200 ms: never two
//! writable primaries. At the end, every acknowledged id must be on the final primary.
//!
//! The operators run as processes with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_report;
mod operator_support;
#[path = "operator_sync_leader_loss/round.rs"]
mod round;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use operator_report::{Report, Step, longest_gap};
use operator_support::faults::{hard_kill, pod_processes};
use operator_support::watch::{
    ELECTION_LEASE_SECONDS, Evidence, PrimaryProbe, first_writable, metric, never_two_primaries,
    operator_leader, start_elected,
};
use operator_support::*;
use pgrs::api::{InstanceRole, Phase, SyncState, condition, names};
use pgrs::control::ControlState;
use pgrs_testbed::TestBed;
use pgrs_testbed::wait::eventually;
use round::*;

const CLUSTER: &str = "pg-sync";

/// Starts operator `identity` (key `key` in `operators`) and waits until its metrics answer,
/// as a standby; returns its port.
async fn start_standby(
    bed: &TestBed,
    ns: &str,
    operators: &mut Evidence<'_>,
    key: &'static str,
    identity: &str,
) -> u16 {
    let port = free_port();
    operators
        .operators
        .push((key, start_elected(bed, ns, identity, port)));
    eventually(
        &format!("{identity} runs as a standby"),
        Duration::from_secs(30),
        || async {
            let leading = metric(port, "pgrs_operator_leader").await?;
            (leading == 0.0)
                .then_some(())
                .ok_or(format!("leader={leading}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_loses_no_acknowledged_write_when_the_operator_leader_and_the_primary_die_together()
 {
    let started = Instant::now();
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-syncleader").await;
    let mut operators = Evidence {
        bed,
        ns: ns_name.clone(),
        test: "sync-leader-loss",
        operators: vec![("a", start_elected(bed, &ns_name, "operator-a", free_port()))],
    };
    eventually("operator-a leads", Duration::from_secs(30), || async {
        let holder = operator_leader(&client, &ns_name).await?;
        (holder == "operator-a")
            .then_some(())
            .ok_or(format!("held by {holder}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let port_b = start_standby(bed, &ns_name, &mut operators, "b", "operator-b").await;

    apply_repo_manifest(bed, &ns_name, "examples/sync.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "sync cluster Healthy").await;
    // Synchronous for real: a standby is a quorum member and the quorum is recorded.
    let quorum = eventually(
        "a synchronous standby and a recorded quorum",
        Duration::from_secs(60),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let sync = status
                .instances
                .iter()
                .filter(|i| matches!(i.sync_state, Some(SyncState::Sync | SyncState::Quorum)))
                .count();
            if sync == 0 {
                return Err(format!("no synchronous standby: {:?}", status.instances));
            }
            recorded_quorum(&client, &ns_name).await
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let db = connect(&ips[&primary], &password)
        .await
        .expect("connect to the primary");
    db.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create a table");
    let applied: String = db
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .expect("read synchronous_standby_names")
        .get(0);
    drop(db);
    eprintln!(
        "sync leader loss: primary {primary}, synchronous_standby_names = {applied}, recorded quorum {quorum} (cluster Healthy after {} ms)",
        started.elapsed().as_millis()
    );

    let writer = WriteLoad::start(
        client.clone(),
        ns_name.clone(),
        CLUSTER,
        password.clone(),
        1,
        "INSERT INTO t (id) VALUES ($1)",
    );
    writer.wait_writes_flow().await;
    // A few seconds of synchronous commits before the fault.
    eventually(
        "60 writes acknowledged",
        Duration::from_secs(30),
        || async {
            let count = writer.acked().await.len();
            (count >= 60)
                .then_some(())
                .ok_or(format!("{count} acknowledged"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let probe = PrimaryProbe::start(ips.clone(), password.clone());

    // Round 1: operator-a and the primary at the same instant; operator-b takes over.
    let first = round(
        bed,
        &client,
        &ns_name,
        &mut operators,
        &writer,
        &ips,
        &primary,
        ("operator-a", "operator-b", port_b),
        LeaderKill::SameInstant,
    )
    .await;
    // Round 2: a new standby; the new primary dies, then operator-b while it fails over.
    let port_c = start_standby(bed, &ns_name, &mut operators, "c", "operator-c").await;
    let second = round(
        bed,
        &client,
        &ns_name,
        &mut operators,
        &writer,
        &ips,
        &first.final_primary,
        ("operator-b", "operator-c", port_c),
        LeaderKill::MidFailover,
    )
    .await;
    let final_primary = second.final_primary.clone();

    let acked = writer.finish().await;
    let samples = probe.finish().await;
    never_two_primaries(&samples);
    let writable_at_end: Vec<String> = samples
        .iter()
        .rev()
        .find(|s| s.answered == ips.len())
        .map(|s| s.writable.clone())
        .unwrap_or_default();
    assert_eq!(
        writable_at_end,
        [final_primary.as_str()],
        "the last complete probe found these writable"
    );

    // Zero acknowledged writes lost.
    let final_db = connect(&ips[&final_primary], &password)
        .await
        .expect("connect to the final primary");
    let ids: Vec<i64> = acked.iter().map(|(id, _, _)| *id).collect();
    let present: BTreeSet<i64> = final_db
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&ids])
        .await
        .expect("read back")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost: Vec<&(i64, String, Instant)> = acked
        .iter()
        .filter(|(id, _, _)| !present.contains(id))
        .collect();
    let mut rounds = [first, second];
    for round in &mut rounds {
        round.writable = first_writable(&samples, &round.final_primary, round.fault);
        eprintln!(
            "sync leader loss, {:?}: {} killed after {} ms, {} led after {:?} ms; detected after {:?} ms; outcome {:?} after {} ms; new primary writable (probe) after {:?} ms; -rw switched after {:?} ms; first write on the final primary after {:?} ms; longest write gap {:?} ms; Healthy 3/3 after {} ms; {}'s processes killed {} times",
            round.kind,
            round.old_leader,
            round.leader_killed.as_millis(),
            round.new_leader,
            round.took_over.map(|d| d.as_millis()),
            round.detected.map(|d| d.as_millis()),
            round.outcome,
            round.decided.as_millis(),
            round.writable.map(|d| d.as_millis()),
            round.switched.map(|d| d.as_millis()),
            round.first_write.map(|d| d.as_millis()),
            round.unavailable.map(|d| d.as_millis()),
            round.healthy_again.as_millis(),
            round.old_primary,
            round.kills
        );
    }
    eprintln!(
        "sync leader loss: {} writes acknowledged, {} lost on the final primary {final_primary}; {} probes, never two writable; whole test {} s",
        acked.len(),
        lost.len(),
        samples.len(),
        started.elapsed().as_secs()
    );
    for round in &rounds {
        Report {
            test: match round.kind {
                LeaderKill::SameInstant => "sync-leader-loss",
                LeaderKill::MidFailover => "sync-leader-loss-mid-failover",
            },
            scenario: match round.kind {
                LeaderKill::SameInstant => {
                    "sync mode: operator leader and every process of the primary pod SIGKILLed at the same instant"
                }
                LeaderKill::MidFailover => {
                    "sync mode: every process of the primary pod SIGKILLed, then the operator leader once it noticed"
                }
            },
            lease_seconds: 8,
            steps: vec![
                Step {
                    name: "leader killed",
                    after: Some(round.leader_killed),
                    how: "SIGKILL of the leading operator",
                },
                Step {
                    name: "standby operator leads",
                    after: round.took_over,
                    how: "the election Lease names the standby",
                },
                Step::detected(round.detected),
                Step::promoted(matches!(round.outcome, Outcome::FailedOver { .. }).then_some(round.decided)),
                Step {
                    name: "service switched",
                    after: round.switched,
                    how: "`-rw` EndpointSlice holds only the new primary's IP",
                },
                Step {
                    name: "first write on the final primary",
                    after: round.first_write,
                    how: "first acknowledged INSERT through `-rw` after the fault",
                },
                Step {
                    name: "Healthy again",
                    after: Some(round.healthy_again),
                    how: "Healthy 3/3, one primary, the old one a ready replica",
                },
            ],
            write_unavailable: round.unavailable,
            write_how: "longest gap between acknowledged writes through `-rw`",
            record: round.record.clone(),
            fault_at: round.fault_wall,
            notes: vec![format!(
                "Synchronous replication (`{applied}`, dataDurability required); operator \
                 election Lease {ELECTION_LEASE_SECONDS} s. Outcome: {:?}. Over the whole test \
                 {} writes were acknowledged, {} of them are missing on the final primary \
                 {final_primary}.",
                round.outcome,
                acked.len(),
                lost.len()
            )],
        }
        .write();
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are missing on the final primary {final_primary}: {:?}",
        lost.len(),
        acked.len(),
        lost.iter()
            .map(|(id, host, at)| format!(
                "id {id} acked by {host} {} ms from the first fault",
                signed_millis(*at, rounds[0].fault)
            ))
            .collect::<Vec<_>>()
    );
    drop(operators);
}
