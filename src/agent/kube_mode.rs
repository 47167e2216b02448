//! The agent in a Kubernetes pod (`--role wait`): its role comes from the Lease
//! `<cluster>-primary`, which only the operator hands out (and the agents renew).
//!
//! At startup the agent waits until the Lease has a holder. The holder itself starts as primary
//! (initdb, or its existing data directory); every other instance starts as a standby of the
//! holder's pod IP, read from the holder's pod (never a Service: a returning stale primary must
//! never be followed). Later changes of role come from the operator over the HTTP API, as in
//! local mode. The same Lease is the fencing store of [`crate::coordination::AgentFencing`].

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};

use crate::coordination::{FenceInstant, KubeLeaseStore, LeaseStore};
use crate::protocol::api::{Role, Upstream};

/// How often the Lease is read while waiting for a holder.
const WAIT_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KubeModeError {
    #[error(
        "failed to configure the Kubernetes client (in-cluster config or KUBECONFIG): {source}"
    )]
    Client {
        #[source]
        source: kube::Error,
    },
    #[error("--role wait needs the Lease name (--kube-lease / PGRS_LEASE_NAME)")]
    NoLease,
    #[error("--role wait needs the namespace (--namespace / PGRS_NAMESPACE)")]
    NoNamespace,
}

/// The agent's connection to its Lease and its peers' pods.
#[derive(Clone)]
pub struct KubeMode {
    client: Client,
    namespace: String,
    lease: String,
    /// This pod's UID: the incarnation its Lease renewals claim.
    incarnation: Option<String>,
    /// Start of the read that found this instance the holder (see `wait_for_role`).
    confirmed_at: Arc<std::sync::Mutex<Option<FenceInstant>>>,
}

impl KubeMode {
    pub async fn connect(
        namespace: Option<&str>,
        lease: Option<&str>,
        incarnation: Option<&str>,
    ) -> Result<KubeMode, KubeModeError> {
        let lease = lease.ok_or(KubeModeError::NoLease)?.to_string();
        let namespace = namespace.ok_or(KubeModeError::NoNamespace)?.to_string();
        let client = Client::try_default()
            .await
            .map_err(|source| KubeModeError::Client { source })?;
        Ok(KubeMode {
            client,
            namespace,
            lease,
            incarnation: incarnation.map(str::to_string),
            confirmed_at: Arc::default(),
        })
    }

    /// The Lease as a store whose requests give up after `request_timeout`.
    pub fn store(&self, duration: Duration, request_timeout: Duration) -> Arc<KubeLeaseStore> {
        Arc::new(
            KubeLeaseStore::for_lease(self.client.clone(), &self.namespace, &self.lease, duration)
                .with_request_timeout(request_timeout)
                .with_incarnation(self.incarnation.clone()),
        )
    }

    /// When the Lease that `wait_for_role` found naming this instance the holder was last
    /// written: the proof its fencing deadline counts from (see [`proof_of_read`]).
    pub fn confirmed_at(&self) -> Option<FenceInstant> {
        *self
            .confirmed_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn describe(&self) -> String {
        format!("lease {}/{}", self.namespace, self.lease)
    }

    /// Waits until the Lease names a holder with a pod IP: `(Primary, None)` for `name` itself,
    /// else `(Replica, upstream)` streaming from the holder's pod IP on `port`. With
    /// `needs_clone` (no data directory yet) it also waits until the holder accepts connections,
    /// so that the clone does not fail and restart the pod while the primary initializes; an
    /// existing standby starts at once (it may be the one to promote).
    pub async fn wait_for_role(
        &self,
        store: &dyn LeaseStore,
        name: &str,
        port: u16,
        slot: String,
        needs_clone: bool,
    ) -> (Role, Option<Upstream>) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut logged = String::new();
        loop {
            let asked_at = FenceInstant::now();
            let state = match store.get().await {
                Ok(lease) => match lease.holder {
                    Some(holder)
                        if holder == name
                            && !same_incarnation(self.incarnation.as_deref(), &lease) =>
                    {
                        format!(
                            "the lease names {holder} as incarnation {}, not this pod ({}): the other copy may still run; waiting until the lease expires or moves",
                            lease.incarnation.as_deref().unwrap_or("?"),
                            self.incarnation.as_deref().unwrap_or("?")
                        )
                    }
                    Some(holder) if holder == name => {
                        let proof = proof_of_read(asked_at, lease.renewed_at, chrono::Utc::now());
                        *self
                            .confirmed_at
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(proof);
                        return (Role::Primary, None);
                    }
                    Some(holder) => match pods.get(&holder).await {
                        Ok(pod) => match pod.status.and_then(|s| s.pod_ip) {
                            Some(host)
                                if needs_clone && !accepts_connections(&host, port).await =>
                            {
                                format!(
                                    "waiting for the lease holder {holder} ({host}) to accept connections before cloning it"
                                )
                            }
                            Some(host) => {
                                tracing::info!(%holder, %host, "the lease holder is the primary to follow");
                                let upstream = Upstream {
                                    host,
                                    port,
                                    slot: Some(slot),
                                };
                                return (Role::Replica, Some(upstream));
                            }
                            None => format!("the lease holder {holder} has no pod IP yet"),
                        },
                        Err(error) => {
                            format!("cannot read the lease holder's pod {holder}: {error}")
                        }
                    },
                    None => "the lease has no holder yet: waiting for the operator".to_string(),
                },
                Err(error) => format!("cannot read the lease: {error}"),
            };
            if state != logged {
                tracing::info!(lease = %self.lease, "{state}");
                logged = state;
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }
}

/// Whether the Lease's incarnation (if any) is this pod's: a Lease not yet renewed since its
/// grant names none, and an agent without a known UID cannot tell.
fn same_incarnation(own: Option<&str>, lease: &crate::coordination::LeaseRecord) -> bool {
    match (own, lease.incarnation.as_deref()) {
        (Some(own), Some(current)) => own == current,
        _ => true,
    }
}

/// What a read that found this instance the holder proves: the lease was last written at
/// `renewed_at` (by this instance's previous process, or by the operator's grant), so it is
/// valid for a lease duration from about then, not from the read. The proof is dated back by
/// the write's age on the wall clock; a timestamp in the future (a skewed writer) dates it at
/// the read. A restarted primary must serve within the renew deadline of that write: it does
/// not renew while it starts (a crash-looping process would otherwise keep the lease forever).
fn proof_of_read(
    asked_at: FenceInstant,
    renewed_at: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> FenceInstant {
    let age = renewed_at
        .and_then(|at| (now - at).to_std().ok())
        .unwrap_or_default();
    asked_at.earlier_by(age)
}

async fn accepts_connections(host: &str, port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((host, port))
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_proves_the_lease_from_its_last_write() {
        let asked_at = FenceInstant::now();
        let now = chrono::Utc::now();
        let proof = proof_of_read(asked_at, Some(now - chrono::Duration::seconds(3)), now);
        let elapsed = proof.elapsed();
        assert!(
            elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(4),
            "dated back by the write's age: {elapsed:?}"
        );
    }

    #[test]
    fn a_write_from_the_future_or_unknown_dates_the_proof_at_the_read() {
        let asked_at = FenceInstant::now();
        let now = chrono::Utc::now();
        for renewed_at in [Some(now + chrono::Duration::seconds(5)), None] {
            let proof = proof_of_read(asked_at, renewed_at, now);
            assert_eq!(proof, asked_at);
        }
    }
}
