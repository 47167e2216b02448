//! Operator mode: from each `PgReplicaSet` (its status) and its fencing Lease to the
//! dashboard's API types. The clusters come from a watch cache (`super::operator_router`); the
//! mapping is pure; [`read_leases`] is the only read of the API server (a bounded GET of each
//! cluster's Lease), made only while someone looks at the dashboard.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, ResourceExt as _};

use crate::api::{FailoverRecord, InstanceRole, InstanceStatus, PgReplicaSet, SyncState};
use crate::dashboard::ClusterMemory;
use crate::dashboard::api::{ClusterView, FailoverView, LeaseView, NodeView};
use crate::dashboard::history::NodeLag;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("failed to read the Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read the Lease {namespace}/{name} within {bound:?}")]
    Timeout {
        namespace: String,
        name: String,
        bound: Duration,
    },
}

/// Bound of one Lease read (the page refreshes every second; a slow API server gives a stale
/// answer, never a stuck sampler).
pub const LEASE_READ_BOUND: Duration = Duration::from_secs(3);

/// A cluster of the watch cache with its fencing Lease.
#[derive(Debug, Clone)]
pub struct Observed {
    pub cluster: Arc<PgReplicaSet>,
    pub lease: Option<Lease>,
}

/// (namespace, name) of a Lease.
pub type LeaseKey = (String, String);

/// Each cluster of the cache with its Lease `<name>-primary` (absent before the first primary
/// took it, or while the Leases are not read), ordered by namespace and name. Pure.
pub fn pair(
    mut clusters: Vec<Arc<PgReplicaSet>>,
    leases: &BTreeMap<LeaseKey, Lease>,
) -> Vec<Observed> {
    clusters.sort_by_key(|c| key(c));
    clusters
        .into_iter()
        .map(|cluster| {
            let lease_key = (
                cluster.namespace().unwrap_or_default(),
                crate::api::names::lease(&cluster.name_any()),
            );
            Observed {
                lease: leases.get(&lease_key).cloned(),
                cluster,
            }
        })
        .collect()
}

/// Lease reads in flight at once.
const LEASE_READS_AT_ONCE: usize = 8;

/// The Lease `<name>-primary` of each cluster: one bounded GET each, a few at a time. A GET,
/// not a LIST of the namespace: the operator's RBAC grants `get` on Leases, not `list`.
pub async fn read_leases(
    client: &Client,
    clusters: &[Arc<PgReplicaSet>],
) -> Result<BTreeMap<LeaseKey, Lease>, ListError> {
    let targets: Vec<(Api<Lease>, LeaseKey)> = clusters
        .iter()
        .map(|cluster| {
            let namespace = cluster.namespace().unwrap_or_default();
            let name = crate::api::names::lease(&cluster.name_any());
            (
                Api::namespaced(client.clone(), &namespace),
                (namespace, name),
            )
        })
        .collect();
    let read: Vec<Result<Option<(LeaseKey, Lease)>, ListError>> =
        futures::stream::iter(targets.into_iter().map(|(api, key)| read_lease(api, key)))
            .buffer_unordered(LEASE_READS_AT_ONCE)
            .collect()
            .await;
    let mut leases = BTreeMap::new();
    for result in read {
        if let Some((key, lease)) = result? {
            leases.insert(key, lease);
        }
    }
    Ok(leases)
}

async fn read_lease(
    api: Api<Lease>,
    (namespace, name): LeaseKey,
) -> Result<Option<(LeaseKey, Lease)>, ListError> {
    let lease = tokio::time::timeout(LEASE_READ_BOUND, api.get_opt(&name))
        .await
        .map_err(|_| ListError::Timeout {
            namespace: namespace.clone(),
            name: name.clone(),
            bound: LEASE_READ_BOUND,
        })?
        .map_err(|source| ListError::Lease {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    Ok(lease.map(|lease| ((namespace, name), lease)))
}

fn chrono_time(at: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(at.as_millisecond())
}

/// Memory key of a cluster.
pub fn key(cluster: &PgReplicaSet) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

fn role_name(role: InstanceRole) -> &'static str {
    match role {
        InstanceRole::Primary => "primary",
        InstanceRole::Replica => "replica",
        InstanceRole::Starting => "starting",
        InstanceRole::Fenced => "fenced",
        InstanceRole::Stopped => "stopped",
        // The operator's agent poll got no answer.
        InstanceRole::Unknown => "unreachable",
    }
}

fn sync_name(state: SyncState) -> &'static str {
    match state {
        SyncState::Async => "async",
        SyncState::Potential => "potential",
        SyncState::Sync => "sync",
        SyncState::Quorum => "quorum",
    }
}

fn node_view(instance: &InstanceStatus, primary: Option<&str>) -> NodeView {
    // The status carries one position: current on the primary, replayed on a standby.
    let is_primary = instance.role == InstanceRole::Primary;
    NodeView {
        name: instance.name.clone(),
        role: role_name(instance.role).to_string(),
        ready: instance.ready,
        timeline: instance.timeline,
        current_lsn: instance.lsn.clone().filter(|_| is_primary),
        receive_lsn: None,
        replay_lsn: instance.lsn.clone().filter(|_| !is_primary),
        lag_bytes: instance.lag_bytes,
        lag_seconds: instance.lag_seconds,
        sync_state: instance.sync_state.map(|s| sync_name(s).to_string()),
        upstream: primary
            .filter(|_| instance.role == InstanceRole::Replica)
            .map(str::to_string),
        last_seen: instance.last_seen.as_ref().and_then(|t| chrono_time(&t.0)),
        error: None,
    }
}

/// The operator's `status.lastFailover` as a dashboard record.
pub fn failover_view(record: &FailoverRecord) -> FailoverView {
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().and_then(|t| chrono_time(&t.0))
    };
    let detected_at = time(&record.detected_at);
    let completed_at = time(&record.service_switched_at).or(time(&record.promoted_at));
    FailoverView {
        reason: record.reason.clone(),
        from: record.from.clone(),
        to: record.to.clone(),
        detected_at,
        fenced_at: time(&record.fenced_at),
        promoted_at: time(&record.promoted_at),
        completed_at,
        duration_ms: detected_at
            .zip(completed_at)
            .map(|(from, to)| (to - from).num_milliseconds().max(0) as u64),
        lsn_gap_bytes: record.lsn_gap_bytes,
    }
}

/// The Lease as the dashboard shows it: time to expiry from the holder's last renewal (the
/// holder's clock: an indication for humans, not what fencing relies on).
pub fn lease_view(lease: Option<&Lease>, now: DateTime<Utc>) -> LeaseView {
    let spec = lease.and_then(|l| l.spec.as_ref());
    let holder = spec
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let duration_ms = spec
        .and_then(|s| s.lease_duration_seconds)
        .map(|s| u64::try_from(s).unwrap_or(0) * 1000);
    let renewed = spec
        .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
        .and_then(|t| chrono_time(&t.0));
    let expires_in_ms = match (&holder, renewed, duration_ms) {
        (Some(_), Some(renewed), Some(duration)) => {
            let left = duration as i64 - (now - renewed).num_milliseconds();
            Some(left.max(0) as u64)
        }
        _ => None,
    };
    LeaseView {
        holder,
        expires_in_ms,
        duration_ms,
    }
}

/// Records one observation of `cluster` at `now` in `memory`.
pub fn observe(memory: &mut ClusterMemory, cluster: &PgReplicaSet, now: DateTime<Utc>) {
    let Some(status) = &cluster.status else {
        return;
    };
    for instance in &status.instances {
        if let Some(seen) = instance.last_seen.as_ref().and_then(|t| chrono_time(&t.0)) {
            memory.last_seen.mark(&instance.name, seen);
        }
    }
    let lags: BTreeMap<String, NodeLag> = status
        .instances
        .iter()
        .filter(|i| i.role == InstanceRole::Replica)
        .map(|i| {
            (
                i.name.clone(),
                NodeLag {
                    bytes: i.lag_bytes,
                    seconds: i.lag_seconds,
                },
            )
        })
        .collect();
    memory.lag.record(now, lags);
    if let Some(record) = &status.last_failover {
        memory.failovers.remember(failover_view(record));
    }
}

/// The cluster as the dashboard shows it.
pub fn cluster_view(
    memory: &ClusterMemory,
    observed: &Observed,
    now: DateTime<Utc>,
) -> ClusterView {
    let cluster = &observed.cluster;
    let status = cluster.status.clone().unwrap_or_default();
    let primary = status.current_primary.clone();
    let mut failovers = memory.failovers.records();
    if failovers.is_empty()
        && let Some(record) = &status.last_failover
    {
        failovers.push(failover_view(record));
    }
    ClusterView {
        name: cluster.name_any(),
        namespace: cluster.namespace(),
        phase: status.phase,
        message: status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::api::condition::READY)
            .map(|c| c.message.clone())
            .filter(|m| !m.is_empty()),
        primary: primary.clone(),
        replication_mode: Some(
            match cluster.spec.replication.mode {
                crate::api::ReplicationMode::Async => "async",
                crate::api::ReplicationMode::Sync => "sync",
            }
            .to_string(),
        ),
        write_endpoint: cluster.namespace().map(|ns| {
            format!(
                "{}.{ns}.svc:5432",
                crate::api::names::rw_service(&cluster.name_any())
            )
        }),
        lease: lease_view(observed.lease.as_ref(), now),
        nodes: status
            .instances
            .iter()
            .map(|i| {
                let mut view = node_view(i, primary.as_deref());
                view.last_seen = view.last_seen.or(memory.last_seen.get(&i.name));
                view
            })
            .collect(),
        failovers,
        lag_history: memory.lag_history(),
        observed_at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PgReplicaSetStatus, Phase};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    fn jiff(ms: i64) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_millisecond(1_800_000_000_000 + ms).expect("time")
    }

    fn instance(name: &str, role: InstanceRole, lsn: &str) -> InstanceStatus {
        InstanceStatus {
            name: name.to_string(),
            group: None,
            role,
            ready: role != InstanceRole::Unknown,
            timeline: Some(2),
            lsn: Some(lsn.to_string()),
            lag_bytes: None,
            lag_seconds: None,
            sync_state: None,
            last_seen: Some(Time(jiff(-500))),
        }
    }

    fn cluster() -> PgReplicaSet {
        let spec = serde_json::from_value(serde_json::json!({
            "replicas": 3,
            "storage": { "size": "1Gi" },
        }))
        .expect("spec");
        let mut cluster = PgReplicaSet::new("pg", spec);
        cluster.metadata.namespace = Some("db".to_string());
        let mut replica = instance("pg-1", InstanceRole::Replica, "0/5000000");
        replica.lag_bytes = Some(0);
        replica.lag_seconds = Some(0.0);
        replica.sync_state = Some(SyncState::Async);
        let mut unknown = instance("pg-2", InstanceRole::Unknown, "0/4000000");
        unknown.lsn = None;
        unknown.last_seen = None;
        cluster.status = Some(PgReplicaSetStatus {
            phase: Some(Phase::Degraded),
            current_primary: Some("pg-0".to_string()),
            instances: vec![
                instance("pg-0", InstanceRole::Primary, "0/5000000"),
                replica,
                unknown,
            ],
            last_failover: Some(FailoverRecord {
                reason: "PrimaryUnreachable".to_string(),
                detected_at: Some(Time(jiff(-10_000))),
                fenced_at: Some(Time(jiff(-2_000))),
                promoted_at: Some(Time(jiff(-1_500))),
                service_switched_at: Some(Time(jiff(-1_000))),
                from: Some("pg-1".to_string()),
                to: "pg-0".to_string(),
                lsn_gap_bytes: Some(128),
            }),
            ..Default::default()
        });
        cluster
    }

    fn lease(holder: &str, renewed_ms: i64) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_string()),
                lease_duration_seconds: Some(8),
                renew_time: Some(MicroTime(jiff(renewed_ms))),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn maps_status_instances_lease_and_last_failover() {
        let observed = Observed {
            cluster: Arc::new(cluster()),
            lease: Some(lease("pg-0", -3000)),
        };
        let mut memory = ClusterMemory::default();
        observe(&mut memory, &observed.cluster, t(0));
        let view = cluster_view(&memory, &observed, t(0));
        assert_eq!(view.name, "pg");
        assert_eq!(view.namespace.as_deref(), Some("db"));
        assert_eq!(view.phase, Some(Phase::Degraded));
        assert_eq!(view.primary.as_deref(), Some("pg-0"));
        assert_eq!(view.replication_mode.as_deref(), Some("async"));
        assert_eq!(view.write_endpoint.as_deref(), Some("pg-rw.db.svc:5432"));
        assert_eq!(view.lease.holder.as_deref(), Some("pg-0"));
        assert_eq!(view.lease.expires_in_ms, Some(5000));
        assert_eq!(view.lease.duration_ms, Some(8000));
        let [primary, replica, unknown] = view.nodes.as_slice() else {
            panic!("three nodes: {:?}", view.nodes)
        };
        assert_eq!(primary.role, "primary");
        assert_eq!(primary.current_lsn.as_deref(), Some("0/5000000"));
        assert_eq!(primary.replay_lsn, None);
        assert_eq!(replica.replay_lsn.as_deref(), Some("0/5000000"));
        assert_eq!(replica.upstream.as_deref(), Some("pg-0"));
        assert_eq!(replica.lag_bytes, Some(0));
        assert_eq!(replica.sync_state.as_deref(), Some("async"));
        assert_eq!(replica.last_seen, Some(t(-500)));
        assert_eq!(
            (unknown.role.as_str(), unknown.ready),
            ("unreachable", false)
        );
        assert_eq!(unknown.lag_bytes, None);
        assert_eq!(unknown.last_seen, None);
        let [failover] = view.failovers.as_slice() else {
            panic!("one failover: {:?}", view.failovers)
        };
        assert_eq!(failover.reason, "PrimaryUnreachable");
        assert_eq!(failover.completed_at, Some(t(-1000)));
        assert_eq!(failover.duration_ms, Some(9000));
        assert_eq!(failover.lsn_gap_bytes, Some(128));
        // One sample, the replica only.
        assert_eq!(view.lag_history.series.len(), 1);
        assert_eq!(view.lag_history.series[0].node, "pg-1");
    }

    #[test]
    fn an_expired_or_missing_lease_is_shown_as_such() {
        let expired = lease_view(Some(&lease("pg-0", -20_000)), t(0));
        assert_eq!(expired.holder.as_deref(), Some("pg-0"));
        assert_eq!(expired.expires_in_ms, Some(0));
        let missing = lease_view(None, t(0));
        assert_eq!(missing.holder, None);
        assert_eq!(missing.expires_in_ms, None);
        let released = lease_view(Some(&lease("", -100)), t(0));
        assert_eq!(released.holder, None);
        assert_eq!(released.expires_in_ms, None);
    }

    #[test]
    fn a_cluster_without_status_has_no_phase_and_no_nodes() {
        let mut fresh = cluster();
        fresh.status = None;
        let observed = Observed {
            cluster: Arc::new(fresh),
            lease: None,
        };
        let mut memory = ClusterMemory::default();
        observe(&mut memory, &observed.cluster, t(0));
        let view = cluster_view(&memory, &observed, t(0));
        assert_eq!(view.phase, None);
        assert!(view.nodes.is_empty());
        assert!(view.failovers.is_empty());
        assert!(view.lag_history.series.is_empty());
    }

    #[test]
    fn each_cluster_gets_its_own_primary_lease_and_no_other() {
        let named = |ns: &str, name: &str| {
            let mut c = cluster();
            c.metadata.namespace = Some(ns.to_string());
            c.metadata.name = Some(name.to_string());
            Arc::new(c)
        };
        let clusters = vec![named("b", "db"), named("a", "db"), named("a", "other")];
        let mut leases = BTreeMap::new();
        leases.insert(
            ("a".to_string(), "db-primary".to_string()),
            lease("db-0", 0),
        );
        leases.insert(
            ("b".to_string(), "db-primary".to_string()),
            lease("db-1", 0),
        );
        // A Lease of another kind with a cluster's name is not its fencing Lease.
        leases.insert(("a".to_string(), "other".to_string()), lease("x", 0));
        let observed = pair(clusters, &leases);
        let holders: Vec<(String, Option<String>)> = observed
            .iter()
            .map(|o| {
                (
                    key(&o.cluster),
                    o.lease
                        .as_ref()
                        .and_then(|l| l.spec.as_ref()?.holder_identity.clone()),
                )
            })
            .collect();
        assert_eq!(
            holders,
            [
                ("a/db".to_string(), Some("db-0".to_string())),
                ("a/other".to_string(), None),
                ("b/db".to_string(), Some("db-1".to_string())),
            ]
        );
    }
}
