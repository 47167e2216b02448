//! `/metrics` of `pgrs local`: gauges from the controller's status document, counters from
//! what the controller saw happen (status snapshots, controller rounds, lease renewals).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use super::names::{self, MetricName};
use super::{Exposition, Histogram, Labels};
use crate::coordination::{LeaseError, LeaseRecord, LeaseStore};
use crate::engine::Phase;
use crate::view::local::LocalStatus;

/// Failover reasons, as in the operator's `status.lastFailover.reason`.
pub const REASON_SWITCHOVER: &str = "Switchover";
pub const REASON_PRIMARY_STOPPED: &str = "PrimaryStopped";
pub const REASON_PRIMARY_UNREACHABLE: &str = "PrimaryUnreachable";

/// A change of primary under way, as seen in status snapshots.
#[derive(Debug, Clone)]
struct Disruption {
    started: DateTime<Utc>,
    switchover: bool,
    /// The lease was released (a graceful stop) rather than taken over after expiry.
    released: bool,
}

#[derive(Debug)]
struct Inner {
    last_update: Option<DateTime<Utc>>,
    last_event: Option<DateTime<Utc>>,
    serving: Option<String>,
    disruption: Option<Disruption>,
    failovers: BTreeMap<String, u64>,
    last_failover_seconds: Option<f64>,
    errors: BTreeMap<String, u64>,
    rounds: Histogram,
    renewals: BTreeMap<String, u64>,
    renewal_failures: BTreeMap<String, u64>,
}

/// Counters of one local cluster; fed by the controller, rendered on `/metrics`.
#[derive(Debug)]
pub struct LocalMetrics {
    cluster: String,
    inner: Mutex<Inner>,
}

fn family<'a>(exposition: &'a mut Exposition, metric: &MetricName) -> &'a mut super::Family {
    exposition.family(metric.name, metric.kind, metric.help)
}

fn bool_value(value: bool) -> f64 {
    if value { 1.0 } else { 0.0 }
}

impl LocalMetrics {
    pub fn new(cluster: &str) -> Self {
        let zero = |keys: &[&str]| keys.iter().map(|k| (k.to_string(), 0)).collect();
        LocalMetrics {
            cluster: cluster.to_string(),
            inner: Mutex::new(Inner {
                last_update: None,
                last_event: None,
                serving: None,
                disruption: None,
                // Known reasons start at 0, so that `increase()` sees the first failover.
                failovers: zero(&[
                    REASON_SWITCHOVER,
                    REASON_PRIMARY_STOPPED,
                    REASON_PRIMARY_UNREACHABLE,
                ]),
                last_failover_seconds: None,
                errors: zero(&["ActionFailed"]),
                rounds: Histogram::default(),
                renewals: BTreeMap::new(),
                renewal_failures: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One controller round took `took`.
    pub fn observe_round(&self, took: Duration) {
        self.lock().rounds.observe_duration(took);
    }

    /// A renewal request of `holder` succeeded or failed.
    pub fn observe_renewal(&self, holder: &str, ok: bool) {
        let mut inner = self.lock();
        let counters = if ok {
            &mut inner.renewals
        } else {
            &mut inner.renewal_failures
        };
        *counters.entry(holder.to_string()).or_default() += 1;
        // The other counter of this holder exists too, at 0 if need be.
        let other = if ok {
            &mut inner.renewal_failures
        } else {
            &mut inner.renewals
        };
        other.entry(holder.to_string()).or_default();
    }

    /// A status snapshot (the controller publishes one per round): counts failovers by
    /// comparing the serving primary with the previous snapshot's, and failed actions from the
    /// new events. Snapshots already seen are ignored.
    pub fn observe_status(&self, status: &LocalStatus) {
        let mut inner = self.lock();
        if inner.last_update == Some(status.updated_at) {
            return;
        }
        inner.last_update = Some(status.updated_at);
        let since = inner.last_event;
        for event in &status.events {
            if since.is_none_or(|s| event.at > s) {
                if event.severity == "warning" && event.reason == "ActionFailed" {
                    *inner.errors.entry(event.reason.clone()).or_default() += 1;
                }
                inner.last_event = Some(inner.last_event.map_or(event.at, |l| l.max(event.at)));
            }
        }
        let settled = matches!(status.phase, Phase::Healthy | Phase::Degraded);
        match (inner.serving.clone(), status.primary.clone()) {
            (Some(old), Some(new)) if old != new => {
                let disruption = inner.disruption.take().unwrap_or(Disruption {
                    started: status.updated_at,
                    switchover: status.phase == Phase::SwitchingOver,
                    released: status.lease.holder.is_none(),
                });
                let reason = if disruption.switchover {
                    REASON_SWITCHOVER
                } else if disruption.released {
                    REASON_PRIMARY_STOPPED
                } else {
                    REASON_PRIMARY_UNREACHABLE
                };
                *inner.failovers.entry(reason.to_string()).or_default() += 1;
                let took = status.updated_at - disruption.started;
                inner.last_failover_seconds =
                    Some(took.num_microseconds().unwrap_or(0) as f64 / 1e6);
                inner.serving = Some(new);
            }
            (Some(_), primary) => {
                if primary.is_none() || !settled {
                    let disruption = inner.disruption.get_or_insert(Disruption {
                        started: status.updated_at,
                        switchover: false,
                        released: false,
                    });
                    disruption.switchover |= status.phase == Phase::SwitchingOver;
                    disruption.released |= status.lease.holder.is_none();
                } else {
                    // Back to normal with the same primary (a switchover abandoned, a blip).
                    inner.disruption = None;
                }
            }
            // The first primary of this controller: bootstrap or restart, not a failover.
            (None, Some(new)) => inner.serving = Some(new),
            (None, None) => {}
        }
    }

    /// The exposition: gauges from `status` (the last round's), WAL receivers from the agents'
    /// last reports (`Some(streaming)` per replica), counters from what was observed.
    pub fn render(
        &self,
        status: Option<&LocalStatus>,
        wal_receivers: &BTreeMap<String, bool>,
    ) -> String {
        let cluster = || ("cluster", self.cluster.clone());
        let mut out = Exposition::new();
        // Every family, even without samples (unknown lag): HELP and TYPE say what exists.
        for metric in names::ALL {
            family(&mut out, metric);
        }
        if let Some(status) = status {
            for node in &status.nodes {
                let labels: Labels = vec![cluster(), ("instance", node.name.clone())];
                let role = match (&node.role, node.reachable) {
                    (Some(role), true) => role.as_str(),
                    _ => "unknown",
                };
                family(&mut out, &names::INSTANCE_IS_PRIMARY).sample(
                    labels.clone(),
                    bool_value(status.primary.as_deref() == Some(node.name.as_str())),
                );
                for candidate in names::ROLES {
                    let mut with_role = labels.clone();
                    with_role.push(("role", candidate.to_string()));
                    family(&mut out, &names::INSTANCE_ROLE)
                        .sample(with_role, bool_value(*candidate == role));
                }
                family(&mut out, &names::INSTANCE_READY).sample(
                    labels.clone(),
                    bool_value(node.reachable && node.postgres_up),
                );
                if let Some(timeline) = node.timeline {
                    family(&mut out, &names::INSTANCE_TIMELINE)
                        .sample(labels.clone(), f64::from(timeline));
                }
                if role != "primary" {
                    if let Some(bytes) = node.lag_bytes {
                        family(&mut out, &names::INSTANCE_LAG_BYTES)
                            .sample(labels.clone(), bytes as f64);
                    }
                    if let Some(seconds) = node.lag_seconds {
                        family(&mut out, &names::INSTANCE_LAG_SECONDS)
                            .sample(labels.clone(), seconds);
                    }
                }
                if role == "replica"
                    && let Some(up) = wal_receivers.get(&node.name)
                {
                    family(&mut out, &names::INSTANCE_WAL_RECEIVER_UP)
                        .sample(labels.clone(), bool_value(*up));
                }
            }
            family(&mut out, &names::CLUSTER_HAS_PRIMARY)
                .sample(vec![cluster()], bool_value(status.primary.is_some()));
            let phase = format!("{:?}", status.phase);
            for candidate in names::PHASES {
                family(&mut out, &names::CLUSTER_PHASE).sample(
                    vec![cluster(), ("phase", candidate.to_string())],
                    bool_value(*candidate == phase),
                );
            }
        }
        let inner = self.lock();
        let renewals = family(&mut out, &names::LEASE_RENEWALS);
        for (instance, count) in &inner.renewals {
            renewals.sample(
                vec![cluster(), ("instance", instance.clone())],
                *count as f64,
            );
        }
        let failures = family(&mut out, &names::LEASE_RENEWAL_FAILURES);
        for (instance, count) in &inner.renewal_failures {
            failures.sample(
                vec![cluster(), ("instance", instance.clone())],
                *count as f64,
            );
        }
        let failovers = family(&mut out, &names::FAILOVERS);
        for (reason, count) in &inner.failovers {
            failovers.sample(vec![cluster(), ("reason", reason.clone())], *count as f64);
        }
        let last = family(&mut out, &names::LAST_FAILOVER_DURATION);
        if let Some(seconds) = inner.last_failover_seconds {
            last.sample(vec![cluster()], seconds);
        }
        family(&mut out, &names::RECONCILE_DURATION).histogram(vec![cluster()], &inner.rounds);
        let errors = family(&mut out, &names::RECONCILE_ERRORS);
        for (category, count) in &inner.errors {
            errors.sample(
                vec![cluster(), ("category", category.clone())],
                *count as f64,
            );
        }
        out.render()
    }
}

/// The controller's lease store as the agents reach it over HTTP, counting renewals.
pub struct CountingLeaseStore {
    inner: Arc<dyn LeaseStore>,
    metrics: Arc<LocalMetrics>,
}

impl CountingLeaseStore {
    pub fn new(inner: Arc<dyn LeaseStore>, metrics: Arc<LocalMetrics>) -> Self {
        CountingLeaseStore { inner, metrics }
    }
}

impl LeaseStore for CountingLeaseStore {
    fn get(&self) -> BoxFuture<'_, Result<LeaseRecord, LeaseError>> {
        self.inner.get()
    }

    fn set_failsafe_members<'a>(
        &'a self,
        holder: &'a str,
        members: Option<Vec<String>>,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        self.inner.set_failsafe_members(holder, members)
    }

    fn renew<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            let result = self.inner.renew(holder).await;
            self.metrics.observe_renewal(holder, result.is_ok());
            result
        })
    }

    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        expected_version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        self.inner.acquire(holder, expected_version)
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        self.inner.release(holder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::parse;
    use crate::view::local::{LeaseStatus, NodeStatus};

    fn node(name: &str, role: &str) -> NodeStatus {
        NodeStatus {
            name: name.to_string(),
            pg_port: 1,
            agent_port: 2,
            reachable: true,
            role: Some(role.to_string()),
            postgres_up: true,
            timeline: Some(1),
            current_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            sync_state: None,
            upstream: None,
            agent_pid: None,
            last_error: None,
        }
    }

    fn status(
        at_ms: i64,
        phase: Phase,
        primary: Option<&str>,
        holder: Option<&str>,
    ) -> LocalStatus {
        let mut caught_up = node("node1", "replica");
        caught_up.lag_bytes = Some(0);
        caught_up.lag_seconds = Some(0.0);
        let unknown = node("node2", "replica");
        LocalStatus {
            cluster: "local".to_string(),
            phase,
            message: String::new(),
            primary: primary.map(str::to_string),
            lease: LeaseStatus {
                holder: holder.map(str::to_string),
                version: "1".to_string(),
                expires_in_ms: None,
                duration_ms: 8000,
            },
            write_endpoint: String::new(),
            sync: false,
            nodes: vec![node("node0", "primary"), caught_up, unknown],
            events: vec![],
            last_failover: None,
            updated_at: DateTime::from_timestamp_millis(1_700_000_000_000 + at_ms)
                .expect("timestamp"),
        }
    }

    #[test]
    fn gauges_follow_the_status_and_unknown_lag_is_absent() {
        let metrics = LocalMetrics::new("local");
        let snapshot = status(0, Phase::Healthy, Some("node0"), Some("node0"));
        let receivers = BTreeMap::from([("node1".to_string(), true), ("node2".to_string(), false)]);
        let text = metrics.render(Some(&snapshot), &receivers);
        let parsed = parse::parse(&text).expect("valid exposition");
        let one = |name: &str, instance: &str| {
            parsed.value(name, &[("cluster", "local"), ("instance", instance)])
        };
        assert_eq!(one("pgrs_instance_is_primary", "node0"), Some(1.0));
        assert_eq!(one("pgrs_instance_is_primary", "node1"), Some(0.0));
        assert_eq!(one("pgrs_instance_lag_bytes", "node1"), Some(0.0));
        assert_eq!(one("pgrs_instance_lag_bytes", "node2"), None, "{text}");
        assert_eq!(one("pgrs_instance_lag_seconds", "node2"), None, "{text}");
        assert_eq!(one("pgrs_instance_wal_receiver_up", "node2"), Some(0.0));
        assert_eq!(one("pgrs_instance_wal_receiver_up", "node0"), None);
        assert_eq!(
            parsed.value(
                "pgrs_instance_role",
                &[("instance", "node1"), ("role", "replica")]
            ),
            Some(1.0)
        );
        assert_eq!(
            parsed.value("pgrs_cluster_phase", &[("phase", "Healthy")]),
            Some(1.0)
        );
        assert_eq!(parsed.value("pgrs_cluster_has_primary", &[]), Some(1.0));
    }

    #[test]
    fn failovers_are_counted_by_reason_with_their_duration() {
        let metrics = LocalMetrics::new("local");
        metrics.observe_status(&status(0, Phase::Healthy, Some("node0"), Some("node0")));
        // Hard kill: unreachable, then taken over after expiry.
        metrics.observe_status(&status(100, Phase::PrimaryUnavailable, None, Some("node0")));
        metrics.observe_status(&status(8100, Phase::FailingOver, None, Some("node1")));
        metrics.observe_status(&status(8600, Phase::Healthy, Some("node1"), Some("node1")));
        // A switchover back.
        metrics.observe_status(&status(
            9000,
            Phase::SwitchingOver,
            Some("node1"),
            Some("node1"),
        ));
        metrics.observe_status(&status(9100, Phase::SwitchingOver, None, None));
        metrics.observe_status(&status(9300, Phase::Healthy, Some("node0"), Some("node0")));
        // A snapshot seen twice counts once.
        metrics.observe_status(&status(9300, Phase::Healthy, Some("node0"), Some("node0")));
        metrics.observe_round(Duration::from_millis(3));
        metrics.observe_renewal("node0", true);
        metrics.observe_renewal("node0", false);
        let text = metrics.render(None, &BTreeMap::new());
        let parsed = parse::parse(&text).expect("valid exposition");
        let reason = |r: &str| parsed.value("pgrs_failovers_total", &[("reason", r)]);
        assert_eq!(reason(REASON_PRIMARY_UNREACHABLE), Some(1.0), "{text}");
        assert_eq!(reason(REASON_SWITCHOVER), Some(1.0), "{text}");
        assert_eq!(reason(REASON_PRIMARY_STOPPED), Some(0.0), "{text}");
        assert_eq!(
            parsed.value("pgrs_last_failover_duration_seconds", &[]),
            Some(0.3)
        );
        assert_eq!(
            parsed.value("pgrs_reconcile_duration_seconds_count", &[]),
            Some(1.0)
        );
        assert_eq!(
            parsed.value("pgrs_lease_renewals_total", &[("instance", "node0")]),
            Some(1.0)
        );
        assert_eq!(
            parsed.value(
                "pgrs_lease_renewal_failures_total",
                &[("instance", "node0")]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn a_primary_restart_without_a_change_is_no_failover() {
        let metrics = LocalMetrics::new("local");
        metrics.observe_status(&status(0, Phase::Healthy, Some("node0"), Some("node0")));
        metrics.observe_status(&status(100, Phase::PrimaryUnavailable, None, Some("node0")));
        metrics.observe_status(&status(900, Phase::Healthy, Some("node0"), Some("node0")));
        let text = metrics.render(None, &BTreeMap::new());
        let parsed = parse::parse(&text).expect("valid exposition");
        let total: f64 = parsed
            .find("pgrs_failovers_total", &[])
            .map(|s| s.value)
            .sum();
        assert_eq!(total, 0.0, "{text}");
        assert_eq!(
            parsed.value("pgrs_last_failover_duration_seconds", &[]),
            None
        );
    }
}
