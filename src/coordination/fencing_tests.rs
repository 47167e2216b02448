//! Issue 12, agent side: the fencing rules of the keeper, its monitor and its watchdog.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::keeper::{BOOTSTRAP_BUDGET, DEFAULT_START_BUDGET};
use super::tests::{Partitionable, held_by, quick_timings};
use super::*;

fn quick_args() -> LeaseArgs {
    let timings = quick_timings();
    LeaseArgs {
        lease_url: None,
        lease_profile: "default".to_string(),
        lease_duration_ms: Some(timings.lease_duration.as_millis() as u64),
        lease_renew_interval_ms: Some(timings.renew_interval.as_millis() as u64),
        lease_renew_deadline_ms: Some(timings.renew_deadline.as_millis() as u64),
        lease_shutdown_budget_ms: Some(timings.shutdown_budget.as_millis() as u64),
        lease_start_budget_ms: None,
        no_fence_watchdog: true,
    }
}

/// A fence callback recording when (tokio clock) and why it was called.
fn fence_log() -> (FenceFn, mpsc::UnboundedReceiver<(Instant, String)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let fence: FenceFn = Arc::new(move |reason: String| {
        let _ = tx.send((Instant::now(), reason));
        Box::pin(async {})
    });
    (fence, rx)
}

/// What the agent reports about its postgres, switchable by the test.
#[derive(Clone, Default)]
struct Postgres(Arc<AtomicU8>);

impl Postgres {
    fn set(&self, state: LocalPrimaryState) {
        let value = match state {
            LocalPrimaryState::NotPrimary => 0,
            LocalPrimaryState::Serving => 1,
            LocalPrimaryState::Restarting => 2,
            LocalPrimaryState::StoppedOnRequest => 3,
            LocalPrimaryState::Stopping => 4,
            LocalPrimaryState::Bootstrapping => 5,
        };
        self.0.store(value, Ordering::SeqCst);
    }

    fn reader(&self) -> Arc<dyn Fn() -> LocalPrimaryState + Send + Sync> {
        let value = self.0.clone();
        Arc::new(move || match value.load(Ordering::SeqCst) {
            1 => LocalPrimaryState::Serving,
            2 => LocalPrimaryState::Restarting,
            3 => LocalPrimaryState::StoppedOnRequest,
            4 => LocalPrimaryState::Stopping,
            5 => LocalPrimaryState::Bootstrapping,
            _ => LocalPrimaryState::NotPrimary,
        })
    }
}

/// Hole 4: the promotion gate read "holder == self" at one instant; the promotion itself ran
/// later (queued behind another action). The lease may have been taken over since the read, so
/// the fencing deadline counts from the read, not from when the keeper saw a primary.
#[tokio::test]
async fn a_promotion_is_fenced_from_the_gate_confirmation_not_from_activation() {
    let store = Arc::new(Partitionable {
        inner: MemoryLeaseStore::new(Duration::from_millis(800)),
        cut: AtomicBool::new(false),
    });
    held_by(&store.inner, "a").await;
    let postgres = Postgres::default();
    let (fence, mut fenced) = fence_log();
    let dir = tempfile::tempdir().expect("tempdir");
    let fencing = AgentFencing::start_with_store(
        &quick_args(),
        store.clone(),
        "test store",
        "a",
        dir.path(),
        fence,
        postgres.reader(),
    )
    .expect("fencing");
    let queued = Duration::from_millis(300);
    let (handler_store, handler_postgres) = (store.clone(), postgres.clone());
    let router = axum::Router::new().route(
        "/promote",
        axum::routing::post(move || async move {
            // The store becomes unreachable right after the gate's renewal; the promotion runs
            // once the action queued before it is done.
            handler_store.cut.store(true, Ordering::SeqCst);
            tokio::time::sleep(queued).await;
            handler_postgres.set(LocalPrimaryState::Serving);
            "promoted"
        }),
    );
    let app = fencing.gate_promote(router, "/promote");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let asked = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/promote"))
        .send()
        .await
        .expect("promote");
    assert!(response.status().is_success(), "{}", response.status());
    let (fenced_at, reason) = tokio::time::timeout(Duration::from_secs(5), fenced.recv())
        .await
        .expect("fenced within 5 s")
        .expect("fence called");
    let deadline = quick_timings().renew_deadline;
    let after = fenced_at - asked;
    eprintln!(
        "fenced {} ms after the gate's read: {reason}",
        after.as_millis()
    );
    assert!(
        after < deadline + Duration::from_millis(150),
        "fenced {} ms after the last confirmation; the deadline is {} ms",
        after.as_millis(),
        deadline.as_millis()
    );
}

/// Hole 4: a lease with no holder (released or deleted) is grantable at once by the engine, so
/// a holder that finds it free must fence at once, not wait for its deadline.
#[tokio::test(start_paused = true)]
async fn a_keeper_finding_its_lease_free_fences_at_once() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    held_by(store.as_ref(), "a").await;
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = fence_log();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fenced.try_recv().is_err(), "renewing: not fenced");
    // Someone (an operator, a restarted controller) releases or deletes the lease.
    store.release("a").await.expect("release");
    let released = Instant::now();
    let (fenced_at, reason) = tokio::time::timeout(Duration::from_secs(5), fenced.recv())
        .await
        .expect("fenced")
        .expect("fence called");
    assert!(
        fenced_at - released <= 2 * quick_timings().renew_interval,
        "fenced {} ms after the lease became free ({reason})",
        (fenced_at - released).as_millis()
    );
    task.abort();
}

/// Hole 5: a primary whose postgres cannot start again must not keep the lease alive forever:
/// after a bounded start budget the keeper stops renewing, so the lease expires.
#[tokio::test(start_paused = true)]
async fn a_primary_that_does_not_serve_again_stops_renewing() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    held_by(store.as_ref(), "a").await;
    let postgres = Postgres::default();
    postgres.set(LocalPrimaryState::Serving);
    let (fence, _fenced) = fence_log();
    let dir = tempfile::tempdir().expect("tempdir");
    let fencing = AgentFencing::start_with_store(
        &quick_args(),
        store.clone(),
        "test store",
        "a",
        dir.path(),
        fence,
        postgres.reader(),
    )
    .expect("fencing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fencing.keeper().mode(), KeeperMode::Active);
    // postgres crashed and every restart fails.
    postgres.set(LocalPrimaryState::Restarting);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let before = store.get().await.expect("get").version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = store.get().await.expect("get").version;
    assert_eq!(
        before, after,
        "a primary down for two minutes still renews its lease: no failover can happen"
    );
}

/// Hole 6: once fenced, the watchdog's deadline is cleared: a quick rejoin starts a postgres
/// (as a replica) that an old deadline must not kill.
#[tokio::test(start_paused = true)]
async fn a_fence_clears_the_watchdog_deadline() {
    let store = Arc::new(Partitionable {
        inner: MemoryLeaseStore::new(Duration::from_millis(800)),
        cut: AtomicBool::new(false),
    });
    held_by(&store.inner, "a").await;
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let deadline = keeper.subscribe_deadline();
    let (fence, mut fenced) = fence_log();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(deadline.borrow().is_some(), "armed while renewing");
    store.cut.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), fenced.recv())
        .await
        .expect("fenced")
        .expect("fence called");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        deadline.borrow().is_none(),
        "fenced, yet the watchdog still holds a deadline"
    );
    task.abort();
}

/// Hole 6: a watchdog process that dies is started again (and fed the current deadline).
#[tokio::test]
async fn a_dead_watchdog_is_respawned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let starts = dir.path().join("starts");
    let command = WatchdogCommand {
        program: "/bin/sh".into(),
        // `sh -c SCRIPT $0 ...`: records each start, then dies at once.
        args: vec![
            "-c".to_string(),
            "echo started >> \"$0\"; exit 1".to_string(),
            starts.display().to_string(),
        ],
    };
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    let keeper = LeaseKeeper::new(store, "a", quick_timings()).expect("keeper");
    let task = spawn_watchdog(&command, dir.path(), keeper).expect("spawn");
    // Polled (a loaded machine starts processes slowly); a respawn comes within a second.
    let count = || {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    while count() < 2 && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        count() >= 2,
        "the watchdog died and was started {} time(s)",
        count()
    );
    task.abort();
}

/// Hole 5 across processes: a pod's restarted agent that finds itself the holder starts postgres
/// as primary, but must not renew while postgres starts — a process that crash-loops would
/// otherwise extend the lease at every restart, and no failover could happen. It serves only if
/// postgres is up within the renew deadline of its start proof; later, it fences at once.
#[tokio::test(start_paused = true)]
async fn a_restarted_agent_does_not_renew_while_postgres_starts() {
    let started = Started::confirmed(LocalPrimaryState::Restarting).await;
    let (store, postgres, fencing) = (&started.store, &started.postgres, &started.fencing);
    let mut fenced = started.fenced;
    let before = store.get().await.expect("get").version;
    tokio::time::sleep(quick_timings().renew_deadline * 2).await;
    let after = store.get().await.expect("get").version;
    assert_eq!(before, after, "renewed while postgres was starting");
    assert_eq!(fencing.keeper().mode(), KeeperMode::Idle);
    // postgres serves at last, on a proof older than the renew deadline: fenced at once.
    postgres.set(LocalPrimaryState::Serving);
    let served = Instant::now();
    let (fenced_at, reason) = tokio::time::timeout(Duration::from_secs(5), fenced.recv())
        .await
        .expect("fenced")
        .expect("fence called");
    assert!(
        fenced_at - served <= Duration::from_millis(100),
        "fenced {} ms after serving on stale proof ({reason})",
        (fenced_at - served).as_millis()
    );
}

/// A first primary's initdb may outlast the renew deadline: it renews during the start.
#[tokio::test(start_paused = true)]
async fn a_bootstrapping_primary_renews_during_initdb() {
    let started = Started::confirmed(LocalPrimaryState::Bootstrapping).await;
    let (store, postgres, fencing) = (&started.store, &started.postgres, &started.fencing);
    let mut fenced = started.fenced;
    let before = store.get().await.expect("get").version;
    tokio::time::sleep(quick_timings().renew_deadline * 2).await;
    postgres.set(LocalPrimaryState::Serving);
    tokio::time::sleep(quick_timings().renew_deadline).await;
    let after = store.get().await.expect("get").version;
    assert_ne!(before, after, "no renewal during initdb");
    assert!(fenced.try_recv().is_err(), "fenced although it renewed");
    assert_eq!(fencing.keeper().mode(), KeeperMode::Active);
}

/// A first primary's bootstrap (initdb, first start) may outlast the start budget on a busy
/// node: there is nothing to fail over to yet (no replica has data before the primary serves),
/// so it keeps the lease for the bootstrap budget instead of fencing itself into a cluster that
/// can never bootstrap (seen on a real node at load 18–36: initdb + first start took > 10 s).
#[tokio::test(start_paused = true)]
async fn a_slow_bootstrap_keeps_the_lease_past_the_start_budget() {
    let started = Started::confirmed(LocalPrimaryState::Bootstrapping).await;
    let (store, postgres, fencing) = (&started.store, &started.postgres, &started.fencing);
    let mut fenced = started.fenced;
    tokio::time::sleep(DEFAULT_START_BUDGET * 3).await;
    let before = store.get().await.expect("get").version;
    tokio::time::sleep(quick_timings().renew_deadline).await;
    let after = store.get().await.expect("get").version;
    assert!(
        fenced.try_recv().is_err(),
        "a bootstrapping primary fenced itself after the start budget"
    );
    assert_ne!(before, after, "no renewal during a long bootstrap");
    postgres.set(LocalPrimaryState::Serving);
    tokio::time::sleep(quick_timings().renew_deadline).await;
    assert_eq!(fencing.keeper().mode(), KeeperMode::Active);
    // Bounded all the same: a bootstrap that never ends gives the lease up.
    postgres.set(LocalPrimaryState::Bootstrapping);
    tokio::time::sleep(BOOTSTRAP_BUDGET + Duration::from_secs(5)).await;
    assert!(
        fenced.try_recv().is_ok(),
        "a bootstrap stuck for longer than its budget still holds the lease"
    );
}

/// Fencing started on a lease held by "a" with postgres in `state`, and the start's read of
/// "holder == a" confirmed (a pod's agent starting as primary).
struct Started {
    store: Arc<MemoryLeaseStore>,
    postgres: Postgres,
    fencing: AgentFencing,
    fenced: mpsc::UnboundedReceiver<(Instant, String)>,
    _dir: tempfile::TempDir,
}

impl Started {
    async fn confirmed(state: LocalPrimaryState) -> Started {
        let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
        held_by(store.as_ref(), "a").await;
        let postgres = Postgres::default();
        postgres.set(state);
        let (fence, fenced) = fence_log();
        let dir = tempfile::tempdir().expect("tempdir");
        let fencing = AgentFencing::start_with_store(
            &quick_args(),
            store.clone(),
            "test store",
            "a",
            dir.path(),
            fence,
            postgres.reader(),
        )
        .expect("fencing");
        fencing.keeper().confirm(FenceInstant::now());
        Started {
            store,
            postgres,
            fencing,
            fenced,
            _dir: dir,
        }
    }
}
