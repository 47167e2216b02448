//! The lease contract: who may be primary. One lease per cluster; `holder` is the only instance
//! allowed to accept writes. Every write changes the opaque `version` (renewals included), which
//! is what observers time: a lease whose version has not changed for a full lease duration on the
//! observer's own clock is expired, whatever any timestamp in it says.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The instance allowed to be primary; `None` when released or never held.
    pub holder: Option<String>,
    /// Opaque optimistic-concurrency token (a Kubernetes `resourceVersion`, or a counter).
    pub version: String,
    /// How long observers wait, on their own clocks, after the last change before a takeover.
    #[serde(with = "duration_millis")]
    pub duration: Duration,
    /// Wall-clock time of the last write, for humans only: never used for expiry decisions.
    pub renewed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// How many times the holder changed.
    pub transitions: u64,
    /// Which incarnation of the holder (its pod's UID) renews it, where the store tells them
    /// apart (the Kubernetes Lease); `None` until the holder's first renewal after a grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    /// The members the holder asks to confirm it while the store is unreachable (the failsafe),
    /// written by the holder; kept when the lease changes hands (the former holder may still
    /// serve on them) until the next holder writes its own. `None`: no failsafe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_members: Option<Vec<String>>,
}

mod duration_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(deserializer)?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "lease changed meanwhile: expected version {expected}, found version {} held by {}",
        .current.version,
        .current.holder.as_deref().unwrap_or("nobody")
    )]
    Conflict {
        expected: String,
        current: Box<LeaseRecord>,
    },
    #[error(
        "{requester} does not hold the lease (holder: {})",
        .current.holder.as_deref().unwrap_or("nobody")
    )]
    NotHolder {
        requester: String,
        current: Box<LeaseRecord>,
    },
    #[error(
        "the lease is held by {holder} as incarnation {current}, not by this incarnation {requester} of it (a copy of the same pod still runs, or ran until lately)"
    )]
    OtherIncarnation {
        holder: String,
        requester: String,
        current: String,
    },
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    #[error("failed to persist the lease to {path}: {source}")]
    Persist {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// "Who may be primary", as a store. Dyn-compatible (boxed futures) so that the local HTTP
/// service, the in-process store and the Kubernetes Lease implement it alike.
pub trait LeaseStore: Send + Sync {
    /// The current lease.
    fn get(&self) -> BoxFuture<'_, Result<LeaseRecord, LeaseError>>;

    /// Extend the lease for `holder`, which must be the current holder; changes the version.
    fn renew<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>>;

    /// Make `holder` the holder, only if the lease still has `expected_version`.
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        expected_version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>>;

    /// Give the lease up (holder becomes `None`), only if `holder` still holds it. Called after
    /// postgres has been shut down, so that a planned stop needs no expiry wait.
    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>>;

    /// Write the failsafe member list (`None` clears it), only if `holder` still holds the
    /// lease; a write like a renewal (changes the version).
    fn set_failsafe_members<'a>(
        &'a self,
        holder: &'a str,
        members: Option<Vec<String>>,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>>;
}

/// Lease timings. Safety needs `renew_deadline + shutdown_budget < lease_duration`: a holder that
/// cannot renew fences itself after `renew_deadline` (counted from the start of its last
/// successful renewal request), postgres is down `shutdown_budget` later, and only then can an
/// observer, which waits a full `lease_duration` after it first saw that renewal, take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseTimings {
    pub lease_duration: Duration,
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
    pub shutdown_budget: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    #[error(
        "renew deadline ({deadline:?}) + shutdown budget ({budget:?}) must be shorter than the lease duration ({lease:?}), or a fenced primary could still write after another was promoted"
    )]
    DeadlineTooLong {
        deadline: Duration,
        budget: Duration,
        lease: Duration,
    },
    #[error("renew interval ({interval:?}) must be shorter than the renew deadline ({deadline:?})")]
    IntervalTooLong {
        interval: Duration,
        deadline: Duration,
    },
    #[error("lease timings must be positive")]
    Zero,
    #[error("unknown lease profile {0:?} (expected default or aggressive)")]
    UnknownProfile(String),
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            lease_duration: Duration::from_secs(8),
            renew_interval: Duration::from_secs(1),
            renew_deadline: Duration::from_secs(5),
            shutdown_budget: Duration::from_secs(2),
        }
    }
}

impl LeaseTimings {
    /// Faster hard-kill failover at the cost of more lease writes and less tolerance for a slow
    /// lease store: 3 s lease, renew every 500 ms, fence after 1.5 s, 1 s to stop postgres.
    pub fn aggressive() -> Self {
        LeaseTimings {
            lease_duration: Duration::from_secs(3),
            renew_interval: Duration::from_millis(500),
            renew_deadline: Duration::from_millis(1500),
            shutdown_budget: Duration::from_secs(1),
        }
    }

    pub fn profile(name: &str) -> Result<Self, TimingsError> {
        match name {
            "default" => Ok(Self::default()),
            "aggressive" => Ok(Self::aggressive()),
            other => Err(TimingsError::UnknownProfile(other.to_string())),
        }
    }

    pub fn validate(&self) -> Result<(), TimingsError> {
        if self.lease_duration.is_zero()
            || self.renew_interval.is_zero()
            || self.renew_deadline.is_zero()
        {
            return Err(TimingsError::Zero);
        }
        if self.renew_interval >= self.renew_deadline {
            return Err(TimingsError::IntervalTooLong {
                interval: self.renew_interval,
                deadline: self.renew_deadline,
            });
        }
        if self.renew_deadline + self.shutdown_budget >= self.lease_duration {
            return Err(TimingsError::DeadlineTooLong {
                deadline: self.renew_deadline,
                budget: self.shutdown_budget,
                lease: self.lease_duration,
            });
        }
        Ok(())
    }
}
