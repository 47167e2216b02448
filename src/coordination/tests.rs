use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::*;

/// The contract every [`LeaseStore`] must keep.
async fn lease_contract(store: &dyn LeaseStore) {
    let initial = store.get().await.expect("get");
    assert_eq!(initial.holder, None);

    let err = store
        .acquire("a", "not-a-version")
        .await
        .expect_err("stale version");
    assert!(matches!(err, LeaseError::Conflict { .. }), "{err}");

    let held = store.acquire("a", &initial.version).await.expect("acquire");
    assert_eq!(held.holder.as_deref(), Some("a"));
    assert_ne!(held.version, initial.version);
    assert_eq!(held.transitions, 1);

    let err = store.renew("b").await.expect_err("b is not the holder");
    assert!(
        matches!(&err, LeaseError::NotHolder { requester, .. } if requester == "b"),
        "{err}"
    );

    let renewed = store.renew("a").await.expect("renew");
    assert_ne!(
        renewed.version, held.version,
        "a renewal changes the version observers time"
    );
    assert_eq!(renewed.holder.as_deref(), Some("a"));

    // A takeover based on an observation older than the renewal must fail.
    let err = store
        .acquire("b", &held.version)
        .await
        .expect_err("stale takeover");
    match err {
        LeaseError::Conflict { current, .. } => assert_eq!(current.holder.as_deref(), Some("a")),
        other => panic!("expected a conflict, got {other}"),
    }

    assert!(matches!(
        store.release("b").await,
        Err(LeaseError::NotHolder { .. })
    ));
    let released = store.release("a").await.expect("release");
    assert_eq!(released.holder, None);

    let taken = store
        .acquire("b", &released.version)
        .await
        .expect("acquire after release");
    assert_eq!(taken.holder.as_deref(), Some("b"));
    assert_eq!(taken.transitions, 2);
    assert_eq!(store.get().await.expect("get"), taken);
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    lease_contract(&MemoryLeaseStore::new(Duration::from_secs(8))).await;
}

#[tokio::test]
async fn persistent_store_survives_a_restart_without_reusing_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lease.json");
    let store = MemoryLeaseStore::persistent(&path, Duration::from_secs(8)).expect("open");
    let first = store.get().await.expect("get");
    let held = store.acquire("a", &first.version).await.expect("acquire");
    drop(store);

    let reopened = MemoryLeaseStore::persistent(&path, Duration::from_secs(3)).expect("reopen");
    let after = reopened.get().await.expect("get");
    assert_eq!(after.holder.as_deref(), Some("a"));
    assert_eq!(after.version, held.version);
    assert_eq!(after.duration, Duration::from_secs(3));
    let renewed = reopened.renew("a").await.expect("renew");
    assert_ne!(renewed.version, held.version);
    assert_ne!(renewed.version, first.version);
}

#[tokio::test]
async fn persistent_store_refuses_a_corrupt_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lease.json");
    std::fs::write(&path, b"{not json").expect("write");
    let err = MemoryLeaseStore::persistent(&path, Duration::from_secs(8))
        .err()
        .expect("corrupt file refused");
    assert!(err.to_string().contains("lease.json"), "{err}");
}

async fn serve(store: Arc<dyn LeaseStore>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, lease_router(store)).await;
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn http_store_keeps_the_contract() {
    let url = serve(Arc::new(MemoryLeaseStore::new(Duration::from_secs(8)))).await;
    let client = HttpLeaseStore::new(&url, Duration::from_secs(2)).expect("client");
    lease_contract(&client).await;
}

/// A renewal that reaches the service after its sender gave up (it waited in a frozen
/// server's backlog) is not applied: the lease keeps its version.
#[tokio::test]
async fn a_request_past_its_senders_deadline_is_not_applied() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_secs(8)));
    let before = held_by(store.as_ref(), "a").await;
    let url = serve(store.clone()).await;
    let late = serde_json::json!({
        "holder": "a",
        "deadlineUnixMs": chrono::Utc::now().timestamp_millis() - 1_000,
    });
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/lease/renew"))
        .json(&late)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let text = response.text().await.expect("body");
    assert!(text.contains("gave up on it"), "{text}");
    assert_eq!(store.get().await.expect("get").version, before.version);
    let client = HttpLeaseStore::new(&url, Duration::from_secs(2)).expect("client");
    client
        .renew("a")
        .await
        .expect("an answer in time is applied");
}

#[tokio::test]
async fn http_store_reports_an_unreachable_service() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let client = HttpLeaseStore::new(&url, Duration::from_millis(500)).expect("client");
    let err = client.renew("a").await.expect_err("nothing listens");
    assert!(matches!(err, LeaseError::Unavailable(_)), "{err}");
}

#[test]
fn timings_are_validated() {
    LeaseTimings::default().validate().expect("default is safe");
    LeaseTimings::aggressive()
        .validate()
        .expect("aggressive is safe");
    assert_eq!(
        LeaseTimings::profile("aggressive"),
        Ok(LeaseTimings::aggressive())
    );
    assert!(LeaseTimings::profile("reckless").is_err());
    let tight = LeaseTimings {
        renew_deadline: Duration::from_secs(6),
        ..LeaseTimings::default()
    };
    let err = tight.validate().expect_err("5 + 2 < 8 but 6 + 2 is not");
    assert!(matches!(err, TimingsError::DeadlineTooLong { .. }), "{err}");
    let slow_renew = LeaseTimings {
        renew_interval: Duration::from_secs(5),
        ..LeaseTimings::default()
    };
    assert!(matches!(
        slow_renew.validate(),
        Err(TimingsError::IntervalTooLong { .. })
    ));
    let store: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new(Duration::from_secs(8)));
    assert!(LeaseKeeper::new(store, "a", tight).is_err());
}

/// A store that can be cut off, like a network partition between the agent and the store.
pub(super) struct Partitionable {
    pub(super) inner: MemoryLeaseStore,
    pub(super) cut: AtomicBool,
}

impl Partitionable {
    fn check(&self) -> Result<(), LeaseError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(LeaseError::Unavailable("partitioned".to_string()))
        } else {
            Ok(())
        }
    }
}

impl LeaseStore for Partitionable {
    fn get(&self) -> BoxFuture<'_, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.get().await
        })
    }
    fn renew<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.renew(holder).await
        })
    }
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move { self.inner.acquire(holder, version).await })
    }
    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.release(holder).await
        })
    }
    fn set_failsafe_members<'a>(
        &'a self,
        holder: &'a str,
        members: Option<Vec<String>>,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.set_failsafe_members(holder, members).await
        })
    }
}

pub(super) fn quick_timings() -> LeaseTimings {
    LeaseTimings {
        lease_duration: Duration::from_millis(800),
        renew_interval: Duration::from_millis(50),
        renew_deadline: Duration::from_millis(400),
        shutdown_budget: Duration::from_millis(200),
    }
}

pub(super) fn recording_fence() -> (FenceFn, mpsc::UnboundedReceiver<(Instant, String)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let fence: FenceFn = Arc::new(move |reason: String| {
        let _ = tx.send((Instant::now(), reason));
        Box::pin(async {})
    });
    (fence, rx)
}

pub(super) async fn held_by(store: &dyn LeaseStore, holder: &str) -> LeaseRecord {
    let current = store.get().await.expect("get");
    store
        .acquire(holder, &current.version)
        .await
        .expect("acquire")
}

#[tokio::test]
async fn keeper_renews_while_active_and_does_not_fence() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    let held = held_by(store.as_ref(), "a").await;
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = recording_fence();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let now = store.get().await.expect("get");
    assert_ne!(now.version, held.version, "renewals change the version");
    assert_eq!(now.holder.as_deref(), Some("a"));
    assert!(
        fenced.try_recv().is_err(),
        "a renewing holder is never fenced"
    );
    assert_eq!(keeper.mode(), KeeperMode::Active);
    task.abort();
}

#[tokio::test]
async fn keeper_fences_after_the_renew_deadline_and_not_before() {
    let store = Arc::new(Partitionable {
        inner: MemoryLeaseStore::new(Duration::from_millis(800)),
        cut: AtomicBool::new(false),
    });
    held_by(&store.inner, "a").await;
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = recording_fence();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let version_before_cut = store.inner.get().await.expect("get").version;
    // The last renewal that can succeed started no later than this instant.
    let cut_at = Instant::now();
    store.cut.store(true, Ordering::SeqCst);
    let (fenced_at, reason) = tokio::time::timeout(Duration::from_secs(5), fenced.recv())
        .await
        .expect("fenced within 5 s")
        .expect("fence called");
    assert!(reason.contains("no successful lease renewal"), "{reason}");
    // Safety bound: the deadline counts from the start of the last successful renewal, which
    // began at most one renew interval before the cut.
    let earliest = cut_at - quick_timings().renew_interval + quick_timings().renew_deadline;
    assert!(
        fenced_at >= earliest,
        "fenced {:?} before the deadline",
        earliest - fenced_at
    );
    assert_eq!(keeper.mode(), KeeperMode::Fenced);
    // Fenced: no renewals any more, even once the store is back, so the lease can expire.
    store.cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.inner.get().await.expect("get").version,
        version_before_cut
    );
    task.abort();
}

#[tokio::test]
async fn keeper_fences_at_once_when_another_instance_holds_the_lease() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    let held = held_by(store.as_ref(), "a").await;
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = recording_fence();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let current = store.get().await.expect("get");
    assert_ne!(current.version, held.version);
    store
        .acquire("b", &current.version)
        .await
        .expect("takeover");
    let (_, reason) = tokio::time::timeout(Duration::from_secs(2), fenced.recv())
        .await
        .expect("fenced")
        .expect("fence called");
    assert!(reason.contains("held by b"), "{reason}");
    task.abort();
}

#[tokio::test]
async fn keeper_waits_for_a_first_grant_within_the_deadline() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = recording_fence();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        fenced.try_recv().is_err(),
        "an unheld lease is not another holder"
    );
    held_by(store.as_ref(), "a").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(fenced.try_recv().is_err(), "granted in time: never fenced");
    task.abort();
}

#[tokio::test]
async fn keeper_fences_when_the_lease_is_never_granted() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = recording_fence();
    let task = tokio::spawn(keeper.clone().run(fence));
    let activated = Instant::now();
    keeper.activate();
    let (fenced_at, _) = tokio::time::timeout(Duration::from_secs(5), fenced.recv())
        .await
        .expect("fenced")
        .expect("fence called");
    assert!(fenced_at - activated >= quick_timings().renew_deadline);
    task.abort();
}

#[tokio::test]
async fn keeper_releases_after_a_graceful_stop() {
    let store = Arc::new(MemoryLeaseStore::new(Duration::from_millis(800)));
    held_by(store.as_ref(), "a").await;
    let keeper = LeaseKeeper::new(store.clone(), "a", quick_timings()).expect("keeper");
    let (fence, mut fenced) = recording_fence();
    let task = tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = keeper.release().await.expect("release");
    assert_eq!(released.holder, None);
    assert_eq!(keeper.mode(), KeeperMode::Idle);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fenced.try_recv().is_err(), "an idle keeper never fences");
    assert_eq!(store.get().await.expect("get").holder, None);
    task.abort();
}
