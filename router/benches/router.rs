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

    // Wall-clock figures above include preemption on a shared machine; this thread's CPU time
    // per call does not.
    const CALLS: u32 = 200_000;
    for (name, sql) in CLASSIFIED {
        let before = thread_cpu_time();
        for _ in 0..CALLS {
            black_box(classifier.classify(black_box(sql)));
        }
        let per_call = thread_cpu_time().saturating_sub(before) / CALLS;
        println!(
            "classify/{name}: {} ns CPU per statement ({} bytes)",
            per_call.as_nanos(),
            sql.len()
        );
    }
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

/// CPU time used by this process so far (all threads): the client-side cost of a read, which
/// is what the router adds, and less sensitive than wall-clock throughput to other load on a
/// shared machine.
fn process_cpu_time() -> Duration {
    cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn thread_cpu_time() -> Duration {
    cpu_time(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut spec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(clock, &mut spec) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    Duration::new(
        u64::try_from(spec.tv_sec).unwrap_or(0),
        u32::try_from(spec.tv_nsec).unwrap_or(0),
    )
}

struct Window {
    queries: u64,
    client_cpu: Duration,
}

/// Queries completed by `CLIENTS` concurrent clients in `window`, and the process CPU spent.
async fn throughput<F, Fut>(window: Duration, read: F) -> Window
where
    F: Fn(i32) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = process_cpu_time();
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
    Window {
        queries: done.load(Ordering::Relaxed),
        client_cpu: process_cpu_time().saturating_sub(cpu_before),
    }
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

    // Many short interleaved rounds, alternating which side goes first, so that drift in
    // machine load hits both sides alike; the median of per-round ratios resists outliers.
    let window = Duration::from_millis(1500);
    let rounds = 10;
    let mut ratios = Vec::new();
    let (mut bare_total, mut routed_total) = (0u64, 0u64);
    let (mut bare_cpu, mut routed_cpu) = (Duration::ZERO, Duration::ZERO);
    runtime.block_on(async {
        for round in 1..=rounds {
            let bare_side = {
                let pool = pool.clone();
                move |aid| {
                    let pool = pool.clone();
                    async move { bare_read(&pool, aid).await }
                }
            };
            let routed_side = {
                let router = router.clone();
                move |aid| {
                    let router = router.clone();
                    async move { routed_read(&router, aid).await }
                }
            };
            let (bare, routed) = if round % 2 == 1 {
                let bare = throughput(window, bare_side).await;
                (bare, throughput(window, routed_side).await)
            } else {
                let routed = throughput(window, routed_side).await;
                (throughput(window, bare_side).await, routed)
            };
            println!(
                "throughput round {round}: bare {:.0} q/s, routed {:.0} q/s",
                bare.queries as f64 / window.as_secs_f64(),
                routed.queries as f64 / window.as_secs_f64()
            );
            ratios.push(routed.queries as f64 / bare.queries as f64);
            bare_total += bare.queries;
            routed_total += routed.queries;
            bare_cpu += bare.client_cpu;
            routed_cpu += routed.client_cpu;
        }
    });
    ratios.sort_by(f64::total_cmp);
    let median = (ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0;
    println!(
        "routed/bare read throughput ({CLIENTS} clients, pool {POOL_SIZE}, {rounds} rounds of {:.1} s each side): \
         ratio of totals {:.3}, median round ratio {median:.3}",
        window.as_secs_f64(),
        routed_total as f64 / bare_total as f64
    );
    println!(
        "client CPU per read: bare {:.2} us, routed {:.2} us",
        bare_cpu.as_secs_f64() * 1e6 / bare_total as f64,
        routed_cpu.as_secs_f64() * 1e6 / routed_total as f64
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
