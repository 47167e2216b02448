//! The cluster's pods as the operator sees them: name, pod IP (agents are reached there, never
//! through a Service), labels, whether it is being deleted. The agents' reports and their
//! mapping into the engine's input are the shared control loop's ([`crate::control`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

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
    /// Its agent serves HTTPS (`--https` in the pod's own arguments: during a change of
    /// `spec.tls`, pods made from the old template still serve plain HTTP).
    pub https: bool,
}

impl PodView {
    pub fn of(pod: &Pod) -> Option<PodView> {
        Some(PodView {
            name: pod.metadata.name.clone()?,
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            uid: pod.metadata.uid.clone(),
            https: pod.spec.as_ref().is_some_and(|spec| {
                spec.containers.iter().any(|c| {
                    c.name == names::CONTAINER_NAME
                        && c.args.iter().flatten().any(|arg| arg == "--https")
                })
            }),
        })
    }

    pub fn agent_url(&self) -> Option<String> {
        self.ip.as_ref().map(|ip| {
            let scheme = if self.https { "https" } else { "http" };
            format!("{scheme}://{ip}:{}", names::AGENT_PORT)
        })
    }
}
