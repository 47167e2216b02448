//! Every metric pgrs exports, with its help text. The chart's alert rules and dashboard may only
//! use these names (`tests/chart_monitoring.rs` checks it).
//!
//! Labels: `cluster`, `namespace` (operator only), `instance`; base units (bytes, seconds);
//! counters end in `_total`.

use super::Kind;

pub struct MetricName {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

macro_rules! metrics {
    ($($constant:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $(pub const $constant: MetricName = MetricName { name: $name, kind: Kind::$kind, help: $help };)*
        /// All of them.
        pub const ALL: &[MetricName] = &[$($constant),*];
    };
}

metrics! {
    INSTANCE_IS_PRIMARY = "pgrs_instance_is_primary", Gauge,
        "1 for the instance that serves writes (the lease holder, serving), 0 for the others.";
    INSTANCE_ROLE = "pgrs_instance_role", Gauge,
        "1 for the role the instance's agent reports (primary, replica, starting, fenced, stopped, unknown).";
    INSTANCE_READY = "pgrs_instance_ready", Gauge,
        "1 when the instance's agent answered and postgres accepts connections.";
    INSTANCE_TIMELINE = "pgrs_instance_timeline", Gauge,
        "Current PostgreSQL timeline of the instance; absent when unknown.";
    INSTANCE_LAG_BYTES = "pgrs_instance_lag_bytes", Gauge,
        "Primary's current WAL position minus this replica's replay position, in bytes; absent when unknown.";
    INSTANCE_LAG_SECONDS = "pgrs_instance_lag_seconds", Gauge,
        "Replay lag of this replica in seconds (0 when caught up, also on an idle primary); absent when unknown.";
    INSTANCE_WAL_RECEIVER_UP = "pgrs_instance_wal_receiver_up", Gauge,
        "Replicas only: 1 when the WAL receiver is streaming, 0 otherwise.";
    CLUSTER_HAS_PRIMARY = "pgrs_cluster_has_primary", Gauge,
        "1 when an instance serves writes, 0 when none does.";
    CLUSTER_PHASE = "pgrs_cluster_phase", Gauge,
        "1 for the cluster's current phase, 0 for the others.";
    LEASE_RENEWALS = "pgrs_lease_renewals_total", Counter,
        "Successful renewals of the primary lease by its holder (operator: renewals it observed on the Lease, a lower bound).";
    LEASE_RENEWAL_FAILURES = "pgrs_lease_renewal_failures_total", Counter,
        "Failed renewals of the primary lease (local: refused by the lease service; operator: a held Lease seen unrenewed for a full lease duration).";
    FAILOVERS = "pgrs_failovers_total", Counter,
        "Changes of primary (failovers and switchovers) since this process started, by reason.";
    LAST_FAILOVER_DURATION = "pgrs_last_failover_duration_seconds", Gauge,
        "Duration of the last change of primary: from detection (or the switchover request) to the new primary serving.";
    RECONCILE_DURATION = "pgrs_reconcile_duration_seconds", Histogram,
        "Duration of one reconcile (operator) or controller round (local).";
    RECONCILE_ERRORS = "pgrs_reconcile_errors_total", Counter,
        "Failed reconciles (operator) or failed actions of a controller round (local), by category.";
}

/// The phases `pgrs_cluster_phase` reports.
pub const PHASES: &[&str] = &[
    "Pending",
    "Bootstrapping",
    "Healthy",
    "Degraded",
    "PrimaryUnavailable",
    "FailingOver",
    "SwitchingOver",
    "FailoverBlocked",
    "Invalid",
];

/// The roles `pgrs_instance_role` reports.
pub const ROLES: &[&str] = &[
    "primary", "replica", "starting", "fenced", "stopped", "unknown",
];

/// Whether `series` (a name as written in a PromQL expression, possibly with a histogram suffix)
/// is exported by pgrs.
pub fn is_exported(series: &str) -> bool {
    ALL.iter().any(|metric| {
        series == metric.name
            || (metric.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| series.strip_suffix(suffix) == Some(metric.name)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for metric in ALL {
            assert!(metric.name.starts_with("pgrs_"), "{}", metric.name);
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "counters and only counters end in _total: {}",
                metric.name
            );
            assert!(
                !metric.name.contains("millis") && !metric.name.contains("_ms"),
                "base units: {}",
                metric.name
            );
        }
        assert!(is_exported("pgrs_reconcile_duration_seconds_bucket"));
        assert!(!is_exported("pgrs_instance_lag_bytes_bucket"));
        assert!(!is_exported("pgrs_nothing"));
    }
}
