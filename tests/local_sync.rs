//! The data-loss checker in synchronous mode (`ANY 1` of the replicas): a writer records every
//! acknowledged insert through the write endpoint; after several hard-kill failovers every
//! acknowledged row is on the final primary.

mod local_support;

use std::time::Duration;

use local_support::Cluster;
use pgrs::local::chaos::{WriteLoad, missing_acknowledged, prepare_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_loses_no_acknowledged_write_over_repeated_failovers() {
    let cluster = Cluster::up(2, &["--sync"]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    assert!(status.sync);
    // The primary applies a quorum of its replicas.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster.status().await;
        if status
            .nodes
            .iter()
            .filter(|n| n.sync_state.as_deref() == Some("quorum"))
            .count()
            == 2
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas never became quorum standbys: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    prepare_table(&cluster.write_conninfo())
        .await
        .expect("table");
    let load = WriteLoad::start(cluster.write_conninfo(), 1, Duration::from_millis(1));
    const FAILOVERS: usize = 3;
    for round in 0..FAILOVERS {
        let status = cluster.wait_healthy(Duration::from_secs(90)).await;
        let old = status.primary.clone().expect("primary");
        tokio::time::sleep(Duration::from_millis(700 + 300 * round as u64)).await;
        pgrs::local::cli::kill_node(&cluster.dir, &old, true).expect("hard kill");
        let new = cluster
            .wait_new_primary(&old, Duration::from_secs(40))
            .await;
        eprintln!("round {round}: {old} -> {new}");
        cluster.assert_single_primary().await;
        cluster.restart(&old).await;
    }
    cluster.wait_healthy(Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
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
        "sync mode: {} acknowledged writes over {FAILOVERS} failovers, {} lost",
        acknowledged.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged writes lost in sync mode: {missing:?}"
    );
}
