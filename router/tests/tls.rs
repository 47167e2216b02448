//! The router over TLS against real PostgreSQL 15 (the fixture serves a certificate for
//! `localhost` from its own CA): with a rustls configuration trusting only that CA and
//! `sslmode=require`, writes and reads run on encrypted sessions verified as `localhost`
//! (`pg_stat_ssl` says so on the server); a router trusting another CA reaches nothing.

mod support;

use std::time::{Duration, Instant};

use pgrs_router::health::{PrimaryState, ReplicaState};
use pgrs_router::{Consistency, RoutedClient, Router, RouterConfig};
use support::{Cluster, PgNode};

/// `sslmode=require` against the name in the certificate, dialing 127.0.0.1.
fn tls_endpoint(node: &PgNode) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        node.port
    )
}

fn tls_config(cluster: &Cluster, ca_pem: &str) -> RouterConfig {
    let mut config = RouterConfig::new([
        tls_endpoint(&cluster.primary),
        tls_endpoint(&cluster.replica),
    ]);
    config.health_interval = Duration::from_millis(200);
    config.pool_size = 2;
    config.tls = Some(pgrs::tls::client_config(ca_pem, None).expect("a client configuration"));
    config
}

async fn encrypted(client: &RoutedClient) -> (bool, bool) {
    let row = client
        .query_one(
            "SELECT ssl, pg_is_in_recovery() FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_run_on_sessions_verified_against_the_cluster_ca() {
    let cluster = tokio::task::block_in_place(|| Cluster::start().expect("fixture cluster starts"));
    let router = Router::connect(tls_config(&cluster, &cluster.ca_pem))
        .await
        .expect("router builds");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = router.refresh_health().await;
        if report.primary == PrimaryState::Ok && report.replica == ReplicaState::Ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never healthy over TLS: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let write = router.write().await.expect("a write session");
    assert_eq!(encrypted(&write).await, (true, false), "the write session");
    drop(write);
    let read = router
        .read(Consistency::Eventual)
        .await
        .expect("a read session");
    assert_eq!(encrypted(&read).await, (true, true), "the read session");

    // Another CA: nothing verifies, the router has no node to send a write to.
    let other = pgrs::tls::Authority::generate("other", Duration::from_secs(86_400)).expect("a CA");
    let foreign = Router::connect(tls_config(&cluster, other.cert_pem()))
        .await
        .expect("router builds");
    let report = foreign.refresh_health().await;
    assert_eq!(report.primary, PrimaryState::Down, "{report:?}");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), foreign.write())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "a write session on a server of another CA"
    );
}
