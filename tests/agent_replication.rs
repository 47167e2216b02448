//! Acceptance of `pgrs agent` on real PostgreSQL 15: bootstrap of a primary and two streaming
//! replicas; promotion, following the new timeline, and rejoin of the old primary by pg_rewind.

mod common;

use std::time::Duration;

use common::{AgentProcess, TestEnv};
use pgrs::protocol::api::{FollowRequest, PromoteRequest, RejoinPath, RejoinRequest, Role};

const BOOT: Duration = Duration::from_secs(90);
const SHORT: Duration = Duration::from_secs(30);

/// Starts a primary and two replicas and waits until both stream.
async fn three_node_cluster(env: &TestEnv) -> (AgentProcess, AgentProcess, AgentProcess) {
    let mut primary = env.agent("a").spawn();
    primary.wait_role(Role::Primary, BOOT).await;
    let mut b = env.agent("b").replica_of(&primary).spawn();
    let mut c = env.agent("c").replica_of(&primary).spawn();
    b.wait_streaming(BOOT).await;
    c.wait_streaming(BOOT).await;
    (primary, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_and_two_replicas_stream() {
    let env = TestEnv::new("stream");
    let (mut a, mut b, mut c) = three_node_cluster(&env).await;

    let sql = a.sql().await;
    sql.batch_execute(
        "CREATE TABLE t (id int primary key, note text); INSERT INTO t VALUES (1, 'hello')",
    )
    .await
    .unwrap();
    for replica in [&b, &c] {
        replica
            .wait_query("SELECT count(*) FROM t WHERE note = 'hello'", 1, SHORT)
            .await;
    }

    // Both replicas stream in the primary's pg_stat_replication and in the agent status.
    let rows = sql
        .query(
            "SELECT application_name, state FROM pg_stat_replication ORDER BY application_name",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        seen,
        vec![
            ("b".into(), "streaming".into()),
            ("c".into(), "streaming".into())
        ]
    );
    let status = a
        .wait_for("two streaming peers", SHORT, |s| {
            s.replication.len() == 2
                && s.replication
                    .iter()
                    .all(|p| p.state == pgrs::postgres::states::SenderState::Streaming)
        })
        .await;
    assert_eq!(status.role, Role::Primary);
    assert_eq!(status.timeline, Some(1));
    let current = status.current_lsn.expect("primary reports its current LSN");
    for peer in &status.replication {
        assert!(peer.replay_lsn.expect("replay LSN") <= current);
    }

    let b_status = b.wait_streaming(SHORT).await;
    assert_eq!(b_status.system_identifier, status.system_identifier);
    assert_eq!(b_status.in_recovery, Some(true));
    assert!(b_status.replay_lsn.is_some() && b_status.receive_lsn.is_some());
    assert_eq!(
        b_status
            .wal_receiver
            .as_ref()
            .and_then(|r| r.slot_name.clone()),
        Some("pgrs_b".into())
    );
    assert!(b_status.data_dir.standby_signal && b_status.data_dir.initialized);
    let c_status = c.wait_streaming(SHORT).await;
    assert_eq!(c_status.system_identifier, status.system_identifier);

    // One physical slot per replica on the primary, both active.
    let slots: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'physical' AND active \
             AND slot_name IN ('pgrs_b', 'pgrs_c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 2);

    // Checksums are on (pg_rewind needs them or wal_log_hints).
    let checksums: String = sql
        .query_one("SHOW data_checksums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checksums, "on");

    // Passwords never reach the logs or the status.
    for agent in [&a, &b, &c] {
        let log = agent.log();
        assert!(
            !log.contains(common::SUPERUSER_PASSWORD),
            "{}",
            agent.spec.name
        );
        assert!(
            !log.contains(common::REPLICATION_PASSWORD),
            "{}",
            agent.spec.name
        );
    }
    let json = serde_json::to_string(&status).unwrap();
    assert!(!json.contains(common::REPLICATION_PASSWORD));

    // Actions and the status need the token; the probes do not.
    let anonymous = pgrs::protocol::client::AgentClient::new(b.client.base_url(), None).unwrap();
    let refused = anonymous.status().await.unwrap_err();
    assert_eq!(refused.status().map(|s| s.as_u16()), Some(401));
    assert!(anonymous.healthz().await.is_ok());
    // `/readyz` answers from the agent's once-a-second look at postgres: it may still show the
    // start for up to a second after the status saw the replica streaming.
    let mut ready = anonymous.readyz().await;
    for _ in 0..50 {
        if ready.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        ready = anonymous.readyz().await;
    }
    assert_eq!(ready.expect("ready within 10 s").role, Role::Replica);
    let refused = anonymous
        .promote(&PromoteRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.status().map(|s| s.as_u16()), Some(401));

    // A crashed postgres is restarted by its agent and streams again.
    let pid = b_status.postgres_pid.expect("b's postmaster pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = b
        .wait_for("restart after a crash", BOOT, |s| {
            s.crash_restarts == 1
                && s.postgres_pid != Some(pid)
                && s.wal_receiver
                    .as_ref()
                    .is_some_and(|r| r.status.is_streaming())
        })
        .await;
    assert_eq!(restarted.role, Role::Replica);

    // SIGTERM: fast shutdown of postgres, then the agent exits cleanly.
    let exit = c.terminate(Duration::from_secs(20));
    assert!(exit.success(), "agent exit after SIGTERM: {exit}");
    assert!(c.log().contains("database system is shut down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_follow_and_rewind() {
    let env = TestEnv::new("failover");
    let (mut a, mut b, mut c) = three_node_cluster(&env).await;
    let a_sql = a.sql().await;
    a_sql
        .batch_execute(
            "CREATE TABLE t (id int primary key, phase text); INSERT INTO t VALUES (1, 'before')",
        )
        .await
        .unwrap();
    b.wait_query("SELECT count(*) FROM t", 1, SHORT).await;
    c.wait_query("SELECT count(*) FROM t", 1, SHORT).await;

    // The old primary is fenced (as the lease keeper would) and keeps no writer running.
    let fenced = a
        .client
        .fence(&pgrs::protocol::api::FenceRequest {
            reason: Some("test: lease lost".into()),
        })
        .await
        .unwrap();
    assert_eq!(fenced.status.role, Role::Fenced);
    assert!(!fenced.status.postgres_up);
    // A fenced agent refuses to start postgres until told to follow or rejoin.
    let refused = a.client.start().await.unwrap_err();
    assert_eq!(refused.status().map(|s| s.as_u16()), Some(409), "{refused}");

    // Promote b: new timeline.
    let promoted = b.client.promote(&PromoteRequest::default()).await.unwrap();
    assert_eq!(promoted.status.role, Role::Primary);
    assert_eq!(promoted.status.timeline, Some(2));
    let b_port = b.spec.pg_port;

    // c follows b on the new timeline.
    c.client
        .follow(&FollowRequest {
            host: "127.0.0.1".into(),
            port: b_port,
            slot: None,
        })
        .await
        .unwrap();
    c.wait_for("streaming from b on timeline 2", SHORT, |s| {
        s.wal_receiver.as_ref().is_some_and(|r| {
            r.status.is_streaming()
                && r.sender_port == Some(b_port as i32)
                && r.received_tli == Some(2)
        })
    })
    .await;

    // Write on the new primary, then rejoin the old primary.
    let b_sql = b.sql().await;
    b_sql
        .batch_execute("INSERT INTO t VALUES (2, 'after')")
        .await
        .unwrap();
    let rejoined = a
        .client
        .rejoin(&RejoinRequest {
            host: "127.0.0.1".into(),
            port: b_port,
            slot: None,
        })
        .await
        .unwrap();
    let report = rejoined.rejoin.expect("rejoin report");
    assert_eq!(report.path, RejoinPath::Rewind, "{report:?}\n{}", a.log());
    assert!(a.log().contains("pg_rewind"));
    let a_status = a.wait_streaming(SHORT).await;
    assert_eq!(a_status.timeline, Some(2));
    assert_eq!(
        a_status.last_rejoin.map(|r| r.path),
        Some(RejoinPath::Rewind)
    );
    assert_eq!(
        a_status.wal_receiver.and_then(|r| r.sender_port),
        Some(b_port as i32)
    );

    // Data written after the promotion is on all three.
    b_sql
        .batch_execute("INSERT INTO t VALUES (3, 'after rejoin')")
        .await
        .unwrap();
    for node in [&a, &b, &c] {
        node.wait_query("SELECT count(*) FROM t", 3, SHORT).await;
    }
    // b reports both as streaming peers.
    let b_status = b
        .wait_for("two streaming peers on b", SHORT, |s| {
            s.replication.len() == 2
                && s.replication
                    .iter()
                    .all(|p| p.state == pgrs::postgres::states::SenderState::Streaming)
        })
        .await;
    assert_eq!(b_status.timeline, Some(2));
}
