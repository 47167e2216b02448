//! `cargo bench -p pgrs-router --bench router`
//!
//! 1. The classifier's cost per statement, for typical and tricky statements.
//! 2. Routed reads against the same query on a bare deadpool pool to the same replica, in one
//!    run: single-client latency (criterion) and an 8-client throughput comparison with
//!    interleaved rounds, printed as a ratio (routed / bare).
//!
//! Needs the PostgreSQL 15 binaries (the fixture starts a primary and a replica).

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use pgrs_router::{Classifier, Consistency, Router, RouterConfig};

const CLASSIFIED: &[(&str, &str)] = &[
    (
        "select_pk",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
    (
        "select_join",
        "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id \
         WHERE o.created_at > $1 ORDER BY o.created_at DESC LIMIT 50",
    ),
    (
        "insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, now())",
    ),
    (
        "update",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    ),
    (
        "select_for_update",
        "SELECT * FROM jobs WHERE state = 'new' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
    ),
    (
        "cte_with_comments",
        "/* report */ WITH recent AS (SELECT * FROM orders -- last day\n WHERE created_at > \
         now() - interval '1 day') SELECT count(*), sum(total) FROM recent WHERE note <> 'for update'",
    ),
    (
        "data_modifying_cte",
        "WITH moved AS (DELETE FROM inbox WHERE id = $1 RETURNING *) INSERT INTO archive SELECT * FROM moved",
    ),
];

fn bench_classifier(criterion: &mut Criterion) {
    let classifier = Classifier::default();
    let mut group = criterion.benchmark_group("classify");
    for (name, sql) in CLASSIFIED {
        group.bench_function(*name, |b| b.iter(|| classifier.classify(black_box(sql))));
    }
    group.finish();
}

const READ_SQL: &str = "SELECT abalance FROM accounts WHERE aid = $1";
const ACCOUNTS: i32 = 100_000;
const POOL_SIZE: usize = 8;
const CLIENTS: usize = 8;

fn bare_pool(conn_string: &str) -> Pool {
    let pg_config = tokio_postgres::Config::from_str(conn_string).expect("connection string");
    let manager = Manager::from_config(
        pg_config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .build()
        .expect("bare pool")
}

async fn bare_read(pool: &Pool, aid: i32) {
    let client = pool.get().await.expect("bare checkout");
    let statement = client.prepare_cached(READ_SQL).await.expect("prepare");
    black_box(
        client
            .query_one(&statement, &[&aid])
            .await
            .expect("bare read"),
    );
}

async fn routed_read(router: &Router, aid: i32) {
    let client = router
        .read(Consistency::Eventual)
        .await
        .expect("routed checkout");
    let statement = client.prepare_cached(READ_SQL).await.expect("prepare");
    black_box(
        client
            .query_one(&statement, &[&aid])
            .await
            .expect("routed read"),
    );
}

/// Queries completed by `CLIENTS` concurrent clients in `window`.
async fn throughput<F, Fut>(window: Duration, read: F) -> u64
where
    F: Fn(i32) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (done, stop, read) = (Arc::clone(&done), Arc::clone(&stop), read.clone());
        tasks.push(tokio::spawn(async move {
            let mut aid = i32::try_from(client).unwrap_or(0) * 7919;
            while !stop.load(Ordering::Relaxed) {
                aid = (aid + 104_729) % ACCOUNTS + 1;
                read(aid).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client task");
    }
    done.load(Ordering::Relaxed)
}

fn bench_reads(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cluster = support::Cluster::start().expect("fixture cluster");
    let (router, pool) = runtime.block_on(async {
        let mut config =
            RouterConfig::new([cluster.primary.conn_string(), cluster.replica.conn_string()]);
        config.pool_size = POOL_SIZE;
        let router = Router::connect(config).await.expect("router");
        router
            .write()
            .await
            .expect("primary")
            .batch_execute(&format!(
                "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL DEFAULT 0);
                 INSERT INTO accounts (aid) SELECT generate_series(1, {ACCOUNTS});
                 ANALYZE accounts;"
            ))
            .await
            .expect("schema");
        let deadline = Instant::now() + Duration::from_secs(60);
        while router.refresh_health().await.lag_bytes != Some(0) {
            assert!(Instant::now() < deadline, "replica never caught up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (router, bare_pool(&cluster.replica.conn_string()))
    });

    let mut group = criterion.benchmark_group("read_one_client");
    group.bench_function("bare_deadpool", |b| {
        let mut aid = 0;
        b.to_async(&runtime).iter(|| {
            aid = aid % ACCOUNTS + 1;
            bare_read(&pool, aid)
        });
    });
    group.bench_function("routed", |b| {
        let mut aid = 0;
        b.to_async(&runtime).iter(|| {
            aid = aid % ACCOUNTS + 1;
            routed_read(&router, aid)
        });
    });
    group.finish();

    // Interleaved rounds so that drift in machine load hits both sides alike.
    let window = Duration::from_secs(3);
    let (mut bare_total, mut routed_total) = (0u64, 0u64);
    runtime.block_on(async {
        for round in 1..=3 {
            let pool = pool.clone();
            let bare = throughput(window, move |aid| {
                let pool = pool.clone();
                async move { bare_read(&pool, aid).await }
            })
            .await;
            let router = router.clone();
            let routed = throughput(window, move |aid| {
                let router = router.clone();
                async move { routed_read(&router, aid).await }
            })
            .await;
            println!(
                "throughput round {round}: bare {:.0} q/s, routed {:.0} q/s",
                bare as f64 / window.as_secs_f64(),
                routed as f64 / window.as_secs_f64()
            );
            bare_total += bare;
            routed_total += routed;
        }
    });
    println!(
        "routed/bare read throughput ratio ({CLIENTS} clients, pool {POOL_SIZE}, {} s x 3 rounds each): {:.3}",
        window.as_secs(),
        routed_total as f64 / bare_total as f64
    );
    let metrics = router.metrics();
    assert_eq!(
        metrics.reads_fallback_no_replica, 0,
        "every routed read hit the replica"
    );
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_classifier(&mut criterion);
    // PGRS_BENCH_CLASSIFIER_ONLY=1 skips the part that needs PostgreSQL.
    if std::env::var_os("PGRS_BENCH_CLASSIFIER_ONLY").is_none() {
        bench_reads(&mut criterion);
    }
    criterion.final_summary();
}
