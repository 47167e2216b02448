//! Local mode: from the local controller's [`LocalStatus`] to the dashboard's API types. Pure.

use std::collections::BTreeMap;

use crate::dashboard::ClusterMemory;
use crate::dashboard::api::{ClusterView, LeaseView, NodeView};
use crate::dashboard::history::{NodeLag, TimedEvent};
use crate::view::local::{LocalStatus, NodeStatus};

/// Records one controller observation in `memory` (lag samples, last seen, failovers). The same
/// status seen twice is one observation.
pub fn observe(memory: &mut ClusterMemory, status: &LocalStatus) {
    let at = status.updated_at;
    for node in status.nodes.iter().filter(|n| n.reachable) {
        memory.last_seen.mark(&node.name, at);
    }
    let lags: BTreeMap<String, NodeLag> = status
        .nodes
        .iter()
        .filter(|n| n.role.as_deref() == Some("replica"))
        .map(|n| {
            (
                n.name.clone(),
                NodeLag {
                    bytes: n.lag_bytes,
                    seconds: n.lag_seconds,
                },
            )
        })
        .collect();
    memory.lag.record(at, lags);
    let events: Vec<TimedEvent> = status
        .events
        .iter()
        .map(|e| TimedEvent {
            at: e.at,
            reason: e.reason.clone(),
        })
        .collect();
    let gap = status
        .last_failover
        .as_ref()
        .filter(|choice| status.primary.as_deref() == Some(choice.to.as_str()))
        .and_then(|choice| choice.lsn_gap_bytes);
    memory
        .failovers
        .observe(at, status.primary.as_deref(), &events, gap);
}

fn node_view(memory: &ClusterMemory, node: &NodeStatus) -> NodeView {
    let role = match (&node.role, node.reachable) {
        (_, false) => "unreachable".to_string(),
        (Some(role), true) => role.clone(),
        (None, true) => "unknown".to_string(),
    };
    let ready =
        node.reachable && node.postgres_up && matches!(role.as_str(), "primary" | "replica");
    NodeView {
        name: node.name.clone(),
        role,
        ready,
        timeline: node.timeline,
        current_lsn: node.current_lsn.map(|l| l.to_string()),
        receive_lsn: node.receive_lsn.map(|l| l.to_string()),
        replay_lsn: node.replay_lsn.map(|l| l.to_string()),
        lag_bytes: node.lag_bytes,
        lag_seconds: node.lag_seconds,
        sync_state: node.sync_state.clone(),
        upstream: node.upstream.clone(),
        last_seen: memory.last_seen.get(&node.name),
        error: node.last_error.clone(),
    }
}

/// The cluster as the dashboard shows it.
pub fn cluster_view(memory: &ClusterMemory, status: &LocalStatus) -> ClusterView {
    ClusterView {
        name: status.cluster.clone(),
        namespace: None,
        phase: Some(status.phase.into()),
        message: Some(status.message.clone()),
        primary: status.primary.clone(),
        replication_mode: Some(if status.sync { "sync" } else { "async" }.to_string()),
        write_endpoint: Some(status.write_endpoint.clone()),
        lease: LeaseView {
            holder: status.lease.holder.clone(),
            expires_in_ms: status.lease.expires_in_ms,
            duration_ms: Some(status.lease.duration_ms),
        },
        nodes: status.nodes.iter().map(|n| node_view(memory, n)).collect(),
        failovers: memory.failovers.records(),
        lag_history: memory.lag_history(),
        observed_at: status.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::engine::{FailoverChoice, Lsn, Phase as EnginePhase};
    use crate::view::local::{EventRecord, LeaseStatus};
    use chrono::{DateTime, Utc};

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    fn node(name: &str, role: Option<&str>) -> NodeStatus {
        NodeStatus {
            name: name.to_string(),
            pg_port: 15440,
            agent_port: 15441,
            reachable: true,
            role: role.map(str::to_string),
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

    fn status(at: DateTime<Utc>, primary: &str, nodes: Vec<NodeStatus>) -> LocalStatus {
        LocalStatus {
            cluster: "local".to_string(),
            phase: EnginePhase::Healthy,
            message: format!("{primary} is primary"),
            primary: Some(primary.to_string()),
            lease: LeaseStatus {
                holder: Some(primary.to_string()),
                version: "3".to_string(),
                expires_in_ms: Some(7000),
                duration_ms: 8000,
            },
            write_endpoint: "127.0.0.1:15432".to_string(),
            sync: false,
            nodes,
            events: vec![],
            last_failover: None,
            updated_at: at,
        }
    }

    fn three_nodes() -> Vec<NodeStatus> {
        let mut primary = node("node0", Some("primary"));
        primary.current_lsn = Some(Lsn(0x300_0060));
        let mut caught_up = node("node1", Some("replica"));
        caught_up.receive_lsn = Some(Lsn(0x300_0060));
        caught_up.replay_lsn = Some(Lsn(0x300_0060));
        caught_up.lag_bytes = Some(0);
        caught_up.lag_seconds = Some(0.0);
        caught_up.sync_state = Some("async".to_string());
        caught_up.upstream = Some("node0".to_string());
        let mut gone = node("node2", None);
        gone.reachable = false;
        gone.postgres_up = false;
        gone.last_error = Some("connection refused".to_string());
        vec![primary, caught_up, gone]
    }

    #[test]
    fn maps_roles_positions_and_unknown_lag() {
        let mut memory = ClusterMemory::default();
        let first = status(t(0), "node0", three_nodes());
        observe(&mut memory, &first);
        let view = cluster_view(&memory, &first);
        assert_eq!(view.phase, Some(Phase::Healthy));
        assert_eq!(view.primary.as_deref(), Some("node0"));
        assert_eq!(view.replication_mode.as_deref(), Some("async"));
        assert_eq!(view.lease.holder.as_deref(), Some("node0"));
        assert_eq!(view.lease.expires_in_ms, Some(7000));
        assert_eq!(view.lease.duration_ms, Some(8000));
        let [primary, replica, gone] = view.nodes.as_slice() else {
            panic!("three nodes: {:?}", view.nodes)
        };
        assert_eq!((primary.role.as_str(), primary.ready), ("primary", true));
        assert_eq!(primary.current_lsn.as_deref(), Some("0/3000060"));
        assert_eq!(primary.lag_bytes, None);
        assert_eq!((replica.role.as_str(), replica.ready), ("replica", true));
        assert_eq!(replica.replay_lsn.as_deref(), Some("0/3000060"));
        assert_eq!(replica.lag_bytes, Some(0));
        assert_eq!(replica.lag_seconds, Some(0.0));
        assert_eq!(replica.sync_state.as_deref(), Some("async"));
        assert_eq!(replica.last_seen, Some(t(0)));
        assert_eq!((gone.role.as_str(), gone.ready), ("unreachable", false));
        assert_eq!(gone.last_seen, None, "never answered");
        assert_eq!(gone.error.as_deref(), Some("connection refused"));
        // Only replicas are charted; their known lag is 0, not a gap.
        let series = &view.lag_history.series;
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].node, "node1");
        assert_eq!(series[0].points[0].bytes, Some(0));
    }

    #[test]
    fn a_switchover_between_observations_becomes_a_timed_failover_record() {
        let mut memory = ClusterMemory::default();
        observe(&mut memory, &status(t(0), "node0", three_nodes()));
        let mut after = status(t(2000), "node1", three_nodes());
        after.events = vec![
            EventRecord {
                at: t(1000),
                severity: "info".to_string(),
                reason: "SwitchoverRequested".to_string(),
                message: "switchover from node0 to node1 requested".to_string(),
            },
            EventRecord {
                at: t(1400),
                severity: "info".to_string(),
                reason: "SwitchoverCompleted".to_string(),
                message: "switchover from node0 to node1 completed".to_string(),
            },
        ];
        after.last_failover = Some(FailoverChoice {
            from: Some("node0".to_string()),
            to: "node1".to_string(),
            lsn_gap_bytes: Some(0),
            data_loss_allowed: false,
        });
        observe(&mut memory, &after);
        let view = cluster_view(&memory, &after);
        let [record] = view.failovers.as_slice() else {
            panic!("one failover: {:?}", view.failovers)
        };
        assert_eq!(record.reason, "Switchover");
        assert_eq!(record.from.as_deref(), Some("node0"));
        assert_eq!(record.to, "node1");
        assert_eq!(record.duration_ms, Some(400));
        assert_eq!(record.lsn_gap_bytes, Some(0));
        assert_eq!(view.lag_history.series[0].points.len(), 2);
    }
}
