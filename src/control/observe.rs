//! Observe: agent reports → the engine's input. The one mapping both platforms use (roles,
//! positions, the primary's view of each standby's sync state, upstream resolution by the
//! sender's address) and the lag rule. Pure.

use std::collections::HashMap;

use crate::engine::{
    EngineInput, EngineSpec, InstanceObservation, LeaseView, MonoTime, ObservedRole, SyncState,
};
use crate::protocol::api::{AgentStatus, RejoinPath, Role};

use super::reports::Reports;
use super::state::ControlState;

/// Where each instance's postgres listens for its peers (`host`, `port`).
pub type Addresses = HashMap<String, (String, u16)>;

pub fn observed_role(role: Role) -> ObservedRole {
    match role {
        Role::Primary => ObservedRole::Primary,
        Role::Replica => ObservedRole::Replica,
        Role::Starting => ObservedRole::Starting,
        Role::Fenced => ObservedRole::Fenced,
        Role::Stopped => ObservedRole::Stopped,
    }
}

/// The instance whose postgres listens at `host:port`.
fn instance_at<'a>(addresses: &'a Addresses, host: &str, port: i32) -> Option<&'a str> {
    addresses
        .iter()
        .find(|(_, (h, p))| h == host && i32::from(*p) == port)
        .map(|(name, _)| name.as_str())
}

/// The instance a replica streams from, when its WAL receiver is streaming.
pub fn upstream_of(status: &AgentStatus, addresses: &Addresses) -> Option<String> {
    let receiver = status.wal_receiver.as_ref()?;
    if !receiver.status.is_streaming() {
        return None;
    }
    instance_at(
        addresses,
        receiver.sender_host.as_deref()?,
        receiver.sender_port?,
    )
    .map(str::to_string)
}

/// Lag of one standby: bytes from the primary's current LSN to the standby's replay LSN,
/// seconds from the primary's `pg_stat_replication` (a NULL lag with everything sent replayed
/// means caught up on an idle primary: 0, not unknown).
pub fn standby_lag(primary: &AgentStatus, standby: &AgentStatus) -> (Option<u64>, Option<f64>) {
    let bytes = match (primary.current_lsn, standby.replay_lsn) {
        (Some(current), Some(replay)) => Some(current.bytes_since(replay)),
        _ => None,
    };
    let seconds = primary
        .replication
        .iter()
        .find(|p| p.application_name == standby.name)
        .and_then(|p| match p.replay_lag_seconds {
            Some(seconds) => Some(seconds),
            None if p.replay_lsn.is_some() && p.replay_lsn == p.sent_lsn => Some(0.0),
            None => None,
        });
    (bytes, seconds)
}

/// The primary's view of one standby (`pg_stat_replication.sync_state`), from whichever
/// reachable instance reports itself primary.
pub fn sync_state_of(reports: &[&AgentStatus], standby: &str) -> Option<SyncState> {
    reports
        .iter()
        .filter(|s| s.role == Role::Primary)
        .flat_map(|s| s.replication.iter())
        .find(|peer| peer.application_name == standby)
        .and_then(|peer| peer.sync_state)
}

/// The engine's input for one round: `instances` in spec order; a report counts only while it
/// is at most `spec.report_stale_after` old.
pub fn engine_input(
    now: MonoTime,
    instances: &[String],
    addresses: &Addresses,
    reports: &Reports,
    lease: LeaseView,
    spec: EngineSpec,
    state: &ControlState,
) -> EngineInput {
    let fresh: HashMap<&str, &AgentStatus> = instances
        .iter()
        .filter_map(|name| {
            let report = reports.fresh(name, now, spec.report_stale_after)?;
            Some((name.as_str(), &report.status))
        })
        .collect();
    let all: Vec<&AgentStatus> = fresh.values().copied().collect();
    let observations = instances
        .iter()
        .map(|name| {
            let report = reports.fresh(name, now, spec.report_stale_after);
            let status = report.map(|r| &r.status);
            let role = status.map_or(ObservedRole::Unknown, |s| observed_role(s.role));
            InstanceObservation {
                name: name.clone(),
                reachable: report.is_some(),
                postgres_up: status.is_some_and(|s| s.postgres_up),
                role,
                timeline: status.and_then(|s| s.timeline),
                received_lsn: status.and_then(|s| s.receive_lsn),
                replayed_lsn: status.and_then(|s| s.replay_lsn),
                flush_lsn: status.and_then(|s| s.current_lsn),
                sync_state: sync_state_of(&all, name),
                upstream: status.and_then(|s| upstream_of(s, addresses)),
                applied_sync: (role == ObservedRole::Primary)
                    .then(|| state.applied_sync.get(name).cloned())
                    .flatten(),
                last_report_at: report.map(|r| r.asked_at),
                former_primary: state.former_primaries.contains(name),
                last_seen_serving_at: reports
                    .latest(name)
                    .filter(|r| r.status.role == Role::Primary && r.status.postgres_up)
                    .map(|r| r.asked_at),
            }
        })
        .collect();
    EngineInput {
        now,
        instances: observations,
        lease,
        spec,
        memory: state.memory.clone(),
    }
}

/// Former primaries that their agent already rewound against the holder when it started (the
/// agent does that for a data directory last run as a primary) and that now stream from the
/// holder on the holder's timeline: no second rejoin. `busy` instances are left to their action.
pub fn rewound_former_primaries(
    state: &ControlState,
    holder: &str,
    addresses: &Addresses,
    reports: &Reports,
    busy: &dyn Fn(&str) -> bool,
) -> Vec<(String, RejoinPath)> {
    let Some((host, port)) = addresses.get(holder) else {
        return Vec::new();
    };
    let holder_timeline = reports
        .latest(holder)
        .map(|r| &r.status)
        .filter(|s| s.role == Role::Primary && s.postgres_up)
        .and_then(|s| s.timeline);
    state
        .former_primaries
        .iter()
        .filter(|name| name.as_str() != holder && !busy(name))
        .filter_map(|name| {
            let status = &reports.latest(name)?.status;
            let rejoin = status
                .last_rejoin
                .as_ref()
                .filter(|r| r.upstream.host == *host && r.upstream.port == *port)?;
            let streaming = status.role == Role::Replica
                && status.wal_receiver.as_ref().is_some_and(|w| {
                    w.status.is_streaming()
                        && w.sender_host.as_deref() == Some(host.as_str())
                        && w.sender_port == Some(i32::from(*port))
                        && w.received_tli.is_some()
                        && w.received_tli == holder_timeline
                });
            streaming.then(|| (name.clone(), rejoin.path))
        })
        .collect()
}
