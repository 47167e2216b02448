//! Fencing on real PostgreSQL: the primary's agent is frozen (SIGSTOP) so it cannot renew the
//! lease. Its postgres must be down before any replica is promoted — proven from timestamps the
//! test records itself and those of the controller's event log — no write may be accepted by two
//! nodes, and after SIGCONT the old primary rejoins as a replica.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{Cluster, accepts, now_ms, wall_ms};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgrs::local::chaos::{WriteLoad, prepare_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_down_before_any_promotion_and_rejoins_after_thaw() {
    let cluster = Cluster::up(1, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    let old = status.primary.clone().expect("primary");
    let old_port = cluster.node_port(&old);
    prepare_table(&cluster.write_conninfo())
        .await
        .expect("table");
    // A writer straight at the old primary (not through the endpoint): whatever it gets
    // acknowledged must be acknowledged before the new primary exists.
    let direct = WriteLoad::start(
        cluster.node_conninfo(&old),
        1_000_000_000,
        Duration::from_millis(5),
    );
    let through_endpoint = WriteLoad::start(cluster.write_conninfo(), 1, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let agent_pid =
        pgrs::local::layout::read_pid(&cluster.layout().agent_pid(&old)).expect("agent pid");
    let frozen_at = now_ms();
    kill(Pid::from_raw(agent_pid), Signal::SIGSTOP).expect("SIGSTOP");

    // Poll: when does the old postgres stop accepting connections, when does another serve?
    let mut postgres_down_at = None;
    let mut new_primary = None;
    let deadline = Instant::now() + Duration::from_secs(40);
    while new_primary.is_none() || postgres_down_at.is_none() {
        assert!(
            Instant::now() < deadline,
            "no failover within 40 s\n{}",
            cluster.controller_log_tail()
        );
        if postgres_down_at.is_none() && !accepts(old_port) {
            postgres_down_at = Some(now_ms());
        }
        if new_primary.is_none()
            && let Ok(status) = pgrs::local::cli::cluster_status(&cluster.dir).await
            && let Some(primary) = status.primary
            && primary != old
        {
            new_primary = Some((primary, now_ms()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let postgres_down_at = postgres_down_at.expect("down");
    let (new, serving_seen_at) = new_primary.expect("new primary");

    // The controller's own record of when it took the lease over and asked for the promotion.
    let events = cluster.events();
    let takeover = events
        .iter()
        .find(|e| {
            e["reason"] == "Action"
                && e["message"].as_str().is_some_and(|m| {
                    m.contains("AcquireLease") && m.contains(&format!("\"{new}\""))
                })
                && wall_ms(&e["at"]) > frozen_at
        })
        .expect("lease takeover event");
    let promote = events
        .iter()
        .find(|e| {
            e["reason"] == "Action"
                && e["message"].as_str().is_some_and(|m| m.contains("Promote"))
                && wall_ms(&e["at"]) > frozen_at
        })
        .expect("promote event");
    let takeover_at = wall_ms(&takeover["at"]);
    let promote_at = wall_ms(&promote["at"]);
    eprintln!(
        "frozen at 0 ms; old postgres down at +{} ms; lease taken over at +{} ms; promote at +{} ms; new primary seen at +{} ms",
        postgres_down_at - frozen_at,
        takeover_at - frozen_at,
        promote_at - frozen_at,
        serving_seen_at - frozen_at
    );
    assert!(
        postgres_down_at < takeover_at,
        "the old primary still accepted connections when the lease was taken over"
    );
    assert!(postgres_down_at < promote_at);
    // Not before the lease could have expired: 8 s unchanged on the controller's clock.
    assert!(
        takeover_at - frozen_at >= 8000 - 1000,
        "takeover after only {} ms",
        takeover_at - frozen_at
    );

    // No write accepted by two nodes: the direct writer's last acknowledgement precedes the
    // takeover (postgres was down by then); the endpoint writer continues on the new primary.
    let direct_records = direct.stop().await;
    let last_direct_ack = direct_records
        .iter()
        .filter(|r| r.acknowledged)
        .map(|r| r.finished)
        .max()
        .expect("direct writes");
    let last_direct_ack_ms = now_ms() - last_direct_ack.elapsed().as_millis() as i64;
    assert!(
        last_direct_ack_ms <= postgres_down_at + 50,
        "old primary acknowledged a write after it was seen down"
    );
    assert!(last_direct_ack_ms < takeover_at);
    let resumed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while through_endpoint.acknowledged_since(resumed) == 0 {
        assert!(
            Instant::now() < deadline,
            "writes through the endpoint did not resume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    through_endpoint.stop().await;

    // Thaw: the agent sees its deadline passed, stays fenced, and is rejoined as a replica.
    kill(Pid::from_raw(agent_pid), Signal::SIGCONT).expect("SIGCONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cluster.status().await;
        cluster.assert_single_primary().await;
        let node = status.nodes.iter().find(|n| n.name == old).expect("node");
        if node.role.as_deref() == Some("replica") && node.upstream.as_deref() == Some(new.as_str())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{old} did not rejoin after SIGCONT: {node:?}\n{}",
            cluster.controller_log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
