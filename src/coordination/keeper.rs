//! The agent side of fencing: keep the lease while the local postgres is primary, and shut
//! postgres down at once when the lease can no longer be proven.
//!
//! Rules (design, "Fencing"): renew every `renew_interval`; when no renewal has succeeded for
//! `renew_deadline` on this process's monotonic clock — counted from the *start* of the last
//! successful request, since the store may have written it any time after that — call the fence
//! callback (immediate shutdown). A renewal refused because another instance holds the lease
//! fences at once. After a graceful stop, release the lease so a successor needs no expiry wait.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until, timeout};

use super::lease::{LeaseError, LeaseRecord, LeaseStore, LeaseTimings, TimingsError};

/// Stops postgres immediately; called with the reason. Must not wait for sessions to finish.
pub type FenceFn = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeeperMode {
    /// Not primary: nothing to renew.
    Idle,
    /// Primary: renewing; fences when the deadline passes.
    Active,
    /// Fenced: postgres was stopped; no renewals until activated again.
    Fenced,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeeperStatus {
    pub identity: String,
    pub mode: KeeperMode,
    /// Milliseconds since the start of the last successful renewal (or activation).
    pub since_last_renewal_ms: Option<u64>,
    pub last_error: Option<String>,
    pub fence_reason: Option<String>,
}

struct Inner {
    mode: KeeperMode,
    /// Start of the last successful renewal request, or the activation time.
    proven_at: Instant,
    last_error: Option<String>,
    fence_reason: Option<String>,
}

pub struct LeaseKeeper {
    store: Arc<dyn LeaseStore>,
    identity: String,
    timings: LeaseTimings,
    inner: Mutex<Inner>,
    wake: Notify,
    /// The instant after which postgres must be down unless a renewal succeeds first (`None`
    /// while not primary): feeds the out-of-process watchdog, which enforces the deadline even
    /// when this process is frozen.
    armed_until: watch::Sender<Option<Instant>>,
}

impl LeaseKeeper {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        identity: &str,
        timings: LeaseTimings,
    ) -> Result<Arc<Self>, TimingsError> {
        timings.validate()?;
        Ok(Arc::new(LeaseKeeper {
            store,
            identity: identity.to_string(),
            timings,
            inner: Mutex::new(Inner {
                mode: KeeperMode::Idle,
                proven_at: Instant::now(),
                last_error: None,
                fence_reason: None,
            }),
            wake: Notify::new(),
            armed_until: watch::channel(None).0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows the fencing deadline; see [`LeaseKeeper::run`] and `coordination::watchdog`.
    pub fn subscribe_deadline(&self) -> watch::Receiver<Option<Instant>> {
        self.armed_until.subscribe()
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timings(&self) -> LeaseTimings {
        self.timings
    }

    /// The local postgres now runs as primary (started as one, or promoted while holding the
    /// lease): renew from now on, and fence unless a renewal succeeds within `renew_deadline`.
    pub fn activate(&self) {
        let mut inner = self.lock();
        if inner.mode != KeeperMode::Active {
            inner.mode = KeeperMode::Active;
            inner.proven_at = Instant::now();
            inner.fence_reason = None;
            self.armed_until
                .send_replace(Some(inner.proven_at + self.timings.renew_deadline));
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Stop renewing without releasing (postgres is no longer primary).
    pub fn deactivate(&self) {
        let mut inner = self.lock();
        inner.mode = KeeperMode::Idle;
        self.armed_until.send_replace(None);
        drop(inner);
        self.wake.notify_one();
    }

    pub fn mode(&self) -> KeeperMode {
        self.lock().mode
    }

    /// After a graceful stop of postgres: stop renewing and give the lease up.
    pub async fn release(&self) -> Result<LeaseRecord, LeaseError> {
        self.deactivate();
        let result = self.store.release(&self.identity).await;
        match &result {
            Ok(_) => tracing::info!(identity = %self.identity, "released the lease"),
            Err(error) => {
                tracing::warn!(identity = %self.identity, %error, "failed to release the lease")
            }
        }
        result
    }

    pub fn status(&self) -> KeeperStatus {
        let inner = self.lock();
        KeeperStatus {
            identity: self.identity.clone(),
            mode: inner.mode,
            since_last_renewal_ms: (inner.mode == KeeperMode::Active)
                .then(|| inner.proven_at.elapsed().as_millis() as u64),
            last_error: inner.last_error.clone(),
            fence_reason: inner.fence_reason.clone(),
        }
    }

    async fn fence(&self, fence: &FenceFn, reason: String) {
        {
            let mut inner = self.lock();
            if inner.mode != KeeperMode::Active {
                return;
            }
            inner.mode = KeeperMode::Fenced;
            inner.fence_reason = Some(reason.clone());
        }
        tracing::error!(identity = %self.identity, %reason, "fencing: stopping postgres immediately");
        fence(reason).await;
    }

    /// Renew while active, fence on deadline; runs until the task is dropped.
    pub async fn run(self: Arc<Self>, fence: FenceFn) {
        let LeaseTimings {
            renew_interval,
            renew_deadline,
            ..
        } = self.timings;
        loop {
            let (mode, proven_at) = {
                let inner = self.lock();
                (inner.mode, inner.proven_at)
            };
            if mode != KeeperMode::Active {
                // Sleep until activated; the timeout only guards against a missed wake-up.
                let _ = timeout(renew_interval, self.wake.notified()).await;
                continue;
            }
            let started = Instant::now();
            let deadline = proven_at + renew_deadline;
            if started >= deadline {
                self.fence(
                    &fence,
                    format!(
                        "no successful lease renewal for {} ms",
                        renew_deadline.as_millis()
                    ),
                )
                .await;
                continue;
            }
            // Never let a hung request carry us past the deadline.
            let budget = (deadline - started).min(renew_interval);
            match timeout(budget, self.store.renew(&self.identity)).await {
                Ok(Ok(_)) => {
                    let mut inner = self.lock();
                    if inner.mode == KeeperMode::Active && started > inner.proven_at {
                        inner.proven_at = started;
                        self.armed_until
                            .send_replace(Some(started + renew_deadline));
                    }
                    inner.last_error = None;
                }
                Ok(Err(LeaseError::NotHolder { current, .. })) if current.holder.is_some() => {
                    let holder = current.holder.unwrap_or_default();
                    self.fence(&fence, format!("the lease is held by {holder}"))
                        .await;
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!(identity = %self.identity, %error, "lease renewal failed");
                    self.lock().last_error = Some(error.to_string());
                }
                Err(_) => {
                    tracing::warn!(identity = %self.identity, budget_ms = budget.as_millis() as u64, "lease renewal timed out");
                    self.lock().last_error =
                        Some(format!("renewal timed out after {} ms", budget.as_millis()));
                }
            }
            let proven_at = self.lock().proven_at;
            let next = (started + renew_interval).min(proven_at + renew_deadline);
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}
