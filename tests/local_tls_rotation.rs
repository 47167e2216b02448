//! `pgrs local` on real PostgreSQL: TLS and rotation without a restart.
//!
//! TLS: the nodes serve the certificate under `<dir>/tls`; a client trusting only that CA
//! verifies it as `localhost`; every replication connection is encrypted.
//! Rotation: the token and the superuser password change in `<dir>/secrets/` while the cluster
//! runs; the controller and the agents pick them up (no restart of anything): a switchover
//! afterwards works, the new password logs in and the old one is refused.

mod local_support;

use std::time::{Duration, Instant};

use local_support::{Cluster, pgrs};

fn rotate_file(path: &std::path::Path, value: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, format!("{value}\n")).expect("write the new secret");
    std::fs::rename(&staged, path).expect("rename it into place");
}

async fn login(port: u16, password: &str, ca_pem: &str) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr(std::net::IpAddr::from([127, 0, 0, 1]))
        .port(port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .channel_binding(tokio_postgres::config::ChannelBinding::Require)
        .connect_timeout(Duration::from_secs(5));
    let tls = pgrs::tls::client_config(ca_pem, None).map_err(|e| e.to_string())?;
    let (client, connection) = config
        .connect(pgrs::tls::postgres_connector(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_and_secrets_rotate_without_a_restart() {
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    let primary = status.primary.clone().expect("a primary");
    let layout = cluster.layout();
    let ca_pem = std::fs::read_to_string(cluster.dir.join("tls/ca.crt")).expect("tls/ca.crt");
    let old_password = cluster.superuser_password();
    let port = cluster.node_port(&primary);

    // TLS, verified as localhost; every walsender encrypted.
    let session = login(port, &old_password, &ca_pem)
        .await
        .expect("a verified session");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = session
            .query(
                "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
                &[],
            )
            .await
            .expect("pg_stat_replication");
        let ssl: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
        if ssl.len() == 2 && ssl.iter().all(|s| *s) {
            break;
        }
        assert!(Instant::now() < deadline, "walsenders (ssl): {ssl:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other = pgrs::tls::Authority::generate("other", Duration::from_secs(86_400)).expect("a CA");
    assert!(
        login(port, &old_password, other.cert_pem()).await.is_err(),
        "a certificate verified against another CA"
    );
    drop(session);

    // Rotation: the token and the superuser password, no restart.
    let pids: Vec<String> = ["node0", "node1", "node2"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(cluster.dir.join(format!("nodes/{n}/agent.pid")))
                .unwrap_or_default()
        })
        .collect();
    let controller_pid =
        std::fs::read_to_string(cluster.dir.join("controller.pid")).unwrap_or_default();
    let new_password = "rotated-superuser-password-1";
    rotate_file(&layout.token(), "rotated-agent-token-1");
    rotate_file(&layout.superuser_password(), new_password);
    let deadline = Instant::now() + Duration::from_secs(30);
    while login(port, new_password, &ca_pem).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new superuser password never worked"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        login(port, &old_password, &ca_pem).await.is_err(),
        "the old superuser password still logs in"
    );
    // Past the controller's next read of the files (every 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The controller works with the new values: a switchover.
    let target = if primary == "node1" { "node2" } else { "node1" };
    let output = pgrs(&[
        "local",
        "switchover",
        "--dir",
        &cluster.dir_text(),
        "--to",
        target,
    ]);
    assert!(
        output.status.success(),
        "switchover after the rotation: {}{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        cluster.controller_log_tail()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster.status().await;
        if status.primary.as_deref() == Some(target) && status.phase == pgrs::engine::Phase::Healthy
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no healthy cluster on {target}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pids_after: Vec<String> = ["node0", "node1", "node2"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(cluster.dir.join(format!("nodes/{n}/agent.pid")))
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(pids, pids_after, "an agent restarted");
    assert_eq!(
        std::fs::read_to_string(cluster.dir.join("controller.pid")).unwrap_or_default(),
        controller_pid,
        "the controller restarted"
    );
}
