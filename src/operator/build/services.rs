//! The four Services. `-rw` and `-ro` select labels that only the operator sets on pods
//! (`pgrs.dev/role`, `pgrs.dev/read-pool`): their endpoints follow its decisions, not the pods'
//! own claims.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Owner;
use super::names;

fn postgres_port() -> ServicePort {
    ServicePort {
        name: Some(names::POSTGRES_PORT_NAME.to_string()),
        port: i32::from(names::POSTGRES_PORT),
        target_port: Some(IntOrString::String(names::POSTGRES_PORT_NAME.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

fn client_service(owner: &Owner, name: String, selector: BTreeMap<String, String>) -> Service {
    Service {
        metadata: owner.meta(name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector),
            ports: Some(vec![postgres_port()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The StatefulSets' governing Service: stable pod DNS names, published before the pods are
/// ready (a standby must reach the primary's agent while it is still cloning).
pub fn headless_service(owner: &Owner) -> Service {
    Service {
        metadata: owner.meta(names::headless_service(&owner.name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names::cluster_selector(&owner.name)),
            ports: Some(vec![
                postgres_port(),
                ServicePort {
                    name: Some(names::AGENT_PORT_NAME.to_string()),
                    port: i32::from(names::AGENT_PORT),
                    target_port: Some(IntOrString::String(names::AGENT_PORT_NAME.to_string())),
                    protocol: Some("TCP".to_string()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Writes: the pod the operator labelled primary (the Lease holder).
pub fn rw_service(owner: &Owner) -> Service {
    let mut selector = names::cluster_selector(&owner.name);
    selector.insert(
        names::LABEL_ROLE.to_string(),
        names::ROLE_PRIMARY.to_string(),
    );
    client_service(owner, names::rw_service(&owner.name), selector)
}

/// Reads: replicas within the read lag limit (a lagging replica leaves, and stays eligible for
/// failover).
pub fn ro_service(owner: &Owner) -> Service {
    let mut selector = names::cluster_selector(&owner.name);
    selector.insert(
        names::LABEL_READ_POOL.to_string(),
        names::READ_POOL_MEMBER.to_string(),
    );
    client_service(owner, names::ro_service(&owner.name), selector)
}

/// Any ready instance that is not fenced.
pub fn r_service(owner: &Owner) -> Service {
    let mut selector = names::cluster_selector(&owner.name);
    selector.insert(
        names::LABEL_IN_SERVICE.to_string(),
        names::IN_SERVICE.to_string(),
    );
    client_service(owner, names::r_service(&owner.name), selector)
}
