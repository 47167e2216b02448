//! The agents' identity: a ServiceAccount with a Role limited to their Lease and their own
//! pods, nothing more (the operator creates the Lease and moves the role labels).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::Owner;
use super::names;
use crate::api::ResolvedGroup;

pub fn agent_service_account(owner: &Owner) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(names::agent_account(&owner.name)),
        // The agents talk to the API server (the Lease) with this account's token.
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

/// Read and renew the cluster's Lease; read the cluster's pods (by name: a Role cannot say
/// "the caller's own pod", so it lists the instances, and grows with `replicas`).
pub fn agent_role(owner: &Owner, groups: &[ResolvedGroup]) -> Role {
    let pods: Vec<String> = groups
        .iter()
        .flat_map(ResolvedGroup::instance_names)
        .collect();
    Role {
        metadata: owner.meta(names::agent_account(&owner.name)),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec!["coordination.k8s.io".to_string()]),
                resources: Some(vec!["leases".to_string()]),
                resource_names: Some(vec![names::lease(&owner.name)]),
                verbs: ["get", "watch", "update"].map(String::from).to_vec(),
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".to_string()]),
                resource_names: Some(pods),
                verbs: vec!["get".to_string()],
                ..PolicyRule::default()
            },
        ]),
    }
}

pub fn agent_role_binding(owner: &Owner) -> RoleBinding {
    let account = names::agent_account(&owner.name);
    RoleBinding {
        metadata: owner.meta(account.clone()),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_string()),
            kind: "Role".to_string(),
            name: account.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: account,
            namespace: Some(owner.namespace.clone()),
            ..Subject::default()
        }]),
    }
}
