//! A frozen primary agent (SIGSTOP: it can neither renew its Lease nor answer) on the test bed:
//! its fencing watchdog stops postgres, the operator waits for the Lease to expire, promotes a
//! standby and moves `-rw`; the old primary stopped accepting writes before the new one
//! accepted any (no split brain). Once resumed, the old instance rejoins as a standby.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_report;
mod operator_support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

/// The pid of the `pgrs agent` process of pod `pod` in namespace `ns` (not its watchdog).
fn agent_pid(ns: &str, pod: &str) -> Option<i32> {
    let wanted_name = format!("PGRS_NAME={pod}");
    let wanted_ns = format!("PGRS_NAMESPACE={ns}");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) != Some(&b"agent".as_slice()) {
            return None;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        (vars.contains(&wanted_name.as_bytes()) && vars.contains(&wanted_ns.as_bytes()))
            .then_some(pid)
    })
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
    let password = superuser_password(&client, &ns_name, CLUSTER).await;
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

    // Keep writing on the old primary until it refuses: that is when it was fenced.
    let mut id: i64 = 0;
    let last_old_write = loop {
        id += 1;
        let write = tokio::time::timeout(
            Duration::from_secs(2),
            old_db.execute("INSERT INTO t VALUES ($1)", &[&id]),
        )
        .await;
        match write {
            Ok(Ok(_)) => {}
            _ => break frozen_at.elapsed(),
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(30),
            "the frozen primary still accepts writes after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let last_old_id = id - 1;

    // A standby takes over; its first write comes after the old primary's last one.
    let (new_primary, new_ip, first_new_write) =
        eventually("a standby is promoted", Duration::from_secs(60), || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            let current = status.current_primary.clone().ok_or("no primary")?;
            if current == primary {
                return Err("still the old primary".to_string());
            }
            let ip = pod_ips(&client, &ns_name, CLUSTER).await[&current].clone();
            let db = connect(&ip, &password).await?;
            db.execute("INSERT INTO t VALUES (-1)", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok((current, ip, frozen_at.elapsed()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        last_old_write < first_new_write,
        "split brain: the old primary accepted writes until {last_old_write:?}, the new one from {first_new_write:?}"
    );
    let new_db = connect(&new_ip, &password).await.expect("connect");
    let count: i64 = new_db
        .query_one(
            "SELECT count(*) FROM t WHERE id BETWEEN 1 AND $1",
            &[&last_old_id],
        )
        .await
        .expect("count")
        .get(0);
    eprintln!(
        "operator, frozen primary agent: old primary refused writes after {} ms, {new_primary} accepted writes after {} ms; {count} of {last_old_id} writes acknowledged by the old primary are on the new one (asynchronous replication)",
        last_old_write.as_millis(),
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
    let watched = watched.await.expect("the status watcher");
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
             primary's first. {count} of {last_old_id} writes acknowledged by the old primary \
             are on the new one (asynchronous replication)."
        )],
    }
    .write();
    drop(operator);
}
