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

const CLUSTER: &str = "pg-sync";

/// The synchronous quorum the operator recorded in the control ConfigMap.
async fn recorded_quorum(client: &kube::Client, ns: &str) -> Result<String, String> {
    let name = names::control_state(CLUSTER);
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&name)
        .await
        .map_err(|e| format!("ConfigMap {name}: {e}"))?;
    let text = config_map
        .data
        .and_then(|d| d.get(names::CONTROL_STATE_KEY).cloned())
        .ok_or(format!("ConfigMap {name} has no state"))?;
    let state = ControlState::from_json(&text).map_err(|e| e.to_string())?;
    let quorum = state.memory.recorded_sync;
    quorum
        .is_synchronous()
        .then(|| quorum.to_standby_names())
        .ok_or(format!("no synchronous quorum recorded yet: {text}"))
}

/// `at - since` in milliseconds, negative before `since`.
fn signed_millis(at: Instant, since: Instant) -> i128 {
    if at >= since {
        at.duration_since(since).as_millis() as i128
    } else {
        -(since.duration_since(at).as_millis() as i128)
    }
}

/// How the failover ended.
#[derive(Debug, Clone)]
enum Outcome {
    /// A standby was promoted.
    FailedOver { to: String },
    /// The failover was refused: the status message and the Event.
    Refused { message: String, event: String },
}

/// When the leading operator dies in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaderKill {
    /// At the same instant as the primary.
    SameInstant,
    /// Once the status shows it noticed the primary's loss.
    MidFailover,
}

/// What one round measured (from its fault: the primary's kill).
#[derive(Debug, Clone)]
struct Round {
    kind: LeaderKill,
    old_primary: String,
    old_leader: String,
    new_leader: String,
    final_primary: String,
    outcome: Outcome,
    /// When the old leader was killed.
    leader_killed: Duration,
    took_over: Option<Duration>,
    detected: Option<Duration>,
    decided: Duration,
    writable: Option<Duration>,
    switched: Option<Duration>,
    first_write: Option<Duration>,
    unavailable: Option<Duration>,
    healthy_again: Duration,
    kills: usize,
    record: Option<pgrs::api::FailoverRecord>,
    fault: Instant,
    fault_wall: k8s_openapi::jiff::Timestamp,
}

/// Says what blocks a failover that never came: the database Lease, the phase and conditions,
/// the Events.
fn no_failover(
    bed: &TestBed,
    ns: &str,
    last_status: Option<&pgrs::api::PgReplicaSetStatus>,
) -> String {
    let holder = kubectl(
        bed,
        &[
            "get",
            "lease",
            &names::lease(CLUSTER),
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.holderIdentity} renewed {.spec.renewTime}",
        ],
    );
    let events: Vec<String> = event_lines(bed, ns)
        .lines()
        .filter(|l| !l.starts_with("Successful") && !l.starts_with("FailedUpdate"))
        .map(str::to_string)
        .collect();
    format!(
        "neither a new primary nor a refusal {} s after the fault (the cluster has had no primary since): the Lease {} is held by {holder}; phase {:?}, conditions {:?}; Events: {events:#?}",
        FAILOVER_LIMIT.as_secs(),
        names::lease(CLUSTER),
        last_status.and_then(|s| s.phase),
        last_status.map(|s| s
            .conditions
            .iter()
            .map(|c| format!("{}={}: {}", c.type_, c.status, c.message))
            .collect::<Vec<_>>())
    )
}

/// How long a round may take from the fault to a failover or a refusal: the election Lease,
/// then the database Lease on the new leader's clock, with room for a loaded machine.
const FAILOVER_LIMIT: Duration = Duration::from_secs(75);

/// One round: kills `primary`'s processes and the leading operator `old_leader` (as `kind`
/// says), waits for `new_leader` to lead and for the failover or its refusal, keeping the
/// killed pod down meanwhile, then for Healthy 3/3 with one primary.
#[allow(clippy::too_many_arguments)]
async fn round(
    bed: &TestBed,
    client: &kube::Client,
    ns: &str,
    operators: &mut Evidence<'_>,
    writer: &WriteLoad,
    ips: &BTreeMap<String, String>,
    primary: &str,
    (old_leader, new_leader, new_port): (&str, &str, u16),
    kind: LeaderKill,
) -> Round {
    let processes = pod_processes(ns, primary);
    assert!(
        processes.len() >= 5,
        "the agent, its watchdog, the postmaster and its children of {primary}: {processes:?}"
    );
    assert_eq!(
        metric(new_port, "pgrs_operator_reconciles_total")
            .await
            .expect("standby metrics"),
        0.0,
        "the standby operator {new_leader} must not reconcile while {old_leader} leads"
    );
    let old_key = old_leader.trim_start_matches("operator-").to_string();
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let fault = Instant::now();
    let mut leader_killed = None;
    if kind == LeaderKill::SameInstant {
        operators.operator(&old_key).kill();
        leader_killed = Some(fault.elapsed());
    }
    let killed = hard_kill(ns, primary);
    eprintln!(
        "sync leader loss, {kind:?}: SIGKILLed {killed} processes of {primary}{}",
        if kind == LeaderKill::SameInstant {
            format!(
                " and {old_leader} within {} µs",
                fault.elapsed().as_micros()
            )
        } else {
            String::new()
        }
    );

    // Watch: the election, the failover (or its refusal); keep the killed pod down meanwhile.
    let mut took_over = None;
    let mut detected = None;
    let mut kills = 1;
    let mut last_status: Option<pgrs::api::PgReplicaSetStatus> = None;
    let outcome = loop {
        if fault.elapsed() > FAILOVER_LIMIT {
            panic!("{}", no_failover(bed, ns, last_status.as_ref()));
        }
        if leader_killed.is_some()
            && took_over.is_none()
            && operator_leader(client, ns).await.as_deref() == Ok(new_leader)
        {
            took_over = Some(fault.elapsed());
        }
        let status = cluster_status(client, ns, CLUSTER)
            .await
            .unwrap_or_default();
        if detected.is_none() && status.phase.is_some() && status.phase != Some(Phase::Healthy) {
            detected = Some(fault.elapsed());
        }
        // Mid-failover: the leader has noticed the primary's loss (it waits for the Lease to
        // expire, or already fails over); it dies then.
        let noticed = matches!(
            status.phase,
            Some(Phase::PrimaryUnavailable | Phase::FailingOver | Phase::FailoverBlocked)
        );
        if leader_killed.is_none() && noticed {
            operators.operator(&old_key).kill();
            leader_killed = Some(fault.elapsed());
            eprintln!(
                "sync leader loss, {kind:?}: SIGKILLed {old_leader} {} ms after the primary, its status phase {:?}: {:?}",
                fault.elapsed().as_millis(),
                status.phase,
                status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == condition::READY)
                    .map(|c| c.message.clone())
            );
        }
        if let Some(current) = &status.current_primary
            && current != primary
        {
            break Outcome::FailedOver {
                to: current.clone(),
            };
        }
        if status.phase == Some(Phase::FailoverBlocked) {
            let message = status
                .conditions
                .iter()
                .find(|c| c.type_ == condition::FAILOVER_BLOCKED && c.status == "True")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            let events = event_lines(bed, ns);
            let event = events
                .lines()
                .find(|l| l.starts_with("FailoverRefused:"))
                .unwrap_or_default()
                .to_string();
            break Outcome::Refused { message, event };
        }
        let chosen = status
            .last_failover
            .as_ref()
            .is_some_and(|r| r.from.as_deref() == Some(primary) && r.to != primary);
        if !chosen && hard_kill(ns, primary) > 0 {
            kills += 1;
        }
        last_status = Some(status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let decided = fault.elapsed();
    let leader_killed = leader_killed.expect("the leader was killed before the failover");
    let took_over = took_over.or_else(|| Some(fault.elapsed()));
    assert_eq!(
        operator_leader(client, ns).await.as_deref(),
        Ok(new_leader),
        "the standby operator leads"
    );
    assert_eq!(
        metric(new_port, "pgrs_operator_leader")
            .await
            .expect("metrics"),
        1.0
    );

    let (final_primary, switched) = match &outcome {
        Outcome::FailedOver { to } => {
            eprintln!(
                "sync leader loss, {kind:?}: {new_leader} led after {} ms, failed over {primary} -> {to} after {} ms",
                took_over.unwrap_or_default().as_millis(),
                decided.as_millis()
            );
            let switched = wait_service_selects_only(
                client,
                ns,
                &format!("{CLUSTER}-rw"),
                &ips[to],
                "-rw moves to the new primary",
                Duration::from_secs(30),
                fault,
            )
            .await;
            (to.clone(), Some(switched))
        }
        Outcome::Refused { message, event } => {
            // Refusing is allowed, silently refusing is not.
            eprintln!(
                "sync leader loss, {kind:?}: failover refused after {} ms: condition {message:?}, event {event:?}",
                decided.as_millis()
            );
            assert!(
                !message.is_empty(),
                "FailoverBlocked without a FailoverBlocked condition saying why"
            );
            assert!(
                event.contains("refused"),
                "FailoverBlocked without a FailoverRefused Event: {}",
                event_lines(bed, ns)
            );
            // The way out the refusal names: the old primary comes back (no more kills).
            (primary.to_string(), None)
        }
    };

    // The killed pod restarts; the cluster is Healthy again with one primary and it a replica
    // (or, after a refusal, it the primary again).
    let status = eventually(
        "Healthy again, 3/3 ready",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(client, ns, CLUSTER).await?;
            let old = listed_instance(&status, primary)?;
            let wanted_role = if final_primary == primary {
                InstanceRole::Primary
            } else {
                InstanceRole::Replica
            };
            let primaries = status
                .instances
                .iter()
                .filter(|i| i.role == InstanceRole::Primary)
                .count();
            match (&status.phase, status.ready.as_deref(), old.role) {
                (Some(Phase::Healthy), Some("3/3"), role)
                    if role == wanted_role
                        && primaries == 1
                        && status.current_primary.as_deref() == Some(final_primary.as_str()) =>
                {
                    Ok(status.clone())
                }
                _ => Err(format!(
                    "{:?} {:?} {:?}: {:?}",
                    status.phase, status.ready, status.current_primary, status.instances
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let healthy_again = fault.elapsed();
    writer.wait_writes_resume_on(&ips[&final_primary]).await;
    let acked = writer.acked().await;
    let first_write = acked
        .iter()
        .filter(|(_, host, at)| *host == ips[&final_primary] && *at > fault)
        .map(|(_, _, at)| at.duration_since(fault))
        .min();
    let instants: Vec<Instant> = acked.iter().map(|(_, _, at)| *at).collect();
    Round {
        kind,
        old_primary: primary.to_string(),
        old_leader: old_leader.to_string(),
        new_leader: new_leader.to_string(),
        final_primary,
        outcome,
        leader_killed,
        took_over,
        detected,
        decided,
        writable: None,
        switched,
        first_write,
        unavailable: longest_gap(&instants, fault),
        healthy_again,
        kills,
        record: status.last_failover.clone(),
        fault,
        fault_wall,
    }
}

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
    let password = superuser_password(&client, &ns_name, CLUSTER).await;
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
