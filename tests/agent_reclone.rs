//! A former primary whose WAL back to the divergence point is gone cannot be rewound: the
//! agent re-clones it into a fresh directory, swaps it in, and says so in the status.

mod common;

use std::time::Duration;

use common::TestEnv;
use pgrs::protocol::api::{PromoteRequest, RejoinPath, RejoinRequest, Role};

const BOOT: Duration = Duration::from_secs(90);
const SHORT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn former_primary_without_wal_rejoins_by_reclone() {
    let env = TestEnv::new("reclone");
    // No WAL kept beyond what checkpoints need, so the old primary recycles its history.
    let mut a = env
        .agent("a")
        .arg("--wal-keep-size-mb=0")
        .arg("--parameter=min_wal_size=32MB")
        .arg("--parameter=max_wal_size=64MB")
        .spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let mut b = env.agent("b").replica_of(&a).spawn();
    b.wait_streaming(BOOT).await;

    let a_sql = a.sql().await;
    a_sql
        .batch_execute(
            "CREATE TABLE t (id int primary key, origin text); INSERT INTO t VALUES (1, 'common')",
        )
        .await
        .unwrap();
    b.wait_query("SELECT count(*) FROM t", 1, SHORT).await;

    // Split brain on purpose: b is promoted while a keeps accepting writes.
    let promoted = b.client.promote(&PromoteRequest::default()).await.unwrap();
    assert_eq!(promoted.status.timeline, Some(2));
    let b_sql = b.sql().await;
    b_sql
        .batch_execute("INSERT INTO t VALUES (2, 'new primary')")
        .await
        .unwrap();

    // a writes past the divergence and recycles every WAL segment back to it.
    a_sql
        .batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
        .await
        .unwrap();
    let first_segment: String = a_sql
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .unwrap()
        .get(0);
    for round in 0..6 {
        a_sql
            .batch_execute(&format!(
                "INSERT INTO t VALUES ({}, 'diverged'); SELECT pg_switch_wal(); CHECKPOINT;",
                100 + round
            ))
            .await
            .unwrap();
    }
    let segment_gone = !a.spec.data_dir.join("pg_wal").join(&first_segment).exists();
    assert!(
        segment_gone,
        "segment {first_segment} should have been recycled"
    );

    let rejoined = a
        .client
        .rejoin(&RejoinRequest {
            host: "127.0.0.1".into(),
            port: b.spec.pg_port,
            slot: None,
        })
        .await
        .unwrap_or_else(|e| panic!("rejoin failed: {e}\n{}", a.log()));
    let report = rejoined.rejoin.expect("rejoin report");
    assert_eq!(report.path, RejoinPath::Reclone, "{report:?}");
    let failure = report.rewind_failure.expect("why pg_rewind was not enough");
    assert!(failure.contains("pg_rewind failed"), "{failure}");
    assert!(
        failure.contains("could not find previous WAL record"),
        "{failure}"
    );

    let status = a.wait_streaming(SHORT).await;
    assert_eq!(
        status.last_rejoin.map(|r| r.path),
        Some(RejoinPath::Reclone)
    );
    assert_eq!(status.timeline, Some(2));

    // The re-cloned instance has the new primary's history, not a's diverged writes, and the
    // old directory was removed only after the swap.
    b_sql
        .batch_execute("INSERT INTO t VALUES (3, 'after rejoin')")
        .await
        .unwrap();
    a.wait_query("SELECT count(*) FROM t", 3, SHORT).await;
    a.wait_query("SELECT count(*) FROM t WHERE origin = 'diverged'", 0, SHORT)
        .await;
    let leftovers: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("a.pgrs-old") || name.starts_with("a.pgrs-reclone"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
