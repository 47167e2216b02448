//! `/metrics` of the operator, per PgReplicaSet: gauges from the status the operator last wrote,
//! counters from what its rounds observed (Lease changes, new `lastFailover` records, reconciles).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::names::{self, MetricName};
use super::{Exposition, Histogram, Labels};
use crate::api::{FailoverRecord, InstanceRole, PgReplicaSetStatus};
use crate::protocol::api::{AgentStatus, Role};

/// Reasons `status.lastFailover.reason` takes; each starts at 0 so that `increase()` sees the
/// first failover.
pub const REASONS: &[&str] = &[
    "Switchover",
    "PrimaryPodDeleted",
    "PrimaryStopped",
    "PrimaryUnreachable",
];

#[derive(Debug, Default)]
struct ClusterEntry {
    status: Option<PgReplicaSetStatus>,
    wal_receivers: BTreeMap<String, bool>,
    /// (holder, version) of the Lease at the last round.
    lease: Option<(Option<String>, String)>,
    /// The Lease version already counted as an expiry.
    expiry_counted: Option<String>,
    renewals: BTreeMap<String, u64>,
    renewal_failures: BTreeMap<String, u64>,
    /// The `lastFailover` record last seen (to, detectedAt); `None` before the first status.
    seen_failover: Option<Option<(String, Option<String>)>>,
    failovers: BTreeMap<String, u64>,
    reconcile: Histogram,
    errors: BTreeMap<String, u64>,
}

type Key = (String, String);

/// Per-cluster metrics of the operator, shared by the controller and the web server.
#[derive(Debug, Default)]
pub struct OperatorMetrics {
    clusters: Mutex<BTreeMap<Key, ClusterEntry>>,
}

fn family<'a>(exposition: &'a mut Exposition, metric: &MetricName) -> &'a mut super::Family {
    exposition.family(metric.name, metric.kind, metric.help)
}

fn bool_value(value: bool) -> f64 {
    if value { 1.0 } else { 0.0 }
}

fn role_name(role: InstanceRole) -> &'static str {
    match role {
        InstanceRole::Primary => "primary",
        InstanceRole::Replica => "replica",
        InstanceRole::Starting => "starting",
        InstanceRole::Fenced => "fenced",
        InstanceRole::Stopped => "stopped",
        InstanceRole::Unknown => "unknown",
    }
}

fn failover_key(record: &FailoverRecord) -> (String, Option<String>) {
    (
        record.to.clone(),
        record.detected_at.as_ref().map(|t| t.0.to_string()),
    )
}

/// Seconds from detection to promotion of `record`, when both are known.
pub fn failover_seconds(record: &FailoverRecord) -> Option<f64> {
    let detected = record.detected_at.as_ref()?.0.as_millisecond();
    let promoted = record.promoted_at.as_ref()?.0.as_millisecond();
    Some((promoted - detected).max(0) as f64 / 1000.0)
}

/// Whether each replica's WAL receiver streams, from the agents' last reports.
pub fn wal_receivers<'a>(
    reports: impl Iterator<Item = (&'a String, &'a AgentStatus)>,
) -> BTreeMap<String, bool> {
    reports
        .filter(|(_, status)| status.role == Role::Replica)
        .map(|(name, status)| {
            let streaming = status
                .wal_receiver
                .as_ref()
                .is_some_and(|w| w.status.is_streaming());
            (name.clone(), streaming)
        })
        .collect()
}

impl OperatorMetrics {
    fn with<T>(&self, namespace: &str, cluster: &str, f: impl FnOnce(&mut ClusterEntry) -> T) -> T {
        let mut clusters = self
            .clusters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = clusters
            .entry((namespace.to_string(), cluster.to_string()))
            .or_default();
        f(entry)
    }

    /// The status written in a round, and the replicas' WAL receivers seen in it.
    pub fn observe_status(
        &self,
        namespace: &str,
        cluster: &str,
        status: &PgReplicaSetStatus,
        wal_receivers: BTreeMap<String, bool>,
    ) {
        self.with(namespace, cluster, |entry| {
            let current = status.last_failover.as_ref().map(failover_key);
            match &entry.seen_failover {
                // First status since this process started: a record from before is history.
                None => {}
                Some(seen) if *seen == current => {}
                Some(_) => {
                    if let Some(record) = &status.last_failover {
                        *entry.failovers.entry(record.reason.clone()).or_default() += 1;
                    }
                }
            }
            entry.seen_failover = Some(current);
            entry.status = Some(status.clone());
            entry.wal_receivers = wal_receivers;
        });
    }

    /// The Lease as read in a round, unchanged for `unchanged_for` on the operator's clock.
    pub fn observe_lease(
        &self,
        namespace: &str,
        cluster: &str,
        holder: Option<&str>,
        version: &str,
        unchanged_for: Duration,
        duration: Duration,
    ) {
        self.with(namespace, cluster, |entry| {
            if let Some(holder) = holder {
                entry.renewals.entry(holder.to_string()).or_default();
                entry
                    .renewal_failures
                    .entry(holder.to_string())
                    .or_default();
                if let Some((Some(previous), previous_version)) = &entry.lease
                    && previous == holder
                    && previous_version != version
                {
                    *entry.renewals.entry(holder.to_string()).or_default() += 1;
                }
                if unchanged_for >= duration && entry.expiry_counted.as_deref() != Some(version) {
                    *entry
                        .renewal_failures
                        .entry(holder.to_string())
                        .or_default() += 1;
                    entry.expiry_counted = Some(version.to_string());
                }
            }
            entry.lease = Some((holder.map(str::to_string), version.to_string()));
        });
    }

    /// One reconcile took `took`; `error` is the failure's category.
    pub fn observe_reconcile(
        &self,
        namespace: &str,
        cluster: &str,
        took: Duration,
        error: Option<&str>,
    ) {
        self.with(namespace, cluster, |entry| {
            entry.reconcile.observe_duration(took);
            if let Some(category) = error {
                *entry.errors.entry(category.to_string()).or_default() += 1;
            }
        });
    }

    /// The cluster was deleted: its series disappear.
    pub fn forget(&self, namespace: &str, cluster: &str) {
        self.clusters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&(namespace.to_string(), cluster.to_string()));
    }

    pub fn render(&self) -> String {
        self.exposition().render()
    }

    pub fn exposition(&self) -> Exposition {
        let clusters = self
            .clusters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = Exposition::new();
        // Every family, even with no cluster yet: HELP and TYPE tell scrapers what exists.
        for metric in names::ALL {
            family(&mut out, metric);
        }
        for ((namespace, cluster), entry) in clusters.iter() {
            let base: Labels = vec![
                ("namespace", namespace.clone()),
                ("cluster", cluster.clone()),
            ];
            let with = |key: &'static str, value: &str| {
                let mut labels = base.clone();
                labels.push((key, value.to_string()));
                labels
            };
            if let Some(status) = &entry.status {
                for instance in &status.instances {
                    let labels = with("instance", &instance.name);
                    let role = role_name(instance.role);
                    family(&mut out, &names::INSTANCE_IS_PRIMARY).sample(
                        labels.clone(),
                        bool_value(status.current_primary.as_deref() == Some(&instance.name)),
                    );
                    for candidate in names::ROLES {
                        let mut with_role = labels.clone();
                        with_role.push(("role", candidate.to_string()));
                        family(&mut out, &names::INSTANCE_ROLE)
                            .sample(with_role, bool_value(*candidate == role));
                    }
                    family(&mut out, &names::INSTANCE_READY)
                        .sample(labels.clone(), bool_value(instance.ready));
                    if let Some(timeline) = instance.timeline {
                        family(&mut out, &names::INSTANCE_TIMELINE)
                            .sample(labels.clone(), f64::from(timeline));
                    }
                    if let Some(bytes) = instance.lag_bytes {
                        family(&mut out, &names::INSTANCE_LAG_BYTES)
                            .sample(labels.clone(), bytes as f64);
                    }
                    if let Some(seconds) = instance.lag_seconds {
                        family(&mut out, &names::INSTANCE_LAG_SECONDS)
                            .sample(labels.clone(), seconds);
                    }
                    if instance.role == InstanceRole::Replica
                        && let Some(up) = entry.wal_receivers.get(&instance.name)
                    {
                        family(&mut out, &names::INSTANCE_WAL_RECEIVER_UP)
                            .sample(labels.clone(), bool_value(*up));
                    }
                }
                family(&mut out, &names::CLUSTER_HAS_PRIMARY)
                    .sample(base.clone(), bool_value(status.current_primary.is_some()));
                let phase = status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
                for candidate in names::PHASES {
                    family(&mut out, &names::CLUSTER_PHASE)
                        .sample(with("phase", candidate), bool_value(*candidate == phase));
                }
                if let Some(seconds) = status.last_failover.as_ref().and_then(failover_seconds) {
                    family(&mut out, &names::LAST_FAILOVER_DURATION).sample(base.clone(), seconds);
                }
            }
            for (instance, count) in &entry.renewals {
                family(&mut out, &names::LEASE_RENEWALS)
                    .sample(with("instance", instance), *count as f64);
            }
            for (instance, count) in &entry.renewal_failures {
                family(&mut out, &names::LEASE_RENEWAL_FAILURES)
                    .sample(with("instance", instance), *count as f64);
            }
            for reason in REASONS {
                let count = entry.failovers.get(*reason).copied().unwrap_or(0);
                family(&mut out, &names::FAILOVERS).sample(with("reason", reason), count as f64);
            }
            for (reason, count) in &entry.failovers {
                if !REASONS.contains(&reason.as_str()) {
                    family(&mut out, &names::FAILOVERS)
                        .sample(with("reason", reason), *count as f64);
                }
            }
            family(&mut out, &names::RECONCILE_DURATION).histogram(base.clone(), &entry.reconcile);
            for (category, count) in &entry.errors {
                family(&mut out, &names::RECONCILE_ERRORS)
                    .sample(with("category", category), *count as f64);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{InstanceStatus, Phase};
    use crate::metrics::parse;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn instance(name: &str, role: InstanceRole, lag: Option<u64>) -> InstanceStatus {
        InstanceStatus {
            name: name.to_string(),
            group: None,
            role,
            ready: true,
            timeline: Some(2),
            lsn: None,
            lag_bytes: lag,
            lag_seconds: lag.map(|_| 0.5),
            sync_state: None,
            last_seen: None,
        }
    }

    fn time(ms: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_millisecond(1_700_000_000_000 + ms).expect("time"))
    }

    fn status(
        primary: &str,
        failover: Option<(&str, &str, i64, Option<i64>)>,
    ) -> PgReplicaSetStatus {
        PgReplicaSetStatus {
            phase: Some(Phase::Healthy),
            current_primary: Some(primary.to_string()),
            instances: vec![
                instance("pg-0", InstanceRole::Primary, None),
                instance("pg-1", InstanceRole::Replica, Some(4096)),
                instance("pg-2", InstanceRole::Replica, None),
            ],
            last_failover: failover.map(|(reason, to, detected, promoted)| FailoverRecord {
                reason: reason.to_string(),
                detected_at: Some(time(detected)),
                fenced_at: None,
                promoted_at: promoted.map(time),
                service_switched_at: None,
                from: None,
                to: to.to_string(),
                lsn_gap_bytes: None,
            }),
            ..PgReplicaSetStatus::default()
        }
    }

    #[test]
    fn renders_the_status_and_counts_new_failovers_only() {
        let metrics = OperatorMetrics::default();
        let receivers = BTreeMap::from([("pg-1".to_string(), true), ("pg-2".to_string(), false)]);
        // A failover from before the operator started is not counted.
        let old = Some(("PrimaryUnreachable", "pg-0", 0, Some(9000)));
        metrics.observe_status("ns", "pg", &status("pg-0", old), receivers.clone());
        let new = Some(("PrimaryPodDeleted", "pg-1", 20_000, None));
        metrics.observe_status("ns", "pg", &status("pg-1", new), receivers.clone());
        let promoted = Some(("PrimaryPodDeleted", "pg-1", 20_000, Some(21_250)));
        metrics.observe_status("ns", "pg", &status("pg-1", promoted), receivers);
        metrics.observe_lease(
            "ns",
            "pg",
            Some("pg-1"),
            "10",
            Duration::ZERO,
            Duration::from_secs(8),
        );
        metrics.observe_lease(
            "ns",
            "pg",
            Some("pg-1"),
            "11",
            Duration::ZERO,
            Duration::from_secs(8),
        );
        metrics.observe_lease(
            "ns",
            "pg",
            Some("pg-1"),
            "11",
            Duration::from_secs(9),
            Duration::from_secs(8),
        );
        metrics.observe_lease(
            "ns",
            "pg",
            Some("pg-1"),
            "11",
            Duration::from_secs(10),
            Duration::from_secs(8),
        );
        metrics.observe_reconcile("ns", "pg", Duration::from_millis(20), None);
        metrics.observe_reconcile("ns", "pg", Duration::from_millis(20), Some("ApplyFailed"));

        let text = metrics.render();
        let parsed = parse::parse(&text).expect("valid exposition");
        let of = |name: &str, labels: &[(&str, &str)]| {
            let mut all = vec![("namespace", "ns"), ("cluster", "pg")];
            all.extend_from_slice(labels);
            parsed.value(name, &all)
        };
        assert_eq!(
            of("pgrs_instance_is_primary", &[("instance", "pg-1")]),
            Some(1.0)
        );
        assert_eq!(
            of("pgrs_instance_lag_bytes", &[("instance", "pg-1")]),
            Some(4096.0)
        );
        assert_eq!(of("pgrs_instance_lag_bytes", &[("instance", "pg-2")]), None);
        assert_eq!(
            of("pgrs_instance_timeline", &[("instance", "pg-2")]),
            Some(2.0)
        );
        assert_eq!(
            of("pgrs_instance_wal_receiver_up", &[("instance", "pg-2")]),
            Some(0.0)
        );
        assert_eq!(
            of("pgrs_instance_wal_receiver_up", &[("instance", "pg-0")]),
            None
        );
        assert_eq!(
            of("pgrs_failovers_total", &[("reason", "PrimaryPodDeleted")]),
            Some(1.0)
        );
        assert_eq!(
            of("pgrs_failovers_total", &[("reason", "PrimaryUnreachable")]),
            Some(0.0)
        );
        assert_eq!(of("pgrs_last_failover_duration_seconds", &[]), Some(1.25));
        assert_eq!(
            of("pgrs_lease_renewals_total", &[("instance", "pg-1")]),
            Some(1.0)
        );
        assert_eq!(
            of("pgrs_lease_renewal_failures_total", &[("instance", "pg-1")]),
            Some(1.0)
        );
        assert_eq!(of("pgrs_reconcile_duration_seconds_count", &[]), Some(2.0));
        assert_eq!(
            of(
                "pgrs_reconcile_errors_total",
                &[("category", "ApplyFailed")]
            ),
            Some(1.0)
        );

        metrics.forget("ns", "pg");
        let text = metrics.render();
        assert!(!text.contains("cluster=\"pg\""), "{text}");
        parse::parse(&text).expect("valid exposition");
    }
}
