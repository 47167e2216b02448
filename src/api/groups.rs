//! Instance groups as the operator builds them: the spec's `groups`, or one default group of
//! `replicas` instances when none is given. Names of StatefulSets and pods derive from here only.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};

use super::PgReplicaSetSpec;

/// Group label value of the implicit group (no `spec.groups`). Its StatefulSet is named after
/// the cluster itself, so its pods are `<name>-0`, `<name>-1`, ...
pub const DEFAULT_GROUP: &str = "default";

/// One group, resolved: what one StatefulSet is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedGroup {
    /// Value of the `pgrs.dev/group` label.
    pub name: String,
    /// StatefulSet name; pods are `<statefulset>-<ordinal>`.
    pub statefulset: String,
    pub replicas: u32,
    pub failover_priority: u32,
    pub sync_eligible: bool,
    pub node_selector: BTreeMap<String, String>,
    pub affinity: Option<Affinity>,
    pub tolerations: Vec<Toleration>,
}

impl ResolvedGroup {
    /// Pod names of this group, by ordinal.
    pub fn instance_names(&self) -> Vec<String> {
        (0..self.replicas)
            .map(|ordinal| format!("{}-{ordinal}", self.statefulset))
            .collect()
    }
}

/// The groups of cluster `name`, in spec order.
pub fn resolve_groups(name: &str, spec: &PgReplicaSetSpec) -> Vec<ResolvedGroup> {
    if spec.groups.is_empty() {
        return vec![ResolvedGroup {
            name: DEFAULT_GROUP.to_string(),
            statefulset: name.to_string(),
            replicas: spec.replicas,
            failover_priority: 1,
            sync_eligible: true,
            node_selector: BTreeMap::new(),
            affinity: None,
            tolerations: Vec::new(),
        }];
    }
    spec.groups
        .iter()
        .map(|group| ResolvedGroup {
            name: group.name.clone(),
            statefulset: format!("{name}-{}", group.name),
            replicas: group.replicas,
            failover_priority: group.failover_priority,
            sync_eligible: group.sync_eligible,
            node_selector: group.node_selector.clone(),
            affinity: group.affinity.clone(),
            tolerations: group.tolerations.clone(),
        })
        .collect()
}

/// Every instance (pod) name of cluster `name`.
pub fn instance_names(name: &str, spec: &PgReplicaSetSpec) -> Vec<String> {
    resolve_groups(name, spec)
        .iter()
        .flat_map(ResolvedGroup::instance_names)
        .collect()
}
