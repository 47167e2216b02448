//! Observe: the cluster's pods (name, pod IP, labels) and each agent's `GET /v1/status` at its
//! pod IP (never through a Service), turned into the engine's input. Polling is IO; the
//! translation into [`EngineInput`] is pure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::agent::api::{AgentStatus, Role};
use crate::agent::client::{AgentClient, ClientError};
use crate::engine::{
    EngineInput, EngineSpec, InstanceObservation, LeaseView, Memory, MonoTime, ObservedRole,
    SyncSet, SyncState,
};
use crate::operator::build::names;

/// A status request may not delay the round: an agent that does not answer in time counts as
/// unreachable for this round.
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(800);
/// The same for a pod being deleted.
pub const DELETING_STATUS_TIMEOUT: Duration = Duration::from_millis(250);

/// One database pod as the API server shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub ip: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The pod has a deletion timestamp (it is stopping).
    pub deleting: bool,
    /// Changes when the StatefulSet recreates the pod under the same name.
    pub uid: Option<String>,
}

impl PodView {
    pub fn of(pod: &Pod) -> Option<PodView> {
        Some(PodView {
            name: pod.metadata.name.clone()?,
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            uid: pod.metadata.uid.clone(),
        })
    }

    pub fn agent_url(&self) -> Option<String> {
        self.ip
            .as_ref()
            .map(|ip| format!("http://{ip}:{}", names::AGENT_PORT))
    }
}

/// The last answer of one agent, with the observer's clock when it was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub asked_at: MonoTime,
    pub status: AgentStatus,
}

/// Outcome of one status request.
#[derive(Debug)]
pub enum Poll {
    Answered(Box<AgentStatus>),
    /// Nothing listens (connection refused) or the pod has no IP: the agent is gone.
    Gone(String),
    /// A slow or failed answer: the last report stays and ages out by the engine's rule.
    Failed(String),
}

/// Asks one agent for its status.
pub async fn poll(pod: &PodView) -> Poll {
    let Some(url) = pod.agent_url() else {
        return Poll::Gone("the pod has no IP yet".to_string());
    };
    let client = match AgentClient::new(url, None) {
        Ok(client) => client,
        Err(error) => return Poll::Failed(error.to_string()),
    };
    // A stopping pod's address disappears with it; do not let it slow down every round.
    let timeout = if pod.deleting {
        DELETING_STATUS_TIMEOUT
    } else {
        STATUS_TIMEOUT
    };
    match tokio::time::timeout(timeout, client.status()).await {
        Ok(Ok(status)) => Poll::Answered(Box::new(status)),
        Ok(Err(error)) => {
            let refused =
                matches!(&error, ClientError::Transport { source, .. } if source.is_connect());
            if refused {
                Poll::Gone(error.to_string())
            } else {
                Poll::Failed(error.to_string())
            }
        }
        Err(_) => Poll::Failed("status request timed out".to_string()),
    }
}

pub fn observed_role(role: Role) -> ObservedRole {
    match role {
        Role::Primary => ObservedRole::Primary,
        Role::Replica => ObservedRole::Replica,
        Role::Starting => ObservedRole::Starting,
        Role::Fenced => ObservedRole::Fenced,
        Role::Stopped => ObservedRole::Stopped,
    }
}

pub fn sync_state(text: &str) -> Option<SyncState> {
    match text {
        "async" => Some(SyncState::Async),
        "potential" => Some(SyncState::Potential),
        "sync" => Some(SyncState::Sync),
        "quorum" => Some(SyncState::Quorum),
        _ => None,
    }
}

/// What the controller remembers about a cluster besides the engine's memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Remembered {
    pub memory: Memory,
    /// Instances that ran as primary and lost the lease since: they rejoin (rewind), not follow.
    pub former_primaries: BTreeSet<String>,
    /// The `synchronous_standby_names` last applied per primary.
    pub applied_sync: BTreeMap<String, SyncSet>,
}

/// The engine's input for one round. Pure: `instances` are the cluster's instance names in
/// spec order, `pods` the pods found, `reports` the last answer of each agent.
pub fn engine_input(
    now: MonoTime,
    instances: &[String],
    pods: &HashMap<String, PodView>,
    reports: &HashMap<String, Report>,
    lease: LeaseView,
    spec: EngineSpec,
    remembered: &Remembered,
) -> EngineInput {
    let ip_to_name: HashMap<&str, &str> = pods
        .values()
        .filter_map(|p| p.ip.as_deref().map(|ip| (ip, p.name.as_str())))
        .collect();
    // The primary's view of each standby (sync state).
    let peer_sync: HashMap<&str, &str> = reports
        .values()
        .filter(|r| r.status.role == Role::Primary)
        .flat_map(|r| r.status.replication.iter())
        .map(|peer| (peer.application_name.as_str(), peer.sync_state.as_str()))
        .collect();
    let observations = instances
        .iter()
        .map(|name| {
            let report = reports.get(name);
            let status = report.map(|r| &r.status);
            let role = status.map_or(ObservedRole::Unknown, |s| observed_role(s.role));
            let upstream = status
                .and_then(|s| s.wal_receiver.as_ref())
                .filter(|w| w.status == "streaming")
                .and_then(|w| w.sender_host.as_deref())
                .and_then(|host| ip_to_name.get(host))
                .map(|name| name.to_string());
            InstanceObservation {
                name: name.clone(),
                reachable: report.is_some(),
                postgres_up: status.is_some_and(|s| s.postgres_up),
                role,
                timeline: status.and_then(|s| s.timeline),
                received_lsn: status.and_then(|s| s.receive_lsn),
                replayed_lsn: status.and_then(|s| s.replay_lsn),
                flush_lsn: status.and_then(|s| s.current_lsn),
                sync_state: peer_sync.get(name.as_str()).and_then(|s| sync_state(s)),
                upstream,
                applied_sync: (role == ObservedRole::Primary)
                    .then(|| remembered.applied_sync.get(name).cloned())
                    .flatten(),
                last_report_at: report.map(|r| r.asked_at),
                former_primary: remembered.former_primaries.contains(name),
            }
        })
        .collect();
    EngineInput {
        now,
        instances: observations,
        lease,
        spec,
        memory: remembered.memory.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> PodView {
        PodView {
            name: name.to_string(),
            ip: Some(ip.to_string()),
            labels: BTreeMap::new(),
            deleting: false,
            uid: None,
        }
    }

    #[test]
    fn former_holder_becomes_a_former_primary_when_the_lease_moves() {
        let mut remembered = Remembered::default();
        let mut last_holder = Some("pg-0".to_string());
        let input = engine_input(
            MonoTime::from_millis(10),
            &["pg-0".to_string(), "pg-1".to_string()],
            &HashMap::from([
                ("pg-0".to_string(), pod("pg-0", "10.0.0.2")),
                ("pg-1".to_string(), pod("pg-1", "10.0.0.3")),
            ]),
            &HashMap::new(),
            LeaseView {
                holder: Some("pg-1".to_string()),
                version: "7".to_string(),
                unchanged_since: MonoTime::from_millis(0),
                duration: Duration::from_secs(8),
            },
            EngineSpec::default(),
            &remembered,
        );
        crate::engine::track_former_primaries(
            &mut remembered.former_primaries,
            &mut last_holder,
            &input,
        );
        assert!(remembered.former_primaries.contains("pg-0"));
        assert!(!remembered.former_primaries.contains("pg-1"));
        assert_eq!(last_holder.as_deref(), Some("pg-1"));
        // Unreachable instances are observed as unknown, never as healthy.
        assert!(input.instances.iter().all(|i| !i.reachable));
        assert!(
            input
                .instances
                .iter()
                .all(|i| i.role == ObservedRole::Unknown)
        );
    }
}
