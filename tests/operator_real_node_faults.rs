//! Issue 14, "What to build" 3: faults on real containers. On a bed with one real node (kubelet,
//! containerd, runc, CNI bridge) and the chart installed with its defaults, `examples/sync.yaml`
//! (synchronous replication, `dataDurability: required`, 8 s Lease) under writers connected
//! straight to every pod's postgres (TLS, as the application owner), every attempt recorded for
//! the Jepsen-style checker `pgrs::chaos::check`:
//!
//! First, the partition tests' other cuts on a standby's real pod, proven with TCP connects from
//! inside its network namespace: cut from the API server (it still reaches the primary), cut
//! from the primary's IP (it still reaches the API server), healed (both again). Then:
//!
//! (a) the primary container's PID 1 is SIGKILLed from the host (found through the node's
//!     containerd: `RealNode::kill_container`) → the kubelet restarts the container (its
//!     `restartCount` goes up); the cluster is Healthy again with either the same primary
//!     (it came back before its Lease expired) or a new one and the old pod a replica; every
//!     write acknowledged so far is on the primary.
//! (b) the (then) primary pod is cut from everyone (`RealNode::pod_net` → iptables in the
//!     pod's CNI network namespace: API server, peers, the operator, the host and the
//!     kubelet's probes) → a standby is promoted after the Lease and acknowledges writes while
//!     the old primary is still cut, which acknowledges nothing sent after the cut; the cut is
//!     healed → it rejoins as a replica.
//!
//! At the end the checker runs over the whole history with the final primary's ids: no
//! split-brain write, no acknowledged write lost (synchronous mode), no refused write present.
//! Skipped, saying so, like `operator_real_node`, when the node is not built.

mod operator_support;
mod real_node_support;
#[path = "operator_support/writers.rs"]
mod writers;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs::chaos::{FinalState, WriteOutcome, check};
use pgrs_testbed::faults::{Direction, Peer};
use pgrs_testbed::wait::eventually;
use real_node_support::*;
use writers::{Healer, Writers};

const CLUSTER: &str = "pg-sync";
/// The database container of every instance pod (`pgrs::api::names::CONTAINER_NAME`).
const CONTAINER: &str = "postgres";
/// Writing goes on this long after the new primary acknowledged writes, before the heal.
const WRITE_AFTER_FAILOVER: Duration = Duration::from_secs(3);

async fn restart_count(client: &Client, ns: &str, pod: &str) -> i32 {
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get(pod)
        .await
        .expect("get the pod");
    pod.status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .find(|c| c.name == CONTAINER)
        .map_or(0, |c| c.restart_count)
}

/// The acknowledged ids of `writes` missing from `primary` now.
async fn missing_acknowledged(writers: &Writers, ip: &str, login: &Login) -> (usize, Vec<i64>) {
    let acked: Vec<i64> = writers
        .records()
        .iter()
        .filter(|r| r.outcome == WriteOutcome::Acknowledged)
        .map(|r| r.id)
        .collect();
    let rows = connect(ip, login)
        .await
        .expect("connect to the primary")
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&acked])
        .await
        .expect("read back");
    let found: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let missing = acked
        .iter()
        .copied()
        .filter(|id| !found.contains(id))
        .collect();
    (acked.len(), missing)
}

/// The partition tests' other cuts on a real pod, proven with TCP connects from inside a
/// standby's network namespace: cut from the API server (the `kubernetes` Service the pod
/// dials), it still reaches the primary; cut from the primary's IP, it still reaches the API
/// server; healed, both again. Returns how long it took.
fn cut_api_server_and_one_peer(
    node: &pgrs_testbed::node::RealNode,
    ns: &str,
    ips: &std::collections::BTreeMap<String, String>,
    primary: &str,
) -> Duration {
    let started = Instant::now();
    let standby = ips
        .keys()
        .find(|pod| *pod != primary)
        .expect("a standby")
        .clone();
    let net = node
        .pod_net(ns, &standby)
        .expect("the standby's network namespace");
    let _healer = Healer(net.clone());
    let primary_ip: std::net::Ipv4Addr = ips[primary].parse().expect("the primary's IP");
    let peer = std::net::SocketAddr::from((primary_ip, 5432));
    let api = net.api_address();
    let connects = |address| {
        net.tcp_connect(address, Duration::from_millis(700))
            .expect("connect from inside the standby's pod")
            .is_ok()
    };
    assert!(
        connects(api) && connects(peer),
        "{standby} reaches the API server at {api} and the primary at {peer}"
    );
    net.cut(Peer::ApiServer, Direction::Both)
        .expect("cut from the API server");
    assert!(
        !connects(api),
        "{standby} reaches the API server through the cut"
    );
    assert!(
        connects(peer),
        "{standby} lost the primary under an API-server cut"
    );
    net.heal(Peer::ApiServer, Direction::Both).expect("heal");
    assert!(
        connects(api),
        "{standby} does not reach the API server after the heal"
    );
    net.cut(Peer::Ip(primary_ip), Direction::Both)
        .expect("cut from the primary");
    assert!(
        !connects(peer),
        "{standby} reaches the primary through the cut"
    );
    assert!(
        connects(api),
        "{standby} lost the API server under a peer cut"
    );
    net.heal_all().expect("heal all");
    assert!(
        connects(peer),
        "{standby} does not reach the primary after the heal"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_containers_survive_sigkill_and_a_partition_without_losing_writes() {
    if let Some(why) = missing_binaries() {
        eprintln!(
            "SKIPPED real_containers_survive_sigkill_and_a_partition_without_losing_writes: \
             {why}; faults on real containers are not tested"
        );
        return;
    }
    let t0 = Instant::now();
    let real = start_with_chart().await;
    let (bed, client) = (real.bed, real.client.clone());
    let ns = real.db_ns.name().to_owned();
    let node = real.node();

    kubectl(
        bed,
        &[
            "apply",
            "-n",
            &ns,
            "-f",
            &repo_path("examples/sync.yaml").to_string_lossy(),
        ],
    );
    let (_, first_primary) = wait_healthy(&client, &ns, CLUSTER, "sync cluster Healthy").await;
    let healthy_done = t0.elapsed();
    let ips = pod_ips(&client, &ns, CLUSTER).await;
    assert_eq!(ips.len(), 3, "three pods with IPs: {ips:?}");
    let login = app_login(&client, &ns, CLUSTER).await;
    connect(&ips[&first_primary], &login)
        .await
        .expect("connect to the primary")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create a table");
    let cuts_proven = cut_api_server_and_one_peer(node, &ns, &ips, &first_primary);

    let start = Instant::now();
    let writers = Writers::start(&ips, &login, start);
    let flowing = |pod: String, what: &'static str| {
        let writers = &writers;
        async move {
            let before = writers.acknowledged_by(&pod);
            eventually(what, Duration::from_secs(60), || async {
                let acked = writers.acknowledged_by(&pod) - before;
                (acked >= 20)
                    .then_some(())
                    .ok_or(format!("{acked} more acknowledged by {pod}"))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    flowing(first_primary.clone(), "writes flow to the primary").await;

    // (a) SIGKILL PID 1 of the primary's container.
    let restarts = restart_count(&client, &ns, &first_primary).await;
    let killed_pid = node
        .kill_container(&ns, &first_primary, CONTAINER)
        .expect("kill the primary's container");
    let killed_at = Instant::now();
    eprintln!("SIGKILLed {first_primary}'s PID 1 (host pid {killed_pid})");
    let restarted = eventually(
        "the kubelet restarts the killed container",
        Duration::from_secs(60),
        || async {
            let now = restart_count(&client, &ns, &first_primary).await;
            let pid = node.container_pid(&ns, &first_primary, CONTAINER);
            match pid {
                Ok(pid) if now > restarts && pid != killed_pid => Ok(killed_at.elapsed()),
                other => Err(format!(
                    "restartCount {now} (was {restarts}), task {other:?}"
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, after_kill) =
        wait_healthy(&client, &ns, CLUSTER, "Healthy again after the SIGKILL").await;
    let kill_recovered = killed_at.elapsed();
    let failed_over = after_kill != first_primary;
    if failed_over {
        let old = listed_instance(&status, &first_primary).expect("the killed pod is listed");
        assert_eq!(old.role, InstanceRole::Replica, "{:?}", status.instances);
    }
    flowing(after_kill.clone(), "writes flow again after the SIGKILL").await;
    let (acked_a, missing_a) = missing_acknowledged(&writers, &ips[&after_kill], &login).await;
    assert!(
        missing_a.is_empty(),
        "acknowledged writes lost after the SIGKILL: {missing_a:?}"
    );
    eprintln!(
        "(a) SIGKILL: container restarted after {:.1}s, Healthy after {:.1}s with {} \
         ({}), {acked_a} writes acknowledged so far, 0 lost",
        restarted.as_secs_f64(),
        kill_recovered.as_secs_f64(),
        after_kill,
        if failed_over {
            "failover; the killed pod is a replica"
        } else {
            "the same primary: it came back before its Lease expired"
        },
    );

    // What the operator and the restarted agent did (for the report: a failover or not).
    eprintln!(
        "events after the SIGKILL:\n{}\n{first_primary}'s log since its restart (tail):\n{}",
        kubectl(
            bed,
            &[
                "get",
                "events",
                "-n",
                &ns,
                "--field-selector",
                "involvedObject.kind=PgReplicaSet",
                "-o",
                "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
            ],
        ),
        bed.kubectl()
            .args([
                "logs",
                "-n",
                &ns,
                &first_primary,
                "-c",
                CONTAINER,
                "--tail=12"
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    );

    // (b) Cut the primary from everyone.
    let old_primary = after_kill;
    let net = node
        .pod_net(&ns, &old_primary)
        .expect("the primary's network namespace");
    assert_eq!(net.ip().to_string(), ips[&old_primary], "the pod IP");
    let healer = Healer(net.clone());
    let cut_at = start.elapsed();
    net.cut(Peer::Everyone, Direction::Both).expect("cut");
    // A write sent while the rules went in may still be acknowledged: the cut is complete here.
    let cut_done = start.elapsed();
    eprintln!("cut {old_primary} ({}) from everyone", net.ip());
    let new_primary = eventually("a standby is promoted", Duration::from_secs(60), || async {
        let status = cluster_status(&client, &ns, CLUSTER).await?;
        match status.current_primary {
            Some(current) if current != old_primary => Ok(current),
            other => Err(format!("current primary {other:?}, {:?}", status.phase)),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let promoted = start.elapsed() - cut_at;
    // The new primary serves while the old one is still cut: synchronous commits need the
    // remaining standby to stream from it first.
    let acked_before = writers.acknowledged_by(&new_primary);
    eventually(
        "the new primary acknowledges writes during the partition",
        Duration::from_secs(30),
        || async {
            let acked = writers.acknowledged_by(&new_primary) - acked_before;
            (acked >= 5)
                .then_some(())
                .ok_or(format!("{acked} acknowledged by {new_primary}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let serving = start.elapsed() - cut_at;
    tokio::time::sleep(WRITE_AFTER_FAILOVER).await;
    let healed_at = start.elapsed();
    drop(healer);
    let status = eventually(
        "the cut primary rejoins as a replica",
        Duration::from_secs(90),
        || async {
            let status = cluster_status(&client, &ns, CLUSTER).await?;
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
    let rejoined = start.elapsed() - healed_at;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = writers.finish().await;

    let final_primary = status
        .current_primary
        .clone()
        .expect("status.currentPrimary");
    assert_eq!(
        final_primary, new_primary,
        "the promoted standby is still primary"
    );
    let ids: BTreeSet<i64> = connect(&ips[&final_primary], &login)
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
            primary: final_primary.clone(),
            ids,
        },
        &[],
    );
    eprintln!("{}", report.to_markdown());
    let violations = report.violations(true);
    assert!(violations.is_empty(), "checker violations: {violations:?}");
    let acked_after_cut = writes
        .iter()
        .filter(|w| w.node == old_primary && w.outcome == WriteOutcome::Acknowledged)
        .filter(|w| w.sent >= cut_done)
        .count();
    assert_eq!(
        acked_after_cut, 0,
        "{old_primary} acknowledged writes sent after it was cut from everyone"
    );
    let new_first_ack = writes
        .iter()
        .filter(|w| w.node == new_primary && w.sent > cut_at)
        .filter_map(|w| w.acknowledged_at())
        .min()
        .expect("the new primary acknowledged writes");
    eprintln!(
        "real-node faults: {}, sync cluster Healthy {:.1}s; API-server and peer cuts of a standby proven in \
         {:.1}s; (a) SIGKILL of {first_primary}'s \
         PID 1: container restarted {:.1}s, Healthy {:.1}s ({}); (b) {old_primary} cut from \
         everyone: {new_primary} primary after {:.1}s, its first acknowledged write {:.1}s \
         after the cut (5 writes by {:.1}s), healed after {:.1}s, rejoined as a replica {:.1}s after the heal; \
         {} writes, {} acknowledged, {} lost, {} split-brain; total {:.1}s",
        real.timings,
        (healthy_done - real.timings.operator).as_secs_f64(),
        cuts_proven.as_secs_f64(),
        restarted.as_secs_f64(),
        kill_recovered.as_secs_f64(),
        if failed_over {
            "failover"
        } else {
            "same primary"
        },
        promoted.as_secs_f64(),
        (new_first_ack - cut_at).as_secs_f64(),
        serving.as_secs_f64(),
        (healed_at - cut_at).as_secs_f64(),
        rejoined.as_secs_f64(),
        report.writes,
        report.acknowledged,
        report.lost.len(),
        report.split_brain.len(),
        t0.elapsed().as_secs_f64(),
    );
    real.stop();
}
