//! Status: from one round's observations and decision to `PgReplicaSet.status`. Pure; the
//! controller writes it with server-side apply on the status subresource.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{
    InstanceRole, InstanceStatus, PgReplicaSetStatus, Phase, ResolvedGroup, SyncState, condition,
};
use crate::control::{Report, standby_lag};
use crate::engine;
use crate::protocol::api::Role;

/// When each report arrived, on the wall clock (for `lastSeen`).
pub type SeenAt = HashMap<String, DateTime<Utc>>;

fn instance_role(role: Option<Role>) -> InstanceRole {
    match role {
        Some(Role::Primary) => InstanceRole::Primary,
        Some(Role::Replica) => InstanceRole::Replica,
        Some(Role::Starting) => InstanceRole::Starting,
        Some(Role::Fenced) => InstanceRole::Fenced,
        Some(Role::Stopped) => InstanceRole::Stopped,
        None => InstanceRole::Unknown,
    }
}

fn api_sync_state(state: crate::engine::SyncState) -> SyncState {
    match state {
        crate::engine::SyncState::Async => SyncState::Async,
        crate::engine::SyncState::Potential => SyncState::Potential,
        crate::engine::SyncState::Sync => SyncState::Sync,
        crate::engine::SyncState::Quorum => SyncState::Quorum,
    }
}

/// `1.5 MiB, 0.4s` for humans.
pub fn format_lag(bytes: Option<u64>, seconds: Option<f64>) -> Option<String> {
    let bytes_text = bytes.map(|b| match b {
        b if b >= 1024 * 1024 => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        b if b >= 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    });
    match (bytes_text, seconds) {
        (Some(b), Some(s)) => Some(format!("{b}, {s:.1}s")),
        (Some(b), None) => Some(b),
        (None, Some(s)) => Some(format!("{s:.1}s")),
        (None, None) => None,
    }
}

pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: i64,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        // Replaced by the previous transition time when the status did not change.
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change.
pub fn keep_transition_times(conditions: &mut [Condition], previous: &[Condition]) {
    for condition in conditions.iter_mut() {
        if let Some(old) = previous
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
}

/// Everything the status is computed from.
pub struct StatusInput<'a> {
    pub generation: i64,
    pub groups: &'a [ResolvedGroup],
    pub reports: &'a HashMap<String, Report>,
    pub seen_at: &'a SeenAt,
    pub decision: &'a engine::Decision,
    /// The engine's phase is Bootstrapping-like while no primary has ever served.
    pub never_served: bool,
    pub lag_alert_seconds: f64,
    pub last_failover: Option<crate::api::FailoverRecord>,
    /// Instances fenced on request (annotation `pgrs.dev/fence`).
    pub fenced: &'a BTreeSet<String>,
    /// Instances whose agent has not answered within the staleness window: their last report
    /// is not shown as current (role `unknown`, not ready; `lastSeen` says when it last did).
    pub unobserved: &'a BTreeSet<String>,
}

pub fn cluster_status(input: &StatusInput<'_>) -> PgReplicaSetStatus {
    let primary_status = input
        .decision
        .status
        .primary
        .as_ref()
        .filter(|p| !input.unobserved.contains(*p))
        .and_then(|p| input.reports.get(p))
        .map(|r| &r.status);
    let mut instances = Vec::new();
    let mut max_bytes: Option<u64> = None;
    let mut max_seconds: Option<f64> = None;
    let mut lag_unknown = false;
    let mut lag_high = Vec::new();
    let mut streaming = 0usize;
    let mut desired = 0usize;
    for group in input.groups {
        for name in group.instance_names() {
            desired += 1;
            let status = input
                .reports
                .get(&name)
                .filter(|_| !input.unobserved.contains(&name))
                .map(|r| &r.status);
            let is_primary = input.decision.status.primary.as_deref() == Some(name.as_str());
            let (lag_bytes, lag_seconds) = match (primary_status, status) {
                (Some(p), Some(s)) if !is_primary && s.role == Role::Replica => standby_lag(p, s),
                (_, Some(_)) if is_primary => (None, None),
                _ => (None, None),
            };
            let is_streaming = status
                .and_then(|s| s.wal_receiver.as_ref())
                .is_some_and(|w| w.status.is_streaming());
            if !is_primary {
                if is_streaming {
                    streaming += 1;
                }
                match (lag_bytes, lag_seconds) {
                    (None, None) => lag_unknown = true,
                    _ => {
                        max_bytes = max_bytes.max(lag_bytes);
                        if let Some(s) = lag_seconds {
                            max_seconds = Some(max_seconds.map_or(s, |m: f64| m.max(s)));
                            if s > input.lag_alert_seconds {
                                lag_high.push(format!("{name} ({s:.1}s)"));
                            }
                        }
                    }
                }
            }
            let sync_state = primary_status.and_then(|p| {
                p.replication
                    .iter()
                    .find(|r| r.application_name == name)
                    .and_then(|r| r.sync_state.map(api_sync_state))
            });
            let ready = status.is_some_and(|s| {
                s.postgres_up
                    && (if is_primary {
                        s.role == Role::Primary
                    } else {
                        s.role == Role::Replica && is_streaming
                    })
            });
            instances.push(InstanceStatus {
                name: name.clone(),
                group: Some(group.name.clone()),
                role: instance_role(status.map(|s| s.role)),
                ready,
                timeline: status.and_then(|s| s.timeline),
                lsn: status
                    .and_then(|s| s.current_lsn.or(s.replay_lsn))
                    .map(|l| l.to_string()),
                lag_bytes,
                lag_seconds,
                sync_state,
                last_seen: input
                    .seen_at
                    .get(&name)
                    .and_then(|at| k8s_openapi::jiff::Timestamp::from_second(at.timestamp()).ok())
                    .map(Time),
            });
        }
    }
    let ready_count = instances.iter().filter(|i| i.ready).count();
    let engine_phase = input.decision.status.phase;
    let phase = match engine_phase {
        engine::Phase::PrimaryUnavailable | engine::Phase::FailoverBlocked
            if input.never_served =>
        {
            Phase::Bootstrapping
        }
        other => Phase::from(other),
    };
    let standbys = desired.saturating_sub(1);
    let replication_ok = input.decision.status.primary.is_some() && streaming >= standbys;
    let generation = input.generation;
    let mut conditions = vec![
        condition(
            condition::READY,
            input.decision.status.primary.is_some() && ready_count == desired,
            if input.decision.status.primary.is_some() {
                "PrimaryServing"
            } else {
                "NoPrimary"
            },
            format!(
                "{ready_count}/{desired} instances ready; {}",
                input.decision.status.message
            ),
            generation,
        ),
        condition(
            condition::REPLICATION_HEALTHY,
            replication_ok,
            if replication_ok {
                "AllStreaming"
            } else {
                "StandbysNotStreaming"
            },
            format!("{streaming}/{standbys} standbys streaming from the primary"),
            generation,
        ),
        condition(
            condition::LAG_HIGH,
            !lag_high.is_empty(),
            if lag_high.is_empty() {
                "LagWithinLimit"
            } else {
                "LagAboveAlert"
            },
            if lag_high.is_empty() {
                format!(
                    "no standby is more than {}s behind",
                    input.lag_alert_seconds
                )
            } else {
                format!(
                    "behind by more than {}s: {}",
                    input.lag_alert_seconds,
                    lag_high.join(", ")
                )
            },
            generation,
        ),
        condition(
            condition::SPEC_VALID,
            true,
            "Valid",
            "the spec passed validation".to_string(),
            generation,
        ),
    ];
    conditions.push(condition(
        condition::FENCED,
        !input.fenced.is_empty(),
        if input.fenced.is_empty() {
            "NoneFenced"
        } else {
            "FencedOnRequest"
        },
        if input.fenced.is_empty() {
            "no instance is fenced".to_string()
        } else {
            let names: Vec<&str> = input.fenced.iter().map(String::as_str).collect();
            format!(
                "fenced on request (annotation pgrs.dev/fence): {}",
                names.join(", ")
            )
        },
        generation,
    ));
    let failsafe_ms = primary_status
        .and_then(|p| p.failsafe.as_ref())
        .and_then(|f| f.serving_on_confirmations_ms);
    conditions.push(condition(
        condition::SERVING_ON_FAILSAFE,
        failsafe_ms.is_some(),
        if failsafe_ms.is_some() {
            "LeaseStoreUnreachable"
        } else {
            "LeaseRenewing"
        },
        match (failsafe_ms, input.decision.status.primary.as_deref()) {
            (Some(ms), Some(primary)) => format!(
                "{primary} cannot renew its Lease (the API server is unreachable from it) and has served on the confirmations of every member for {} s",
                ms / 1000
            ),
            _ => "the primary renews its Lease".to_string(),
        },
        generation,
    ));
    let primary_fenced = input.decision.status.primary.is_none()
        && input
            .decision
            .status
            .message
            .contains(crate::operator::fence::ANNOTATION_FENCE);
    if engine_phase == engine::Phase::FailoverBlocked && !input.never_served {
        conditions.push(condition(
            condition::FAILOVER_BLOCKED,
            true,
            if primary_fenced {
                "PrimaryFenced"
            } else {
                "NoSafeCandidate"
            },
            input.decision.status.message.clone(),
            generation,
        ));
    }
    let max_lag = if lag_unknown && max_bytes.is_none() && max_seconds.is_none() {
        None
    } else {
        format_lag(max_bytes, max_seconds)
    };
    PgReplicaSetStatus {
        phase: Some(phase),
        current_primary: input.decision.status.primary.clone(),
        observed_generation: Some(generation),
        ready: Some(format!("{ready_count}/{desired}")),
        max_lag,
        conditions,
        instances,
        last_failover: input.last_failover.clone(),
        // Set by the controller (`major_upgrade`), which owns them.
        postgres_version: None,
        major_upgrade: None,
    }
}

/// Standbys replaying more than `threshold` seconds behind the primary, with their lag: what
/// the `LagHigh` condition lists and the `LagHigh` Events announce.
pub fn lagging(status: &PgReplicaSetStatus, threshold: f64) -> BTreeMap<String, f64> {
    status
        .instances
        .iter()
        .filter(|i| status.current_primary.as_deref() != Some(i.name.as_str()))
        .filter_map(|i| {
            i.lag_seconds
                .filter(|s| *s > threshold)
                .map(|s| (i.name.clone(), s))
        })
        .collect()
}

/// The status of a spec the operator refuses: phase Invalid and the reason, nothing else
/// changed.
pub fn invalid_status(
    previous: Option<&PgReplicaSetStatus>,
    generation: i64,
    message: String,
) -> PgReplicaSetStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.phase = Some(Phase::Invalid);
    status.observed_generation = Some(generation);
    status
        .conditions
        .retain(|c| c.type_ != condition::SPEC_VALID);
    status.conditions.push(condition(
        condition::SPEC_VALID,
        false,
        "Invalid",
        message,
        generation,
    ));
    status
}

/// How stale the `lastSeen` times written in the status may grow while nothing else changes.
/// Without it every round (each `statusIntervalSeconds`) would write the status for the
/// heartbeat alone, and each write starts another reconcile through the operator's own watch.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `new` is worth writing over `previous` (the status as last read): any change but
/// the instances' `lastSeen`, an instance first seen or no longer seen, or a `lastSeen` written
/// `heartbeat` or longer ago. An instance cut off keeps its last `lastSeen` (its role and
/// readiness change, which is written at once).
pub fn should_write(
    previous: Option<&PgReplicaSetStatus>,
    new: &PgReplicaSetStatus,
    heartbeat: std::time::Duration,
) -> bool {
    let Some(previous) = previous else {
        return true;
    };
    let without_seen = |status: &PgReplicaSetStatus| {
        let mut status = status.clone();
        for instance in &mut status.instances {
            instance.last_seen = None;
        }
        status
    };
    if without_seen(previous) != without_seen(new) {
        return true;
    }
    let heartbeat = i64::try_from(heartbeat.as_millis()).unwrap_or(i64::MAX);
    previous
        .instances
        .iter()
        .zip(&new.instances)
        .any(|(before, now)| match (&before.last_seen, &now.last_seen) {
            (None, None) => false,
            (Some(before), Some(now)) => {
                now.0.as_millisecond() - before.0.as_millisecond() >= heartbeat
            }
            _ => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen_status(seen: &[(&str, Option<i64>)]) -> PgReplicaSetStatus {
        PgReplicaSetStatus {
            phase: Some(Phase::Healthy),
            current_primary: Some("pg-0".to_string()),
            instances: seen
                .iter()
                .map(|(name, second)| InstanceStatus {
                    name: name.to_string(),
                    group: None,
                    role: InstanceRole::Replica,
                    ready: true,
                    timeline: Some(1),
                    lsn: None,
                    lag_bytes: Some(0),
                    lag_seconds: Some(0.0),
                    sync_state: None,
                    last_seen: second.map(|s| {
                        Time(
                            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s)
                                .expect("time"),
                        )
                    }),
                })
                .collect(),
            ..PgReplicaSetStatus::default()
        }
    }

    #[test]
    fn a_status_differing_by_its_heartbeat_alone_is_written_once_it_is_stale() {
        let previous = seen_status(&[("pg-0", Some(0)), ("pg-1", Some(0))]);
        // Nothing at all changed.
        assert!(!should_write(Some(&previous), &previous, HEARTBEAT));
        // Only lastSeen moved, by less than the heartbeat: not written.
        let recent = seen_status(&[("pg-0", Some(9)), ("pg-1", Some(9))]);
        assert!(!should_write(Some(&previous), &recent, HEARTBEAT));
        // One lastSeen is 10 s old: written (with every instance's fresh time).
        let stale = seen_status(&[("pg-0", Some(9)), ("pg-1", Some(10))]);
        assert!(should_write(Some(&previous), &stale, HEARTBEAT));
        // An instance seen for the first time, or no longer: written at once.
        let first = seen_status(&[("pg-0", None), ("pg-1", Some(0))]);
        assert!(should_write(Some(&first), &previous, HEARTBEAT));
        assert!(should_write(Some(&previous), &first, HEARTBEAT));
        // No status yet: written.
        assert!(should_write(None, &previous, HEARTBEAT));
    }

    #[test]
    fn any_other_change_is_written_at_once() {
        let previous = seen_status(&[("pg-0", Some(0)), ("pg-1", Some(0))]);
        let mut unready = seen_status(&[("pg-0", Some(1)), ("pg-1", Some(0))]);
        unready.instances[1].ready = false;
        unready.instances[1].role = InstanceRole::Unknown;
        assert!(should_write(Some(&previous), &unready, HEARTBEAT));
        let mut lagging = seen_status(&[("pg-0", Some(1)), ("pg-1", Some(1))]);
        lagging.instances[1].lag_bytes = Some(1);
        assert!(should_write(Some(&previous), &lagging, HEARTBEAT));
        let mut degraded = previous.clone();
        degraded.phase = Some(Phase::Degraded);
        assert!(should_write(Some(&previous), &degraded, HEARTBEAT));
        let more = seen_status(&[("pg-0", Some(0)), ("pg-1", Some(0)), ("pg-2", Some(0))]);
        assert!(should_write(Some(&previous), &more, HEARTBEAT));
    }

    #[test]
    fn lagging_lists_standbys_above_the_threshold_only() {
        let instance = |name: &str, lag: Option<f64>| InstanceStatus {
            name: name.to_string(),
            group: None,
            role: InstanceRole::Replica,
            ready: true,
            timeline: None,
            lsn: None,
            lag_bytes: None,
            lag_seconds: lag,
            sync_state: None,
            last_seen: None,
        };
        let status = PgReplicaSetStatus {
            current_primary: Some("pg-0".to_string()),
            instances: vec![
                instance("pg-0", Some(99.0)),
                instance("pg-1", Some(12.5)),
                instance("pg-2", Some(2.0)),
                instance("pg-3", None),
            ],
            ..PgReplicaSetStatus::default()
        };
        let lagging = lagging(&status, 10.0);
        assert_eq!(lagging.keys().collect::<Vec<_>>(), ["pg-1"]);
        assert_eq!(lagging["pg-1"], 12.5);
    }

    #[test]
    fn lag_text_says_unknown_as_absent_and_zero_as_zero() {
        assert_eq!(format_lag(None, None), None);
        assert_eq!(format_lag(Some(0), Some(0.0)).as_deref(), Some("0 B, 0.0s"));
        assert_eq!(
            format_lag(Some(3 * 1024 * 1024 / 2), None).as_deref(),
            Some("1.5 MiB")
        );
    }
}
