//! The lease as a Kubernetes `coordination.k8s.io/v1` Lease named `<cluster>-primary`.
//!
//! `version` is the Lease's `resourceVersion`; every write is a replace (HTTP PUT) that carries
//! the resourceVersion it was based on, so the API server refuses it (409) when anything changed
//! meanwhile. A missing Lease reads as an unheld lease with version [`KubeLeaseStore::ABSENT_VERSION`]; acquiring
//! that version creates the Lease (create-if-absent). Agents run with a Role granting only
//! `get`/`update` on their Lease's name (RBAC cannot restrict `create` by name), so the operator
//! creates the Lease up front with [`KubeLeaseStore::create_if_absent`].
//!
//! `renewTime`/`acquireTime` are written for humans only: expiry is decided on observers'
//! monotonic clocks from version changes, never from these timestamps.

use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::{Api, Client};

use super::lease::{LeaseError, LeaseRecord, LeaseStore};

mod object;

use object::{
    ABSENT_VERSION, absent_record, error_chain, holder_of, incarnation_of, new_lease, now,
    record_from_lease, released, renewed, resource_version, with_failsafe_members, with_holder,
};

/// Writes attempted by `renew`/`release` before giving up when the Lease keeps changing under
/// them (each retry re-reads, so a takeover is seen as `NotHolder`, not retried).
const HOLDER_WRITE_ATTEMPTS: usize = 3;

/// A [`LeaseStore`] on a Kubernetes Lease.
pub struct KubeLeaseStore {
    api: Api<Lease>,
    namespace: String,
    name: String,
    duration: Duration,
    request_timeout: Duration,
    /// The Lease as last read or written, so that a renewal is one PUT instead of GET + PUT
    /// (safe: the PUT is refused when the Lease changed since).
    last_seen: Mutex<Option<Lease>>,
    /// An agent's pod UID: its renewals claim the Lease for this incarnation of its name, and
    /// are refused when another incarnation holds it (see `object::INCARNATION_ANNOTATION`).
    incarnation: Option<String>,
}

impl std::fmt::Debug for KubeLeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLeaseStore")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("duration", &self.duration)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl KubeLeaseStore {
    /// The version of a Lease that does not exist (yet); `acquire` with it creates the Lease.
    /// Kubernetes never gives an existing object an empty resourceVersion.
    pub const ABSENT_VERSION: &str = "";

    /// The Lease of `cluster`: `<cluster>-primary`.
    pub fn lease_name(cluster: &str) -> String {
        format!("{cluster}-primary")
    }

    /// The Lease `<cluster>-primary` in `namespace`; `duration` is the lease duration written
    /// into it (and reported while the Lease does not exist). Requests time out after
    /// `duration` unless [`Self::with_request_timeout`] says otherwise.
    pub fn new(client: Client, namespace: &str, cluster: &str, duration: Duration) -> Self {
        Self::for_lease(client, namespace, &Self::lease_name(cluster), duration)
    }

    /// A Lease with an explicit name.
    pub fn for_lease(client: Client, namespace: &str, name: &str, duration: Duration) -> Self {
        KubeLeaseStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            duration,
            request_timeout: duration,
            last_seen: Mutex::new(None),
            incarnation: None,
        }
    }

    /// For an agent in a pod: the Lease of `cluster` with the pod's ServiceAccount credentials,
    /// in `namespace` or else the pod's own. Must be called inside a tokio runtime.
    pub fn in_cluster(
        cluster: &str,
        namespace: Option<&str>,
        duration: Duration,
    ) -> Result<Self, LeaseError> {
        let unavailable = |what: &str, cause: &dyn std::error::Error| {
            LeaseError::Unavailable(format!(
                "{what} for Lease {} failed: {}",
                Self::lease_name(cluster),
                error_chain(cause)
            ))
        };
        let config = kube::Config::incluster()
            .map_err(|e| unavailable("reading the in-cluster configuration", &e))?;
        let namespace = namespace.unwrap_or(&config.default_namespace).to_string();
        let client = Client::try_from(config)
            .map_err(|e| unavailable("building the Kubernetes client", &e))?;
        Ok(Self::new(client, &namespace, cluster, duration))
    }

    /// Every API request gives up after `timeout` (a hung API server must not delay fencing).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// For an agent: renew and release as incarnation `incarnation` (its pod's UID) of the
    /// holder name.
    pub fn with_incarnation(mut self, incarnation: Option<String>) -> Self {
        self.incarnation = incarnation.filter(|uid| !uid.is_empty());
        self
    }

    pub fn incarnation(&self) -> Option<&str> {
        self.incarnation.as_deref()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// For the operator: creates the Lease unheld unless it exists, and returns it. Needs the
    /// `create` verb, which agents do not have.
    pub async fn create_if_absent(&self) -> Result<LeaseRecord, LeaseError> {
        if let Some(lease) = self.read().await? {
            return self.record(&lease);
        }
        let lease = new_lease(&self.name, None, self.duration, now());
        match self
            .call("create", self.api.create(&PostParams::default(), &lease))
            .await?
        {
            Ok(created) => self.remember(created),
            Err(status) if status.is_already_exists() => match self.read().await? {
                Some(lease) => self.record(&lease),
                None => Err(self.unavailable("create", "created by someone else, then deleted")),
            },
            Err(status) => Err(self.api_refused("create", &status)),
        }
    }

    async fn get_record(&self) -> Result<LeaseRecord, LeaseError> {
        match self.read().await? {
            Some(lease) => self.record(&lease),
            None => Ok(absent_record(self.duration)),
        }
    }

    async fn acquire_lease(
        &self,
        holder: &str,
        expected_version: &str,
    ) -> Result<LeaseRecord, LeaseError> {
        let conflict = |current| LeaseError::Conflict {
            expected: expected_version.to_string(),
            current: Box::new(current),
        };
        if expected_version == ABSENT_VERSION {
            let lease = new_lease(&self.name, Some(holder), self.duration, now());
            return match self
                .call("create", self.api.create(&PostParams::default(), &lease))
                .await?
            {
                Ok(created) => {
                    tracing::info!(lease = %self.name, namespace = %self.namespace, holder, "lease created and acquired");
                    self.remember(created)
                }
                Err(status) if status.is_already_exists() => {
                    Err(conflict(self.get_record().await?))
                }
                Err(status) => Err(self.api_refused("create", &status)),
            };
        }
        let Some(current) = self.read().await? else {
            return Err(conflict(absent_record(self.duration)));
        };
        if resource_version(&current) != Some(expected_version) {
            return Err(conflict(self.record(&current)?));
        }
        let mut next = with_holder(current, holder, self.duration, now());
        // The API server checks the caller's version itself, whatever was read above.
        next.metadata.resource_version = Some(expected_version.to_string());
        match self.replace(&next).await? {
            Ok(written) => {
                tracing::info!(lease = %self.name, namespace = %self.namespace, holder, expected_version, "lease acquired");
                self.remember(written)
            }
            Err(status) if status.is_conflict() => Err(conflict(self.get_record().await?)),
            Err(status) => Err(self.api_refused("update", &status)),
        }
    }

    /// Applies `change` to the Lease on behalf of its holder `holder`: refused with `NotHolder`
    /// unless `holder` holds it; re-read and retried when the Lease changed meanwhile.
    async fn update_as_holder(
        &self,
        holder: &str,
        use_cached: bool,
        change: impl Fn(Lease, chrono::DateTime<chrono::Utc>) -> Lease,
    ) -> Result<LeaseRecord, LeaseError> {
        let mut current = if use_cached { self.cached() } else { None };
        let mut last_status = None;
        for _ in 0..HOLDER_WRITE_ATTEMPTS {
            let cached = current.take();
            let from_cache = cached.is_some();
            let lease = match cached {
                Some(lease) => lease,
                None => match self.read().await? {
                    Some(lease) => lease,
                    None => {
                        return Err(LeaseError::NotHolder {
                            requester: holder.to_string(),
                            current: Box::new(absent_record(self.duration)),
                        });
                    }
                },
            };
            let other_incarnation = match (self.incarnation(), incarnation_of(&lease)) {
                (Some(own), Some(current)) if own != current => Some(current.to_string()),
                _ => None,
            };
            if from_cache && (holder_of(&lease) != Some(holder) || other_incarnation.is_some()) {
                // A refusal is only ever based on a fresh read: the cache may be stale.
                continue;
            }
            if holder_of(&lease) != Some(holder) {
                return Err(LeaseError::NotHolder {
                    requester: holder.to_string(),
                    current: Box::new(self.record(&lease)?),
                });
            }
            if let Some(current) = other_incarnation {
                return Err(LeaseError::OtherIncarnation {
                    holder: holder.to_string(),
                    requester: self.incarnation().unwrap_or_default().to_string(),
                    current,
                });
            }
            match self.replace(&change(lease, now())).await? {
                Ok(written) => return self.remember(written),
                // Changed since it was read (or the cache was stale): read again.
                Err(status) if status.is_conflict() => last_status = Some(status),
                Err(status) => return Err(self.api_refused("update", &status)),
            }
        }
        let detail = last_status.map(|s| s.message).unwrap_or_default();
        Err(self.unavailable(
            "update",
            &format!("the Lease kept changing during {HOLDER_WRITE_ATTEMPTS} attempts: {detail}"),
        ))
    }

    async fn read(&self) -> Result<Option<Lease>, LeaseError> {
        match self.call("get", self.api.get(&self.name)).await? {
            Ok(lease) => {
                self.set_cache(Some(lease.clone()));
                Ok(Some(lease))
            }
            Err(status) if status.is_not_found() => {
                self.set_cache(None);
                Ok(None)
            }
            Err(status) => Err(self.api_refused("get", &status)),
        }
    }

    async fn replace(
        &self,
        lease: &Lease,
    ) -> Result<Result<Lease, Box<kube::core::Status>>, LeaseError> {
        self.call(
            "update",
            self.api.replace(&self.name, &PostParams::default(), lease),
        )
        .await
    }

    /// Runs one API request with the timeout. The outer error is the store being unreachable;
    /// the inner one the API server's answer, for the caller to interpret.
    async fn call<T>(
        &self,
        action: &str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, Box<kube::core::Status>>, LeaseError> {
        match tokio::time::timeout(self.request_timeout, request).await {
            Err(_) => Err(self.unavailable(
                action,
                &format!("no answer within {:?}", self.request_timeout),
            )),
            Ok(Ok(value)) => Ok(Ok(value)),
            Ok(Err(kube::Error::Api(status))) => Ok(Err(status)),
            Ok(Err(error)) => Err(self.unavailable(action, &error_chain(&error))),
        }
    }

    fn remember(&self, lease: Lease) -> Result<LeaseRecord, LeaseError> {
        let record = self.record(&lease)?;
        self.set_cache(Some(lease));
        Ok(record)
    }

    fn cached(&self) -> Option<Lease> {
        self.last_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_cache(&self, lease: Option<Lease>) {
        *self
            .last_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = lease;
    }

    fn record(&self, lease: &Lease) -> Result<LeaseRecord, LeaseError> {
        record_from_lease(lease, self.duration).ok_or_else(|| {
            self.unavailable(
                "get",
                "the API server returned it without a resourceVersion",
            )
        })
    }

    fn unavailable(&self, action: &str, cause: &str) -> LeaseError {
        LeaseError::Unavailable(format!(
            "{action} of Lease {}/{} failed: {cause}",
            self.namespace, self.name
        ))
    }

    fn api_refused(&self, action: &str, status: &kube::core::Status) -> LeaseError {
        tracing::warn!(lease = %self.name, namespace = %self.namespace, action, code = status.code, reason = %status.reason, message = %status.message, "lease request refused");
        self.unavailable(
            action,
            &format!(
                "the API server answered HTTP {} {}: {}",
                status.code, status.reason, status.message
            ),
        )
    }
}

impl LeaseStore for KubeLeaseStore {
    fn get(&self) -> BoxFuture<'_, Result<LeaseRecord, LeaseError>> {
        Box::pin(self.get_record())
    }

    fn renew<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        let (duration, incarnation) = (self.duration, self.incarnation());
        Box::pin(self.update_as_holder(holder, true, move |lease, at| {
            renewed(lease, duration, at, incarnation)
        }))
    }

    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        expected_version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(self.acquire_lease(holder, expected_version))
    }

    fn set_failsafe_members<'a>(
        &'a self,
        holder: &'a str,
        members: Option<Vec<String>>,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        let (duration, incarnation) = (self.duration, self.incarnation());
        Box::pin(self.update_as_holder(holder, true, move |lease, at| {
            with_failsafe_members(
                renewed(lease, duration, at, incarnation),
                members.as_deref(),
            )
        }))
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            let record = self.update_as_holder(holder, false, released).await?;
            tracing::info!(lease = %self.name, namespace = %self.namespace, holder, "lease released");
            Ok(record)
        })
    }
}
