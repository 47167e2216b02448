//! `pgrs local` end to end on real PostgreSQL: a hard kill of the primary (agent and postgres,
//! SIGKILL) under a continuous write load through the write endpoint, a graceful stop and a
//! planned switchover; the old primary rejoins each time; acknowledged writes are checked.

mod local_support;

use std::time::{Duration, Instant};

use local_support::Cluster;
use pgrs::local::chaos::{WriteLoad, missing_acknowledged, prepare_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_write_load_rejoin_graceful_stop_and_switchover() {
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    let first = status.primary.clone().expect("primary");
    prepare_table(&cluster.write_conninfo())
        .await
        .expect("table");
    let load = WriteLoad::start(cluster.write_conninfo(), 1, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        load.acknowledged_since(Instant::now() - Duration::from_secs(5)) > 0,
        "no write got through the endpoint"
    );

    // 1. kill -9 of the primary's agent and postgres.
    let message = pgrs::local::cli::kill_node(&cluster.dir, &first, true).expect("hard kill");
    assert!(message.contains("SIGKILL"), "{message}");
    let killed_at = Instant::now();
    let second = cluster
        .wait_new_primary(&first, Duration::from_secs(40))
        .await;
    eprintln!(
        "hard kill: {second} serves {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
    cluster.assert_single_primary().await;
    let after_failover = Instant::now();
    let reconnect_deadline = Instant::now() + Duration::from_secs(20);
    while load.acknowledged_since(after_failover) == 0 {
        assert!(
            Instant::now() < reconnect_deadline,
            "writers did not reconnect through the write endpoint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejoin = cluster.restart(&first).await;
    eprintln!("hard kill: {first} rejoined in {} ms", rejoin.as_millis());
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(status.primary.as_deref(), Some(second.as_str()));
    let rejoined = status.nodes.iter().find(|n| n.name == first).expect("node");
    assert_eq!(rejoined.role.as_deref(), Some("replica"));
    assert_eq!(rejoined.upstream.as_deref(), Some(second.as_str()));
    let events = cluster.events();
    assert!(
        events.iter().any(|e| e["reason"] == "rejoin"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&first) && m.contains("rejoined"))),
        "no rejoin of {first} recorded"
    );

    // 2. Graceful stop (SIGTERM to the agent): the lease is released, no expiry wait.
    let stopped_at = Instant::now();
    pgrs::local::cli::kill_node(&cluster.dir, &second, false).expect("graceful stop");
    let third = cluster
        .wait_new_primary(&second, Duration::from_secs(20))
        .await;
    eprintln!(
        "graceful stop: {third} serves {} ms after SIGTERM",
        stopped_at.elapsed().as_millis()
    );
    cluster.assert_single_primary().await;
    cluster.restart(&second).await;
    cluster.wait_healthy(Duration::from_secs(60)).await;

    // 3. Planned switchover to a chosen node.
    let target = if first != third {
        first.clone()
    } else {
        second.clone()
    };
    let (plan, took) =
        pgrs::local::cli::switchover(&cluster.dir, Some(target.clone()), Duration::from_secs(30))
            .await
            .expect("switchover");
    assert_eq!(plan.from, third);
    assert_eq!(plan.to, target);
    eprintln!("switchover {third} -> {target}: {} ms", took.as_millis());
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(status.primary.as_deref(), Some(target.as_str()));

    // Every acknowledged write is looked up on the final primary; in async mode the count of
    // lost ones is reported (a hard kill may lose the last unreplicated commits).
    let records = load.stop().await;
    let acknowledged: Vec<i64> = records
        .iter()
        .filter(|r| r.acknowledged)
        .map(|r| r.id)
        .collect();
    assert!(
        acknowledged.len() > 50,
        "too few writes: {}",
        acknowledged.len()
    );
    let missing = missing_acknowledged(&cluster.write_conninfo(), &acknowledged)
        .await
        .expect("check");
    eprintln!(
        "async mode: {} acknowledged writes, {} lost: {:?}",
        acknowledged.len(),
        missing.len(),
        missing
    );
    // Graceful stop and switchover wait for the target to have all WAL: losses can only come
    // from the hard kill, whose ids are all before the graceful stop.
    let graceful_ids: Vec<i64> = records
        .iter()
        .filter(|r| r.acknowledged && r.started >= stopped_at)
        .map(|r| r.id)
        .collect();
    assert!(
        missing.iter().all(|id| !graceful_ids.contains(id)),
        "writes lost after a planned stop: {missing:?}"
    );
}
