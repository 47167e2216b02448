//! The agent side of fencing: keep the lease while the local postgres is primary, and shut
//! postgres down at once when the lease can no longer be proven.
//!
//! Rules (design, "Fencing"; issue 12):
//! - Renew every `renew_interval`; when no confirmation of the lease has succeeded for
//!   `renew_deadline` — counted from the *start* of the last successful request (a renewal, or
//!   the read that allowed a promotion), since the store may have written it any time after
//!   that — call the fence callback (immediate shutdown). Activation does not restart the
//!   count: a keeper activated on a confirmation older than the deadline fences at once.
//! - A renewal refused because another instance holds the lease fences at once; so does one
//!   that finds the lease free once this keeper has held it (a free lease is grantable at once),
//!   and one refused because another incarnation of the same pod name holds it.
//! - A primary that has not served for the start budget (postgres down, restarting) fences, so
//!   that the lease expires and a replica can take over; a first primary's bootstrap has the
//!   longer [`BOOTSTRAP_BUDGET`] (no replica has data to take over with yet).
//! - Time is [`FenceInstant`]: boot clock and monotonic clock, whichever is further.
//! - After a clean stop, release the lease so a successor needs no expiry wait.
//! - With the failsafe ([`Failsafe`]): a renewal that fails because the store is unreachable
//!   (not refused) is followed by a round of confirmations; when every member the lease names
//!   confirms, the round's start proves the lease like a renewal would. The holder writes the
//!   member list into the lease after a renewal whenever it differs.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::{sleep, timeout};

use super::clock::FenceInstant;
use super::failsafe::Failsafe;
use super::lease::{LeaseError, LeaseRecord, LeaseStore, LeaseTimings, TimingsError};

/// Stops postgres immediately; called with the reason. Must not wait for sessions to finish.
pub type FenceFn = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

/// How long a primary may be down (restarting) before it stops renewing by default.
pub const DEFAULT_START_BUDGET: Duration = Duration::from_secs(10);

/// How long a first primary's bootstrap (initdb, first start) may take before it stops renewing.
/// Longer than the start budget: before the first primary serves, no replica has data, so there
/// is nothing to fail over to; but bounded, so a bootstrap that never ends gives the lease up.
pub const BOOTSTRAP_BUDGET: Duration = Duration::from_secs(300);

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
    /// Milliseconds since the start of the last successful confirmation (or activation).
    pub since_last_renewal_ms: Option<u64>,
    pub last_error: Option<String>,
    pub fence_reason: Option<String>,
}

struct Inner {
    mode: KeeperMode,
    /// The fencing deadline's base: start of the last successful confirmation, or the activation
    /// time when the keeper was activated without any (a primary waiting for its first grant).
    proven_at: FenceInstant,
    /// Start of the last request that found this instance the holder (any mode).
    confirmed_at: Option<FenceInstant>,
    /// The lease has been proven held for the current activation: from then on a free lease
    /// means it was released or deleted, and fences at once.
    held: bool,
    /// Since when the primary has not been serving (postgres down or restarting).
    not_serving_since: Option<FenceInstant>,
    /// Not serving because it is a first primary's bootstrap: [`BOOTSTRAP_BUDGET`] applies.
    bootstrapping: bool,
    last_error: Option<String>,
    fence_reason: Option<String>,
}

pub struct LeaseKeeper {
    store: Arc<dyn LeaseStore>,
    identity: String,
    timings: LeaseTimings,
    start_budget: Mutex<Duration>,
    inner: Mutex<Inner>,
    wake: Notify,
    /// The instant after which postgres must be down unless a renewal succeeds first (`None`
    /// while not primary): feeds the out-of-process watchdog, which enforces the deadline even
    /// when this process is frozen.
    armed_until: watch::Sender<Option<FenceInstant>>,
    failsafe: OnceLock<Arc<Failsafe>>,
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
            start_budget: Mutex::new(DEFAULT_START_BUDGET),
            inner: Mutex::new(Inner {
                mode: KeeperMode::Idle,
                proven_at: FenceInstant::now(),
                confirmed_at: None,
                held: false,
                not_serving_since: None,
                bootstrapping: false,
                last_error: None,
                fence_reason: None,
            }),
            wake: Notify::new(),
            armed_until: watch::channel(None).0,
            failsafe: OnceLock::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serve on the members' confirmations while the store is unreachable (see [`Failsafe`]).
    /// Set once, when the agent starts; a later call changes nothing.
    pub fn set_failsafe(&self, failsafe: Arc<Failsafe>) {
        let _ = self.failsafe.set(failsafe);
    }

    pub fn failsafe(&self) -> Option<Arc<Failsafe>> {
        self.failsafe.get().cloned()
    }

    /// A request that started at `started` proved this instance the holder (a renewal, a
    /// round of the members' confirmations, the promotion gate's renewal, the Kubernetes
    /// start's read): a later activation counts from it, an active keeper's deadline too.
    pub fn confirm(&self, started: FenceInstant) {
        let mut inner = self.lock();
        if inner.confirmed_at.is_none_or(|c| started.is_after(c)) {
            inner.confirmed_at = Some(started);
        }
        if inner.mode == KeeperMode::Active && started.is_after(inner.proven_at) {
            inner.proven_at = started;
            inner.held = true;
            self.armed_until
                .send_replace(Some(started + self.timings.renew_deadline));
        }
        inner.last_error = None;
    }

    /// After a renewal: write the failsafe member list into the lease when it changed.
    async fn write_failsafe_members(&self, failsafe: &Failsafe, budget: Duration) {
        let Some(members) = failsafe.wanted_lease_members() else {
            return;
        };
        let result = timeout(
            budget,
            self.store
                .set_failsafe_members(&self.identity, members.clone()),
        )
        .await;
        match result {
            Ok(Ok(record)) => {
                tracing::info!(identity = %self.identity, members = ?record.failsafe_members, "failsafe member list written to the lease");
                failsafe.note_lease_members(members.as_deref(), Some(&record));
            }
            Ok(Err(error)) => {
                tracing::warn!(identity = %self.identity, %error, "failed to write the failsafe member list");
                failsafe.note_lease_members(members.as_deref(), None);
            }
            Err(_) => failsafe.note_lease_members(members.as_deref(), None),
        }
    }

    /// The store could not be reached: a round of the members' confirmations, within the
    /// deadline. Proves the lease from the round's start when every member confirmed.
    async fn failsafe_round(&self, budget: Duration) {
        let Some(failsafe) = self.failsafe() else {
            return;
        };
        if !failsafe.enabled() || budget.is_zero() {
            return;
        }
        let started = FenceInstant::now();
        match timeout(budget, failsafe.ask_members(budget)).await {
            Ok(Ok(())) => self.confirm(started),
            Ok(Err(error)) => {
                tracing::warn!(identity = %self.identity, %error, "failsafe: not every member confirmed");
            }
            Err(_) => {
                tracing::warn!(identity = %self.identity, budget_ms = budget.as_millis() as u64, "failsafe: confirmations timed out");
            }
        }
    }

    /// Follows the fencing deadline; see [`LeaseKeeper::run`] and `coordination::watchdog`.
    pub fn subscribe_deadline(&self) -> watch::Receiver<Option<FenceInstant>> {
        self.armed_until.subscribe()
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timings(&self) -> LeaseTimings {
        self.timings
    }

    pub fn start_budget(&self) -> Duration {
        *self
            .start_budget
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long a primary may stay down before it fences (default [`DEFAULT_START_BUDGET`]).
    pub fn set_start_budget(&self, budget: Duration) {
        *self
            .start_budget
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = budget;
    }

    /// Whether the lease was ever confirmed held by this instance.
    pub fn confirmed(&self) -> bool {
        self.lock().confirmed_at.is_some()
    }

    /// The local postgres now runs as primary (started as one, or its promotion signalled):
    /// renew from now on, and fence unless a renewal succeeds within `renew_deadline` of the
    /// last confirmation (of the activation when there was none: a first grant is awaited).
    pub fn activate(&self) {
        let mut inner = self.lock();
        if inner.mode != KeeperMode::Active {
            inner.mode = KeeperMode::Active;
            (inner.proven_at, inner.held) = match inner.confirmed_at {
                Some(confirmed) => (confirmed, true),
                None => (FenceInstant::now(), false),
            };
            inner.fence_reason = None;
            inner.not_serving_since = None;
            let deadline = inner.proven_at + self.timings.renew_deadline;
            tracing::info!(
                identity = %self.identity,
                remaining_ms = deadline.remaining().as_millis() as u64,
                "lease keeper active"
            );
            self.armed_until.send_replace(Some(deadline));
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Whether the primary is serving; while it is not (restarting), the start budget runs.
    pub fn note_serving(&self, serving: bool) {
        let mut inner = self.lock();
        inner.bootstrapping = false;
        match (serving, inner.not_serving_since) {
            (true, Some(_)) => inner.not_serving_since = None,
            (false, None) => {
                inner.not_serving_since = Some(FenceInstant::now());
                drop(inner);
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    /// A first primary's bootstrap (initdb, first start) is under way: not serving yet, within
    /// the bootstrap budget rather than the start budget.
    pub fn note_bootstrapping(&self) {
        self.note_serving(false);
        self.lock().bootstrapping = true;
    }

    /// How long the primary may stay not serving: the start budget, or the bootstrap budget
    /// while a first bootstrap runs.
    fn effective_start_budget(&self) -> Duration {
        let start_budget = self.start_budget();
        if self.lock().bootstrapping {
            start_budget.max(BOOTSTRAP_BUDGET)
        } else {
            start_budget
        }
    }

    /// Stop renewing without releasing (postgres is no longer primary).
    pub fn deactivate(&self) {
        let mut inner = self.lock();
        inner.mode = KeeperMode::Idle;
        inner.not_serving_since = None;
        // No longer primary: an earlier proof must not carry over to a later activation.
        inner.confirmed_at = None;
        self.armed_until.send_replace(None);
        drop(inner);
        if let Some(failsafe) = self.failsafe() {
            failsafe.reset_primary();
        }
        self.wake.notify_one();
    }

    pub fn mode(&self) -> KeeperMode {
        self.lock().mode
    }

    /// After a clean stop of postgres: stop renewing and give the lease up.
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
            inner.confirmed_at = None;
        }
        tracing::error!(identity = %self.identity, %reason, "fencing: stopping postgres immediately");
        fence(reason).await;
        // postgres is down: the watchdog must not kill the next one (a quick rejoin's replica).
        if self.lock().mode == KeeperMode::Fenced {
            self.armed_until.send_replace(None);
        }
    }

    /// Renew while active, fence on deadline; runs until the task is dropped.
    pub async fn run(self: Arc<Self>, fence: FenceFn) {
        let LeaseTimings {
            renew_interval,
            renew_deadline,
            ..
        } = self.timings;
        loop {
            let (mode, proven_at, not_serving_since) = {
                let inner = self.lock();
                (inner.mode, inner.proven_at, inner.not_serving_since)
            };
            if mode != KeeperMode::Active {
                // Sleep until activated; the timeout only guards against a missed wake-up.
                let _ = timeout(renew_interval, self.wake.notified()).await;
                continue;
            }
            let deadline = proven_at + renew_deadline;
            if deadline.has_passed() {
                self.fence(
                    &fence,
                    format!(
                        "no successful lease renewal (or other confirmation) for {} ms",
                        renew_deadline.as_millis()
                    ),
                )
                .await;
                continue;
            }
            let start_budget = self.effective_start_budget();
            if let Some(since) = not_serving_since
                && (since + start_budget).has_passed()
            {
                self.fence(
                    &fence,
                    format!(
                        "postgres has not served as primary for its start budget of {} ms: giving the lease up to expiry so that a replica can take over",
                        start_budget.as_millis()
                    ),
                )
                .await;
                continue;
            }
            let started = FenceInstant::now();
            // Never let a hung request carry us past the deadline.
            let budget = deadline.remaining().min(renew_interval);
            match timeout(budget, self.store.renew(&self.identity)).await {
                Ok(Ok(_)) => {
                    self.confirm(started);
                    if let Some(failsafe) = self.failsafe() {
                        failsafe.note_renewed();
                        let budget = (started + renew_deadline).remaining().min(renew_interval);
                        self.write_failsafe_members(&failsafe, budget).await;
                    }
                }
                Ok(Err(LeaseError::NotHolder { current, .. })) => {
                    let held = self.lock().held;
                    match current.holder {
                        Some(holder) => {
                            self.fence(&fence, format!("the lease is held by {holder}"))
                                .await;
                            continue;
                        }
                        None if held => {
                            self.fence(
                                &fence,
                                "the lease has no holder (released or deleted): it may be granted to another instance at once".to_string(),
                            )
                            .await;
                            continue;
                        }
                        None => {
                            tracing::info!(identity = %self.identity, "the lease is not granted yet");
                            self.lock().last_error = Some("the lease is not granted yet".into());
                        }
                    }
                }
                Ok(Err(error @ LeaseError::OtherIncarnation { .. })) => {
                    self.fence(&fence, error.to_string()).await;
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!(identity = %self.identity, %error, "lease renewal failed");
                    let unreachable = matches!(error, LeaseError::Unavailable(_));
                    self.lock().last_error = Some(error.to_string());
                    if unreachable {
                        self.failsafe_round(deadline.remaining().min(renew_interval))
                            .await;
                    }
                }
                Err(_) => {
                    tracing::warn!(identity = %self.identity, budget_ms = budget.as_millis() as u64, "lease renewal timed out");
                    self.lock().last_error =
                        Some(format!("renewal timed out after {} ms", budget.as_millis()));
                    self.failsafe_round(deadline.remaining().min(renew_interval))
                        .await;
                }
            }
            let (proven_at, not_serving_since) = {
                let inner = self.lock();
                (inner.proven_at, inner.not_serving_since)
            };
            let mut pause = renew_interval
                .saturating_sub(started.elapsed())
                .min((proven_at + renew_deadline).remaining());
            if let Some(since) = not_serving_since {
                pause = pause.min((since + start_budget).remaining());
            }
            tokio::select! {
                _ = sleep(pause) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}
