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
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

use super::lease::{LeaseError, LeaseRecord, LeaseStore};

const ABSENT_VERSION: &str = KubeLeaseStore::ABSENT_VERSION;

/// Annotation holding the exact lease duration: `leaseDurationSeconds` has whole seconds only.
const DURATION_MS_ANNOTATION: &str = "pgrs.dev/lease-duration-ms";

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
            current,
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
            let lease = match current.take() {
                Some(lease) => lease,
                None => match self.read().await? {
                    Some(lease) => lease,
                    None => {
                        return Err(LeaseError::NotHolder {
                            requester: holder.to_string(),
                            current: absent_record(self.duration),
                        });
                    }
                },
            };
            if holder_of(&lease) != Some(holder) {
                return Err(LeaseError::NotHolder {
                    requester: holder.to_string(),
                    current: self.record(&lease)?,
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
        let duration = self.duration;
        Box::pin(self.update_as_holder(holder, true, move |lease, at| renewed(lease, duration, at)))
    }

    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        expected_version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(self.acquire_lease(holder, expected_version))
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            let record = self.update_as_holder(holder, false, released).await?;
            tracing::info!(lease = %self.name, namespace = %self.namespace, holder, "lease released");
            Ok(record)
        })
    }
}

// Pure conversions between the Lease object and the record.

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn absent_record(duration: Duration) -> LeaseRecord {
    LeaseRecord {
        holder: None,
        version: ABSENT_VERSION.to_string(),
        duration,
        renewed_at: None,
        transitions: 0,
    }
}

fn resource_version(lease: &Lease) -> Option<&str> {
    lease.metadata.resource_version.as_deref()
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// The record of `lease`; `None` without a resourceVersion. The duration is the exact one from
/// the annotation, else `leaseDurationSeconds`, else `default_duration` (a Lease created by
/// someone else).
fn record_from_lease(lease: &Lease, default_duration: Duration) -> Option<LeaseRecord> {
    let version = resource_version(lease)?.to_string();
    let spec = lease.spec.clone().unwrap_or_default();
    let annotated = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DURATION_MS_ANNOTATION))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis);
    let seconds = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs);
    Some(LeaseRecord {
        holder: holder_of(lease).map(str::to_string),
        version,
        duration: annotated.or(seconds).unwrap_or(default_duration),
        renewed_at: spec.renew_time.as_ref().and_then(from_micro_time),
        transitions: spec
            .lease_transitions
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
    })
}

/// Whole seconds for `leaseDurationSeconds`, rounded up (never 0: the API rejects it).
fn duration_seconds(duration: Duration) -> i32 {
    let seconds = duration.as_millis().div_ceil(1000).max(1);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

fn to_micro_time(at: chrono::DateTime<chrono::Utc>) -> Option<MicroTime> {
    let nanos = at.timestamp_nanos_opt()?;
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .ok()
        .map(MicroTime)
}

fn from_micro_time(time: &MicroTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(
        time.0.as_second(),
        u32::try_from(time.0.subsec_nanosecond()).ok()?,
    )
}

fn set_duration(lease: &mut Lease, duration: Duration) {
    lease.metadata.annotations.get_or_insert_default().insert(
        DURATION_MS_ANNOTATION.to_string(),
        duration.as_millis().to_string(),
    );
    lease.spec.get_or_insert_default().lease_duration_seconds = Some(duration_seconds(duration));
}

/// A new Lease object, held by `holder` or unheld.
fn new_lease(
    name: &str,
    holder: Option<&str>,
    duration: Duration,
    at: chrono::DateTime<chrono::Utc>,
) -> Lease {
    let mut lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            acquire_time: holder.and(to_micro_time(at)),
            renew_time: holder.and(to_micro_time(at)),
            lease_transitions: Some(if holder.is_some() { 1 } else { 0 }),
            ..LeaseSpec::default()
        }),
    };
    set_duration(&mut lease, duration);
    lease
}

/// `lease` taken over by (or re-acquired for) `holder`; a change of holder counts a transition.
fn with_holder(
    mut lease: Lease,
    holder: &str,
    duration: Duration,
    at: chrono::DateTime<chrono::Utc>,
) -> Lease {
    let changes_holder = holder_of(&lease) != Some(holder);
    let spec = lease.spec.get_or_insert_default();
    if changes_holder {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        spec.acquire_time = to_micro_time(at);
    }
    spec.holder_identity = Some(holder.to_string());
    spec.renew_time = to_micro_time(at);
    set_duration(&mut lease, duration);
    lease
}

fn renewed(mut lease: Lease, duration: Duration, at: chrono::DateTime<chrono::Utc>) -> Lease {
    lease.spec.get_or_insert_default().renew_time = to_micro_time(at);
    set_duration(&mut lease, duration);
    lease
}

fn released(mut lease: Lease, at: chrono::DateTime<chrono::Utc>) -> Lease {
    let spec = lease.spec.get_or_insert_default();
    spec.holder_identity = None;
    spec.renew_time = to_micro_time(at);
    lease
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000, 123_456_000).unwrap()
    }

    fn stored(mut lease: Lease, version: &str) -> Lease {
        lease.metadata.resource_version = Some(version.to_string());
        lease
    }

    #[test]
    fn duration_seconds_round_up_and_are_never_zero() {
        assert_eq!(duration_seconds(Duration::from_secs(8)), 8);
        assert_eq!(duration_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(duration_seconds(Duration::from_millis(1)), 1);
        assert_eq!(duration_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn a_new_held_lease_reads_back_as_its_record() {
        let lease = stored(
            new_lease("c-primary", Some("c-0"), Duration::from_millis(2500), at()),
            "42",
        );
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.holder.as_deref(), Some("c-0"));
        assert_eq!(record.version, "42");
        assert_eq!(record.duration, Duration::from_millis(2500));
        assert_eq!(record.renewed_at, Some(at()));
        assert_eq!(record.transitions, 1);
        assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(3));
    }

    #[test]
    fn an_unheld_lease_has_no_holder_and_no_transitions() {
        let lease = stored(
            new_lease("c-primary", None, Duration::from_secs(8), at()),
            "7",
        );
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.holder, None);
        assert_eq!(record.transitions, 0);
        assert_eq!(record.renewed_at, None);
    }

    #[test]
    fn without_annotation_the_duration_comes_from_seconds_then_the_default() {
        let mut lease = stored(
            new_lease("c-primary", None, Duration::from_secs(8), at()),
            "7",
        );
        lease.metadata.annotations = None;
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.duration, Duration::from_secs(8));
        lease.spec = None;
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.duration, Duration::from_secs(99));
    }

    #[test]
    fn a_lease_without_resource_version_has_no_record() {
        let lease = new_lease("c-primary", None, Duration::from_secs(8), at());
        assert_eq!(record_from_lease(&lease, Duration::from_secs(8)), None);
    }

    #[test]
    fn only_a_change_of_holder_counts_a_transition() {
        let lease = new_lease("c-primary", Some("c-0"), Duration::from_secs(8), at());
        let same = with_holder(lease.clone(), "c-0", Duration::from_secs(8), at());
        assert_eq!(same.spec.as_ref().unwrap().lease_transitions, Some(1));
        let other = with_holder(lease, "c-1", Duration::from_secs(8), at());
        assert_eq!(other.spec.as_ref().unwrap().lease_transitions, Some(2));
        let released = released(other, at());
        assert_eq!(holder_of(&released), None);
        let back = with_holder(released, "c-1", Duration::from_secs(8), at());
        assert_eq!(back.spec.as_ref().unwrap().lease_transitions, Some(3));
    }
}
