//! Leader election between operator replicas on a `coordination.k8s.io/v1` Lease (default
//! `pgrs-operator` in the operator's namespace). Only the holder runs the controller; the others
//! wait. Built on [`KubeLeaseStore`], the same optimistic-concurrency Lease code the database
//! instances use: every write carries the resourceVersion it read, and a holder counts as gone
//! only when its Lease has not changed for a full lease duration on the waiting replica's own
//! monotonic clock (never from `renewTime`, so clock skew between nodes does not matter).
//!
//! Safety: a leader that cannot renew for `renew_deadline` (counted from the start of its last
//! successful renewal) gives up; another replica takes over only after seeing the Lease
//! unchanged for `lease_duration > renew_deadline`, so two leaders never reconcile at once as
//! long as the old one stops within `lease_duration - renew_deadline`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kube::Client;

use crate::coordination::{KubeLeaseStore, LeaseError, LeaseStore as _};

/// Default Lease name.
pub const DEFAULT_LEASE_NAME: &str = "pgrs-operator";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionSettings {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name in `holderIdentity` (the pod name in a cluster).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error(
        "invalid leader election timings: need retry period ({retry:?}) < renew deadline ({deadline:?}) < lease duration ({lease:?})"
    )]
    Timings {
        retry: Duration,
        deadline: Duration,
        lease: Duration,
    },
}

impl ElectionSettings {
    pub fn check(&self) -> Result<(), ElectionError> {
        if self.retry_period.is_zero()
            || self.retry_period >= self.renew_deadline
            || self.renew_deadline >= self.lease_duration
        {
            return Err(ElectionError::Timings {
                retry: self.retry_period,
                deadline: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        Ok(())
    }
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    #[error("the Lease {lease} is now held by {}", .holder.as_deref().unwrap_or("nobody"))]
    TakenOver {
        lease: String,
        holder: Option<String>,
    },
    #[error("could not renew the Lease {lease} for {deadline:?}: {last_error}")]
    RenewDeadline {
        lease: String,
        deadline: Duration,
        last_error: String,
    },
}

/// What `/readyz` and `/metrics` show.
#[derive(Debug, Default)]
pub struct Leadership {
    leader: AtomicBool,
    /// How often this process became the leader.
    pub acquisitions: AtomicU64,
    /// The holder as last seen (this process when leading).
    holder: Mutex<Option<String>>,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn holder(&self) -> Option<String> {
        self.holder.lock().ok().and_then(|h| h.clone())
    }

    fn set(&self, leader: bool, holder: Option<String>) {
        self.leader.store(leader, Ordering::Relaxed);
        if let Ok(mut slot) = self.holder.lock() {
            *slot = holder;
        }
    }
}

pub struct Elector {
    store: KubeLeaseStore,
    settings: ElectionSettings,
    pub leadership: std::sync::Arc<Leadership>,
}

impl Elector {
    pub fn new(client: Client, settings: ElectionSettings) -> Result<Elector, ElectionError> {
        settings.check()?;
        let store = KubeLeaseStore::for_lease(
            client,
            &settings.namespace,
            &settings.lease_name,
            settings.lease_duration,
        )
        // A hung API server must not hold a renewal past the deadline.
        .with_request_timeout(settings.retry_period);
        Ok(Elector {
            store,
            settings,
            leadership: Default::default(),
        })
    }

    pub fn settings(&self) -> &ElectionSettings {
        &self.settings
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.lease_name)
    }

    /// Returns once this process holds the Lease.
    pub async fn acquire(&self) {
        let me = self.settings.identity.as_str();
        // (holder, version) as first seen and when: expiry on our own clock.
        let mut seen: Option<(Option<String>, String, Instant)> = None;
        let mut logged = String::new();
        loop {
            let state = match self.store.get().await {
                Ok(lease) => {
                    let since = match &seen {
                        Some((holder, version, at))
                            if *holder == lease.holder && *version == lease.version =>
                        {
                            *at
                        }
                        _ => Instant::now(),
                    };
                    seen = Some((lease.holder.clone(), lease.version.clone(), since));
                    self.leadership.set(false, lease.holder.clone());
                    let wait = lease.duration.max(self.settings.lease_duration);
                    let attempt = match lease.holder.as_deref() {
                        // Our own identity (a restart under the same pod name): renew it.
                        Some(holder) if holder == me => self
                            .store
                            .renew(me)
                            .await
                            .map_err(|e| format!("could not renew the Lease: {e}")),
                        Some(holder) if since.elapsed() < wait => {
                            Err(format!("waiting: {holder} leads"))
                        }
                        _ => self
                            .store
                            .acquire(me, &lease.version)
                            .await
                            .map_err(|e| format!("could not take the Lease: {e}")),
                    };
                    match attempt {
                        Ok(_) => {
                            self.leadership.set(true, Some(me.to_string()));
                            self.leadership.acquisitions.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(lease = %self.lease(), identity = me, previous = ?lease.holder, "became the leader");
                            return;
                        }
                        Err(state) => state,
                    }
                }
                Err(error) => format!("could not read the Lease: {error}"),
            };
            if state != logged {
                tracing::info!(lease = %self.lease(), identity = me, "{state}");
                logged = state;
            }
            tokio::time::sleep(self.settings.retry_period).await;
        }
    }

    /// Renews the Lease every retry period; returns when leadership is lost.
    pub async fn hold(&self) -> Lost {
        let me = self.settings.identity.as_str();
        let mut last_renewal_started = Instant::now();
        let mut last_error = String::from("no renewal attempted yet");
        loop {
            tokio::time::sleep(self.settings.retry_period).await;
            let started = Instant::now();
            match self.store.renew(me).await {
                Ok(_) => last_renewal_started = started,
                Err(LeaseError::NotHolder { current, .. }) => {
                    self.leadership.set(false, current.holder.clone());
                    return Lost::TakenOver {
                        lease: self.lease(),
                        holder: current.holder,
                    };
                }
                Err(error) => {
                    tracing::warn!(lease = %self.lease(), %error, "failed to renew the leader Lease");
                    last_error = error.to_string();
                }
            }
            if last_renewal_started.elapsed() >= self.settings.renew_deadline {
                self.leadership.set(false, None);
                return Lost::RenewDeadline {
                    lease: self.lease(),
                    deadline: self.settings.renew_deadline,
                    last_error,
                };
            }
        }
    }

    /// Gives the Lease up after a clean stop, so that another replica need not wait for it to
    /// expire.
    pub async fn release(&self) {
        match self.store.release(&self.settings.identity).await {
            Ok(_) => tracing::info!(lease = %self.lease(), "released the leader Lease"),
            Err(error) => {
                tracing::warn!(lease = %self.lease(), %error, "failed to release the leader Lease")
            }
        }
        self.leadership.set(false, None);
    }
}

/// This process's default identity: the pod name, else `<hostname>-<pid>`.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "operator".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(retry: u64, deadline: u64, lease: u64) -> ElectionSettings {
        ElectionSettings {
            namespace: "ns".to_string(),
            lease_name: DEFAULT_LEASE_NAME.to_string(),
            identity: "a".to_string(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(deadline),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn timings_must_leave_the_old_leader_time_to_stop() {
        assert!(settings(2, 10, 15).check().is_ok());
        assert!(settings(2, 15, 15).check().is_err());
        assert!(settings(10, 10, 15).check().is_err());
        assert!(settings(0, 10, 15).check().is_err());
    }
}
