//! Rotation of the secrets on real processes (PostgreSQL 15, two `pgrs agent`s sharing the
//! secret files, as local mode's nodes share `secrets/`): the superuser password, the
//! replication password and the agent token change under a write load, with no restart. No
//! write fails, the new passwords work and the old superuser one is refused, a replica
//! reconnects with the new replication password, both tokens are accepted during the window,
//! and the agents' actions still work afterwards (a switchover: stop the primary, promote the
//! replica).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{SUPERUSER_PASSWORD, TOKEN, TestEnv};
use pgrs::protocol::api::{PromoteRequest, Role, StopMode, StopRequest};
use pgrs::protocol::client::AgentClient;

const BOOT: Duration = Duration::from_secs(90);
const SHORT: Duration = Duration::from_secs(30);

/// Replaces a secret file the way a kubelet does: a new file renamed over the old path.
fn rotate_file(path: &std::path::Path, value: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, format!("{value}\n")).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

async fn try_connect(port: u16, user: &str, password: &str) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.map(|_| ())
}

/// Polls until a login as `user` with `password` succeeds (`works`) or is refused.
async fn wait_login(port: u16, user: &str, password: &str, works: bool) {
    let deadline = Instant::now() + SHORT;
    loop {
        let result = try_connect(port, user, password).await;
        if result.is_ok() == works {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "login of {user} (expected to work: {works}) on port {port}: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_token_rotate_without_restart_or_failure() {
    let env = TestEnv::new("rotate");
    let mut a = env.agent("a").spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let mut b = env.agent("b").replica_of(&a).spawn();
    b.wait_streaming(BOOT).await;
    let (a_pid, b_pid) = (a.pid(), b.pid());

    // A write load on an application's long-lived connection.
    let sql = a.sql().await;
    sql.batch_execute("CREATE TABLE load (id bigint primary key)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (written, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (stop, written, failed) = (stop.clone(), written.clone(), failed.clone());
        tokio::spawn(async move {
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                match sql.execute("INSERT INTO load VALUES ($1)", &[&id]).await {
                    Ok(_) => written.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        eprintln!("write {id} failed: {error}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (new_superuser, new_replication, new_token) = ("su-rotated", "repl-rotated", "tok-rotated");
    rotate_file(&env.superuser_password_file, new_superuser);
    rotate_file(&env.replication_password_file, new_replication);
    rotate_file(&env.token_file, new_token);

    // The primary's agent changed the roles: new passwords work, the old superuser one not.
    let port = a.spec.pg_port;
    wait_login(port, "postgres", new_superuser, true).await;
    wait_login(port, "postgres", SUPERUSER_PASSWORD, false).await;
    wait_login(port, "replicator", new_replication, true).await;

    // Both tokens are accepted during the window; another one is not.
    let url = |agent: &common::AgentProcess| format!("http://127.0.0.1:{}", agent.spec.http_port);
    let with_token = |agent: &common::AgentProcess, token: &str| {
        AgentClient::new(url(agent), Some(token.to_string())).unwrap()
    };
    let deadline = Instant::now() + SHORT;
    while with_token(&b, new_token).status().await.is_err() {
        assert!(Instant::now() < deadline, "the new token is not accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for agent in [&a, &b] {
        with_token(agent, TOKEN)
            .status()
            .await
            .expect("old token within the window");
        with_token(agent, new_token)
            .status()
            .await
            .expect("new token");
        assert!(with_token(agent, "another").status().await.is_err());
    }

    // The replica reconnects with the new replication password (its passfile was rewritten).
    let replica_sql = {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(b.spec.pg_port)
            .user("postgres")
            .password(new_superuser)
            .dbname("postgres");
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    replica_sql
        .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_wal_receiver")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.client = with_token(&b, new_token);
    b.wait_streaming(SHORT).await;

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (written, failed) = (
        written.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert_eq!(failed, 0, "no write may fail during the rotation");
    assert!(written > 50, "the load wrote {written} rows");

    // The control loop keeps working with the new token: a switchover.
    a.client = with_token(&a, new_token);
    a.client
        .stop(&StopRequest {
            mode: StopMode::Fast,
        })
        .await
        .expect("stop the old primary");
    b.client
        .promote(&PromoteRequest {
            wait_seconds: Some(60),
        })
        .await
        .expect("promote the replica");
    b.wait_role(Role::Primary, SHORT).await;
    let count: i64 = replica_sql
        .query_one("SELECT count(*) FROM load", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count as u64, written,
        "every acknowledged write is on the new primary"
    );
    assert_eq!((a.pid(), b.pid()), (a_pid, b_pid), "no agent restarted");
    assert!(
        a.log()
            .contains("rotated passwords in place on the primary")
    );
}
