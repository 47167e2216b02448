//! Issue 12, hole 1, on real processes: a promoted instance is fenced from the moment its
//! promotion is signalled. A planned switchover; the target's agent is frozen (SIGSTOP) the
//! moment `pg_is_in_recovery()` turns false on the target, i.e. inside its post-promotion work.
//! Its watchdog must stop the new primary within renew deadline + shutdown budget of the last
//! lease confirmation, before any other node is promoted: never two writable primaries.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{Cluster, accepts};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_postgres::NoTls;

/// Default timings: renew deadline 5 s + shutdown budget 2 s.
const FENCED_WITHIN: Duration = Duration::from_millis(7000 + 700);

async fn is_writable_primary(conninfo: &str) -> bool {
    let connect = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_postgres::connect(conninfo, NoTls),
    )
    .await;
    let Ok(Ok((client, connection))) = connect else {
        return false;
    };
    tokio::spawn(connection);
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            client.query_one("SELECT pg_is_in_recovery()", &[])
        )
        .await,
        Ok(Ok(row)) if !row.get::<_, bool>(0)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_frozen_inside_its_post_promotion_work_is_fenced_by_its_watchdog() {
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    let old = status.primary.clone().expect("primary");
    let target = status
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != old)
        .expect("a replica");
    let others: Vec<String> = status
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != target)
        .collect();
    let target_port = cluster.node_port(&target);
    let (watcher, connection) = tokio_postgres::connect(&cluster.node_conninfo(&target), NoTls)
        .await
        .expect("connect to the target");
    tokio::spawn(connection);
    let agent_pid =
        pgrs::local::layout::read_pid(&cluster.layout().agent_pid(&target)).expect("agent pid");

    let dir = cluster.dir.clone();
    let to = target.clone();
    let switching = tokio::spawn(async move {
        pgrs::local::cli::switchover(&dir, Some(to), Duration::from_secs(40)).await
    });
    let asked = Instant::now();
    loop {
        let row = watcher
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("query the target");
        if !row.get::<_, bool>(0) {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "{target} never left recovery\n{}",
            cluster.controller_log_tail()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    kill(Pid::from_raw(agent_pid), Signal::SIGSTOP).expect("SIGSTOP");
    let frozen = Instant::now();
    eprintln!(
        "{target} left recovery {} ms after the switchover request; its agent is frozen",
        asked.elapsed().as_millis()
    );

    // Watch: when does the target stop accepting connections, does another node serve as a
    // writable primary meanwhile?
    let mut target_down = None;
    let mut other_primary = None;
    while frozen.elapsed() < Duration::from_secs(20) && target_down.is_none() {
        if !accepts(target_port) {
            target_down = Some(frozen.elapsed());
        }
        for node in &others {
            if other_primary.is_none() && is_writable_primary(&cluster.node_conninfo(node)).await {
                other_primary = Some((node.clone(), frozen.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(Pid::from_raw(agent_pid), Signal::SIGCONT).expect("SIGCONT");
    switching.abort();
    eprintln!("target down {target_down:?} after the freeze; other primary: {other_primary:?}");
    let target_down = target_down.unwrap_or_else(|| {
        panic!(
            "{target} still accepts connections 20 s after its agent froze (other primary: {other_primary:?})\n{}",
            cluster.controller_log_tail()
        )
    });
    assert!(
        other_primary.is_none(),
        "two writable primaries: {target} and {other_primary:?}"
    );
    assert!(
        target_down <= FENCED_WITHIN,
        "{target} stopped {} ms after the freeze; renew deadline + shutdown budget is 7000 ms",
        target_down.as_millis()
    );
}
