//! A frozen primary agent (SIGSTOP: it can neither renew its Lease nor answer) on the test bed:
//! its fencing watchdog stops postgres, the operator waits for the Lease to expire, promotes a
//! standby and moves `-rw`. No split brain: while it looks for the new primary the test keeps
//! writing to the old pod (its session, then fresh connections) and asserts that the old primary
//! accepted no write sent after the promotion was first seen, nor acknowledged one after the new
//! primary's first, watching for 5 s more. The acknowledged writes on the new primary are a
//! prefix of those of the old one (asynchronous replication may lose a suffix; the count is
//! reported). Once resumed, the old instance rejoins as a ready replica (the test does not check
//! how: rewind or re-clone).
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_report;
mod operator_support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use operator_support::faults::agent_pid;
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

/// A write the old primary acknowledged, with when it was sent and acknowledged (from the
/// freeze).
#[derive(Debug, Clone)]
struct OldWrite {
    id: i64,
    started: Duration,
    acked: Duration,
}

/// Inserts `id` on the old primary: on the kept session while it works, else on a fresh
/// connection (kept for the next write). True when acknowledged within a second.
async fn write_old(
    session: &mut Option<tokio_postgres::Client>,
    ip: &str,
    password: &Login,
    id: i64,
) -> bool {
    let insert = "INSERT INTO t VALUES ($1)";
    if let Some(db) = session.as_ref() {
        let write = tokio::time::timeout(Duration::from_secs(1), db.execute(insert, &[&id])).await;
        if matches!(write, Ok(Ok(_))) {
            return true;
        }
        *session = None;
        return false;
    }
    let fresh = tokio::time::timeout(Duration::from_secs(1), async {
        let db = connect(ip, password).await?;
        db.execute(insert, &[&id])
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(db)
    })
    .await;
    match fresh {
        Ok(Ok(db)) => {
            *session = Some(db);
            true
        }
        _ => false,
    }
}

/// Resumes the agent even when the test fails, so that the bed can stop the pod.
struct Frozen(i32);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_fenced_before_a_standby_is_promoted() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-frozen").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "basic cluster Healthy").await;
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let old_ip = ips[&primary].clone();
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let old_db = connect(&old_ip, &password)
        .await
        .expect("connect to the primary");
    old_db
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create a table");

    let pid = agent_pid(&ns_name, &primary).expect("the primary's agent process");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP the agent");
    let frozen = Frozen(pid);
    let frozen_at = Instant::now();
    let frozen_wall = k8s_openapi::jiff::Timestamp::now();
    let watched = operator_report::watch_failover(
        client.clone(),
        &ns_name,
        CLUSTER,
        &primary,
        frozen_at,
        Duration::from_secs(90),
    );

    // One loop, every 50 ms: a write on the old primary (on the session opened before the
    // freeze while it lasts, then on a fresh connection each time, as a client would retry),
    // and until a standby accepted a write, the status and a write on the primary it names. The
    // loop goes on for 5 s after the new primary's first write, so that a late acceptance on the
    // old one is caught too.
    let mut old_session = Some(old_db);
    let mut old_acks: Vec<OldWrite> = Vec::new();
    let mut attempted: i64 = 0;
    let mut new_seen: Option<(String, Duration)> = None;
    let mut first_new: Option<(String, String, Duration)> = None;
    loop {
        let elapsed = frozen_at.elapsed();
        assert!(
            elapsed < Duration::from_secs(90),
            "no standby accepted a write within 90 s (named: {new_seen:?})"
        );
        if let Some((_, _, first)) = &first_new
            && elapsed > *first + Duration::from_secs(5)
        {
            break;
        }
        attempted += 1;
        let id = attempted;
        let old_write = async {
            let started = frozen_at.elapsed();
            write_old(&mut old_session, &old_ip, &password, id)
                .await
                .then(|| OldWrite {
                    id,
                    started,
                    acked: frozen_at.elapsed(),
                })
        };
        let new_write = async {
            if first_new.is_some() {
                return None;
            }
            let status = cluster_status(&client, &ns_name, CLUSTER).await.ok()?;
            let current = status.current_primary.clone()?;
            if current == primary {
                return None;
            }
            let seen = frozen_at.elapsed();
            let ip = pod_ips(&client, &ns_name, CLUSTER)
                .await
                .get(&current)?
                .clone();
            let accepted = tokio::time::timeout(Duration::from_secs(2), async {
                let db = connect(&ip, &password).await?;
                db.execute("INSERT INTO t VALUES (-1)", &[])
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            let first = matches!(accepted, Ok(Ok(_))).then(|| frozen_at.elapsed());
            Some((current, ip, seen, first))
        };
        let (old_ack, new_attempt) = tokio::join!(old_write, new_write);
        old_acks.extend(old_ack);
        if let Some((current, ip, seen, first)) = new_attempt {
            new_seen.get_or_insert((current.clone(), seen));
            if let Some(first) = first {
                first_new = Some((current, ip, first));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (new_primary, new_ip, first_new_write) = first_new.expect("loop ends with a new primary");
    let last_old = old_acks
        .last()
        .cloned()
        .expect("the old primary accepted writes");
    let last_old_write = last_old.acked;
    let last_old_id = last_old.id;

    // No split brain: the old primary accepted no write that started after the promotion was
    // seen (by the status watcher or by this loop, whichever saw it first), and acknowledged
    // none after the new primary's first.
    let watched = watched.await.expect("the status watcher");
    let promoted_seen = [watched.promoted, new_seen.as_ref().map(|(_, at)| *at)]
        .into_iter()
        .flatten()
        .min()
        .expect("the promotion was seen");
    for write in &old_acks {
        assert!(
            write.started < promoted_seen,
            "split brain: the old primary accepted write {} started at {:?}, after the promotion was seen at {promoted_seen:?}",
            write.id,
            write.started
        );
    }
    assert!(
        last_old_write < first_new_write,
        "split brain: the old primary acknowledged writes until {last_old_write:?}, the new one from {first_new_write:?}"
    );

    // Retention (asynchronous replication: the new primary may miss the old one's last commits,
    // never one before a commit it has): the acknowledged writes it holds are a prefix of them.
    let new_db = connect(&new_ip, &password).await.expect("connect");
    let rows: Vec<i64> = new_db
        .query("SELECT id FROM t WHERE id > 0 ORDER BY id", &[])
        .await
        .expect("read the rows")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let kept = old_acks.iter().take_while(|w| rows.contains(&w.id)).count();
    let stray: Vec<i64> = old_acks[kept..]
        .iter()
        .map(|w| w.id)
        .filter(|id| rows.contains(id))
        .collect();
    assert!(
        stray.is_empty(),
        "the new primary holds acknowledged writes {stray:?} but not acknowledged write {} before them",
        old_acks[kept].id
    );
    assert!(
        rows.iter().all(|id| (1..=attempted).contains(id)),
        "rows nobody wrote: {rows:?}"
    );
    let count = kept;
    let acknowledged = old_acks.len();
    eprintln!(
        "operator, frozen primary agent: old primary acknowledged its last write after {} ms (id {last_old_id}), promotion seen after {} ms, {new_primary} accepted writes after {} ms; {count} of {acknowledged} writes acknowledged by the old primary are on the new one (asynchronous replication: a lost suffix is allowed, a hole is not)",
        last_old_write.as_millis(),
        promoted_seen.as_millis(),
        first_new_write.as_millis()
    );
    let rw_switched = wait_service_selects_only(
        &client,
        &ns_name,
        "pg-rw",
        &new_ip,
        "-rw moves to the new primary",
        Duration::from_secs(30),
        frozen_at,
    )
    .await;

    // Resumed, the old instance finds itself fenced and is brought back as a standby.
    drop(frozen);
    eventually(
        "the old primary rejoins",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let old = listed_instance(&status, &primary)?;
            match (&status.phase, old.role, old.ready) {
                (Some(Phase::Healthy), InstanceRole::Replica, true) => Ok(()),
                _ => Err(format!("{:?}: {:?}", status.phase, old)),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rejoined = frozen_at.elapsed();
    let record = cluster(&client, &ns_name, CLUSTER)
        .await
        .ok()
        .and_then(|c| c.status)
        .and_then(|s| s.last_failover);
    operator_report::Report {
        test: "frozen",
        scenario: "primary agent frozen (SIGSTOP): no renewal, no answer",
        lease_seconds: 8,
        steps: vec![
            operator_report::Step::detected(watched.detected),
            operator_report::Step {
                name: "fenced",
                after: Some(last_old_write),
                how: "the old primary refuses writes (its watchdog stopped postgres)",
            },
            operator_report::Step::promoted(watched.promoted),
            operator_report::Step {
                name: "first write on the new primary",
                after: Some(first_new_write),
                how: "first INSERT accepted on the new primary's pod IP",
            },
            operator_report::Step {
                name: "service switched",
                after: Some(rw_switched),
                how: "`-rw` EndpointSlice holds only the new primary's IP (polled after the write)",
            },
            operator_report::Step {
                name: "old primary rejoined",
                after: Some(rejoined),
                how: "resumed (SIGCONT) after the switch, then Healthy with it a ready replica",
            },
        ],
        write_unavailable: Some(first_new_write.saturating_sub(last_old_write)),
        write_how: "from the old primary's last accepted write to the new one's first",
        record,
        fault_at: frozen_wall,
        notes: vec![format!(
            "Write unavailability: from the old primary's last accepted write to the new \
             primary's first. {count} of {acknowledged} writes acknowledged by the old primary \
             are on the new one (asynchronous replication: the test asserts they are a prefix \
             of the acknowledged writes, not that none is lost)."
        )],
    }
    .write();
    drop(operator);
}
