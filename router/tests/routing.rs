//! Routing against real PostgreSQL 15: a primary and a streaming replica per test.
//!
//! Where a statement ran is proven by the server itself (`inet_server_port()`,
//! `pg_is_in_recovery()`, `pg_stat_activity`), not only by the router's counters.

mod support;

#[allow(dead_code)]
#[path = "../examples/notes/app.rs"]
mod app;

use std::future::IntoFuture as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrs_router::health::{Mode, PrimaryState, ReplicaState};
use pgrs_router::{
    Consistency, HealthReport, Need, RoutedClient, Router, RouterConfig, RouterError, WalToken,
};
use serde_json::Value;
use support::{Cluster, PgNode};

fn start_cluster() -> Cluster {
    tokio::task::block_in_place(|| Cluster::start().expect("fixture cluster starts"))
}

fn config(cluster: &Cluster) -> RouterConfig {
    let mut config =
        RouterConfig::new([cluster.primary.conn_string(), cluster.replica.conn_string()]);
    config.health_interval = Duration::from_millis(200);
    config.pool_size = 4;
    config
}

/// Probe until `accept` holds (conditions, not sleeps; generous bound for a loaded machine).
async fn wait_for_health(
    router: &Router,
    what: &str,
    accept: impl Fn(&HealthReport) -> bool,
) -> Arc<HealthReport> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = router.refresh_health().await;
        if accept(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn caught_up(router: &Router) {
    wait_for_health(router, "replica caught up", |report| {
        report.replica == ReplicaState::Ok && report.lag_bytes == Some(0)
    })
    .await;
}

/// Which server a pooled connection reaches, according to that server.
async fn served_by(client: &RoutedClient) -> (u16, bool) {
    let row = client
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .expect("port query");
    let port: i32 = row.get(0);
    (u16::try_from(port).expect("port fits"), row.get(1))
}

async fn observer(node: &PgNode) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!("{} application_name=observer", node.conn_string()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("observer connects");
    tokio::spawn(connection);
    client
}

/// Number of router backends on `node` whose last statement contains `marker`.
async fn router_backends_that_ran(node: &PgNode, marker: &str) -> i64 {
    observer(node)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'pgrs-router' AND query LIKE '%' || $1 || '%'",
            &[&marker],
        )
        .await
        .expect("pg_stat_activity query")
        .get(0)
}

async fn serve_app(db: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app port");
    let address = listener.local_addr().expect("app address");
    tokio::spawn(axum::serve(listener, app::router(app::AppState { db })).into_future());
    format!("http://{address}")
}

async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

async fn post_note(base: &str, author: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/notes"))
        .json(&serde_json::json!({ "author": author, "body": body }))
        .send()
        .await
        .expect("POST /notes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_land_on_the_replica_and_writes_on_the_primary() {
    let cluster = start_cluster();
    let (primary_port, replica_port) = (cluster.primary.port, cluster.replica.port);
    let router = Router::connect(config(&cluster)).await.expect("router");
    router
        .write()
        .await
        .expect("primary")
        .batch_execute(
            "CREATE TABLE items (id bigserial PRIMARY KEY, v text);
             CREATE SEQUENCE s;
             CREATE FUNCTION sneaky_write() RETURNS int LANGUAGE sql
               AS $$ INSERT INTO items (v) VALUES ('sneaky') RETURNING 1 $$;",
        )
        .await
        .expect("schema");
    caught_up(&router).await;

    for _ in 0..10 {
        let client = router.read(Consistency::Eventual).await.expect("read");
        assert!(!client.is_primary());
        assert_eq!(served_by(&client).await, (replica_port, true));
        client
            .query("SELECT /* read-marker */ count(*) FROM items", &[])
            .await
            .expect("read query");
    }
    let writer = router.write().await.expect("write");
    assert_eq!(served_by(&writer).await, (primary_port, false));
    writer
        .execute("INSERT /* write-marker */ INTO items (v) VALUES ('w')", &[])
        .await
        .expect("insert");
    drop(writer);

    // The servers' own view: the marked read ran only on the replica, the write only on the
    // primary.
    assert!(router_backends_that_ran(&cluster.replica, "read-marker").await >= 1);
    assert_eq!(
        router_backends_that_ran(&cluster.primary, "read-marker").await,
        0
    );
    assert_eq!(
        router_backends_that_ran(&cluster.primary, "write-marker").await,
        1
    );
    assert_eq!(
        router_backends_that_ran(&cluster.replica, "write-marker").await,
        0
    );

    // Automatic routing by the classifier.
    let port_of = |rows: Vec<tokio_postgres::Row>| -> u16 {
        let port: i32 = rows[0].get("port");
        u16::try_from(port).expect("port fits")
    };
    let plain = "SELECT inet_server_port() AS port";
    let rows = router
        .query(plain, &[], Consistency::Eventual)
        .await
        .expect("select");
    assert_eq!(port_of(rows), replica_port);
    let insert = "INSERT INTO items (v) VALUES ('auto') RETURNING inet_server_port() AS port";
    let rows = router
        .query(insert, &[], Consistency::Eventual)
        .await
        .expect("insert");
    assert_eq!(port_of(rows), primary_port);
    let sequence = "SELECT nextval('s'), inet_server_port() AS port";
    let rows = router
        .query(sequence, &[], Consistency::Eventual)
        .await
        .expect("nextval");
    assert_eq!(port_of(rows), primary_port);
    let locking = "SELECT inet_server_port() AS port FROM items LIMIT 1 FOR UPDATE";
    let rows = router
        .query(locking, &[], Consistency::Eventual)
        .await
        .expect("for update");
    assert_eq!(port_of(rows), primary_port);

    // A function the classifier cannot know writes: the replica answers 25006 and the router
    // retries once on the primary.
    let before = router.metrics();
    let sneaky = "SELECT sneaky_write(), inet_server_port() AS port";
    let rows = router
        .query(sneaky, &[], Consistency::Eventual)
        .await
        .expect("retried");
    assert_eq!(port_of(rows), primary_port);
    let after = router.metrics();
    assert_eq!(after.read_only_retries, before.read_only_retries + 1);
    assert!(after.reads_replica >= 11);
    assert_eq!(after.reads_fallback_no_replica, 0);

    let report = router.health();
    assert_eq!(report.http_status(Need::ReadWrite), 200);
    assert_eq!(report.mode, Mode::ReadWrite);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_with_a_delayed_replica_both_strengths() {
    let mut cluster = start_cluster();
    let delay = Duration::from_secs(3);
    let mut config = config(&cluster);
    config.sticky_window = Duration::from_secs(10);
    config.max_lag = Some(Duration::from_secs(60));
    config.lag_alert_threshold = Duration::from_secs(1);
    let router = Router::connect(config.clone()).await.expect("router");
    router
        .write()
        .await
        .expect("primary")
        .batch_execute("CREATE TABLE notes_ryw (id bigserial PRIMARY KEY, author text)")
        .await
        .expect("schema");
    caught_up(&router).await;

    tokio::task::block_in_place(|| cluster.set_replica_apply_delay(delay)).expect("delay set");
    let replica_observer = observer(&cluster.replica).await;
    loop {
        let row = replica_observer
            .query_one("SHOW recovery_min_apply_delay", &[])
            .await
            .expect("show");
        if row.get::<_, String>(0) == "3s" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let insert = |author: &'static str| {
        let router = router.clone();
        async move {
            let client = router.write().await.expect("write");
            let id: i64 = client
                .query_one(
                    "INSERT INTO notes_ryw (author) VALUES ($1) RETURNING id",
                    &[&author],
                )
                .await
                .expect("insert")
                .get(0);
            let token = client.wal_token().await.expect("token");
            (id, token)
        }
    };
    let find = |client: RoutedClient, id: i64| async move {
        let rows = client
            .query("SELECT id FROM notes_ryw WHERE id = $1", &[&id])
            .await
            .expect("select");
        (rows.len(), client.is_primary())
    };

    // Without read-your-writes the delayed replica returns stale data: the injected delay works.
    let (id, _) = insert("nobody").await;
    let eventual = router.read(Consistency::Eventual).await.expect("read");
    assert_eq!(
        find(eventual, id).await,
        (0, false),
        "replica must be stale"
    );

    // (a) Stickiness window: the writer's key reads from the primary, other keys do not.
    let (id, _) = insert("alice").await;
    router.record_write("alice");
    let alice = router.read(Consistency::Key("alice")).await.expect("read");
    assert_eq!(find(alice, id).await, (1, true));
    let bob = router.read(Consistency::Key("bob")).await.expect("read");
    assert_eq!(find(bob, id).await, (0, false));

    // (b) WAL token, carried as text to another application instance (another Router).
    let (id, token) = insert("carol").await;
    let carried: WalToken = token.to_string().parse().expect("token parses");
    let other_instance = Router::connect(config).await.expect("second router");
    let causal = other_instance
        .read(Consistency::Token(&carried))
        .await
        .expect("read");
    assert_eq!(
        find(causal, id).await,
        (1, true),
        "not replayed yet: primary"
    );
    assert!(other_instance.metrics().reads_causal_primary >= 1);
    // Once the replica replayed past the token, the same token reads from the replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = other_instance
            .read(Consistency::Token(&carried))
            .await
            .expect("read");
        let (found, on_primary) = find(client, id).await;
        assert_eq!(found, 1, "a token read never misses the row");
        if !on_primary {
            break;
        }
        assert!(Instant::now() < deadline, "replica never reached the token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(other_instance.metrics().reads_causal_replica >= 1);

    // lag_seconds under a steady write load is close to the injected delay.
    let writer = {
        let router = router.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(6) {
                if let Ok(client) = router.write().await {
                    let _ = client
                        .execute("INSERT INTO notes_ryw (author) VALUES ('load')", &[])
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = router.health();
    let base = serve_app(router.clone()).await;
    let (status, body) = get_json(&format!("{base}/health/db")).await;
    writer.await.expect("writer task");
    let lag = report.lag_seconds.expect("lag known");
    eprintln!("measured lag_seconds {lag:.3} with recovery_min_apply_delay {delay:?}");
    assert!(
        (lag - delay.as_secs_f64()).abs() <= 1.0,
        "lag_seconds {lag} should be close to the injected {delay:?}: {report:#?}"
    );
    assert!(report.lag_alert, "lag above the 1 s alert threshold");
    assert_eq!(
        status, 200,
        "lagging but eligible replica: still 200: {body}"
    );
    let served_lag = body["lag_seconds"].as_f64().expect("lag_seconds in body");
    assert!((served_lag - delay.as_secs_f64()).abs() <= 1.0, "{body}");
    assert_eq!(body["lag_alert"], true);
    assert_eq!(body["primary"], "ok");
    assert_eq!(body["replica"], "ok");
    assert!(router.metrics().lag_alert_episodes >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_stopped_reads_fall_back_to_the_primary() {
    let mut cluster = start_cluster();
    let primary_port = cluster.primary.port;
    let router = Router::connect(config(&cluster)).await.expect("router");
    caught_up(&router).await;
    let base = serve_app(router.clone()).await;
    let (status, body) = get_json(&format!("{base}/health/db")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["primary"], "ok");
    assert_eq!(body["replica"], "ok");
    assert_eq!(
        body["lag_seconds"].as_f64(),
        Some(0.0),
        "idle caught-up replica: 0 s"
    );
    assert_eq!(body["lag_alert"], false);
    // Warm the replica pool so that its connections die with the replica.
    drop(router.read(Consistency::Eventual).await.expect("read"));

    tokio::task::block_in_place(|| cluster.stop_replica()).expect("replica stops");

    // Right away, before any probe noticed: the failed checkout marks the replica down and
    // the read goes to the primary.
    let client = router
        .read(Consistency::Eventual)
        .await
        .expect("fallback read");
    assert!(client.is_primary());
    assert_eq!(served_by(&client).await, (primary_port, false));
    drop(client);
    assert!(router.metrics().reads_fallback_no_replica >= 1);

    let report = wait_for_health(&router, "replica unreachable", |report| {
        !report.nodes[1].reachable
    })
    .await;
    assert_eq!(report.replica, ReplicaState::Fallback);
    assert_eq!(report.primary, PrimaryState::Ok);
    assert_eq!(report.lag_seconds, None, "no replica: lag unknown, not 0");
    let (status, body) = get_json(&format!("{base}/health/db")).await;
    assert_eq!(status, 200, "reads and writes still work: {body}");
    assert_eq!(body["replica"], "fallback");
    assert_eq!(body["lag_seconds"], Value::Null);
    assert_eq!(body["nodes"][1]["reachable"], false);

    let client = router.read(Consistency::Eventual).await.expect("read");
    assert_eq!(served_by(&client).await, (primary_port, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_stopped_read_only_mode_then_primary_back() {
    let mut cluster = start_cluster();
    let replica_port = cluster.replica.port;
    let router = Router::connect(config(&cluster)).await.expect("router");
    app::ensure_schema(&router).await.expect("schema");
    caught_up(&router).await;
    let base = serve_app(router.clone()).await;
    let created = post_note(&base, "dana", "before the outage").await;
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.expect("JSON");
    let id = created["id"].as_i64().expect("id");
    caught_up(&router).await;
    // Warm the primary pool so that its connections die with the primary.
    drop(router.write().await.expect("write"));

    tokio::task::block_in_place(|| cluster.stop_primary()).expect("primary stops");

    // The first write after the stop fails on its connection, the next ones without trying.
    let first = router
        .write()
        .await
        .err()
        .expect("no write while the primary is down");
    assert!(matches!(first, RouterError::ReadOnly { .. }), "{first:?}");
    let failures_before = router.metrics().node_failures;
    for _ in 0..20 {
        let error = router.write().await.err().expect("read-only");
        assert!(matches!(error, RouterError::ReadOnly { .. }), "{error:?}");
    }
    assert_eq!(
        router.metrics().node_failures,
        failures_before,
        "refused writes must not try to connect"
    );
    assert!(router.metrics().writes_rejected_read_only >= 21);

    let report = wait_for_health(&router, "read-only mode", |report| {
        report.mode == Mode::ReadOnly
    })
    .await;
    assert_eq!(report.primary, PrimaryState::Down);
    assert_eq!(report.replica, ReplicaState::Ok);
    assert_eq!(report.lag_seconds, None, "no primary: lag unknown, not 0");
    assert!(router.metrics().read_only_mode_entered >= 1);

    // Reads keep working from the replica, through the library and the app.
    let client = router.read(Consistency::Eventual).await.expect("read");
    assert_eq!(served_by(&client).await, (replica_port, true));
    drop(client);
    let (status, note) = get_json(&format!("{base}/notes/{id}")).await;
    assert_eq!(status, 200, "{note}");
    assert_eq!(note["served_by_replica"], true);

    // The app: writes 503 with Retry-After; /health/db 503, but 200 for read-only paths.
    let refused = post_note(&base, "dana", "during the outage").await;
    assert_eq!(refused.status().as_u16(), 503);
    let retry_after = refused
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    let (status, body) = get_json(&format!("{base}/health/db")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["primary"], "down");
    assert_eq!(body["replica"], "ok");
    assert_eq!(body["mode"], "read_only");
    let (status, body) = get_json(&format!("{base}/health/db?need=read")).await;
    assert_eq!(status, 200, "{body}");

    // A new application instance started during the outage comes up in read-only mode:
    // reads work, writes are refused at once (no hang, no error at start-up).
    let late = Router::connect(config(&cluster))
        .await
        .expect("router starts without a primary");
    assert_eq!(late.health().mode, Mode::ReadOnly);
    assert_eq!(late.metrics().read_only_mode_entered, 1);
    let client = late.read(Consistency::Eventual).await.expect("read");
    assert_eq!(served_by(&client).await, (replica_port, true));
    drop(client);
    let error = late.write().await.err().expect("read-only");
    assert!(matches!(error, RouterError::ReadOnly { .. }), "{error:?}");

    // The primary comes back: writes work again without restarting anything.
    tokio::task::block_in_place(|| cluster.start_primary()).expect("primary restarts");
    wait_for_health(&router, "primary back", |report| {
        report.mode == Mode::ReadWrite
    })
    .await;
    let created = post_note(&base, "dana", "after the outage").await;
    assert_eq!(created.status().as_u16(), 201);
    let (status, body) = get_json(&format!("{base}/health/db")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["primary"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_replica_takes_writes_without_restart() {
    let mut cluster = start_cluster();
    let replica_port = cluster.replica.port;
    let router = Router::connect(config(&cluster)).await.expect("router");
    app::ensure_schema(&router).await.expect("schema");
    caught_up(&router).await;
    let base = serve_app(router.clone()).await;

    tokio::task::block_in_place(|| cluster.stop_primary()).expect("primary stops");
    wait_for_health(&router, "read-only mode", |report| {
        report.mode == Mode::ReadOnly
    })
    .await;
    let refused = post_note(&base, "erin", "while nobody is primary").await;
    assert_eq!(refused.status().as_u16(), 503);

    tokio::task::block_in_place(|| cluster.promote_replica()).expect("replica promoted");
    let report = wait_for_health(&router, "promoted replica writable", |report| {
        report.mode == Mode::ReadWrite
    })
    .await;
    assert_eq!(report.primary, PrimaryState::Ok);
    assert_eq!(report.replica, ReplicaState::Fallback, "no replica left");

    let writer = router.write().await.expect("write after promotion");
    assert_eq!(served_by(&writer).await, (replica_port, false));
    drop(writer);
    let created = post_note(&base, "erin", "after the promotion").await;
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.expect("JSON");
    let id = created["id"].as_i64().expect("id");
    let (status, note) = get_json(&format!("{base}/notes/{id}")).await;
    assert_eq!(status, 200, "{note}");
    assert_eq!(
        note["served_by_replica"], false,
        "reads fall back to the new primary"
    );
    let (status, body) = get_json(&format!("{base}/health/db")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replica"], "fallback");
}
