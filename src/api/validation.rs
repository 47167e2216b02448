//! Validation that is not in the schema's static attributes: the `parameters` CEL rules (built
//! from the agent's own list of managed parameters, so the two cannot drift) and the checks the
//! operator runs before building (name lengths the API server cannot see from the spec).

use schemars::Schema;
use serde_json::json;

use super::PgReplicaSet;
use crate::protocol::names::AGENT_OWNED_PARAMETERS;

/// Longest `metadata.name`: the StatefulSet `<name>-<group>` (group ≤ 15) must leave room for
/// the `controller-revision-hash` label (≤ 63 with an 11-character suffix), and Services
/// `<name>-instances` must stay DNS labels.
pub const MAX_CLUSTER_NAME_LEN: usize = 36;

/// At most this many parameters (bounds the CEL cost estimate of the rules below).
pub const MAX_PARAMETERS: u64 = 256;

/// `#[schemars(transform)]` of `spec.parameters`: names must be PostgreSQL GUC names and not
/// managed by the agent.
pub fn parameters_rules(schema: &mut Schema) {
    let owned: Vec<String> = AGENT_OWNED_PARAMETERS
        .iter()
        .map(|name| format!("'{name}'"))
        .collect();
    schema.insert("maxProperties".into(), json!(MAX_PARAMETERS));
    schema.insert(
        "x-kubernetes-validations".into(),
        json!([
            {
                "rule": "self.all(name, name.matches('^[a-z][a-z0-9_.]*$'))",
                "message": "spec.parameters: names must be lowercase PostgreSQL parameter names (letters, digits, '_' and '.')"
            },
            {
                "rule": format!("self.all(name, !(name in [{}]))", owned.join(", ")),
                "message": format!(
                    "spec.parameters: these are managed by the agent and cannot be set: {}",
                    AGENT_OWNED_PARAMETERS.join(", ")
                )
            }
        ]),
    );
}

/// Why the operator refuses a `PgReplicaSet` that the API server accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("metadata.name {name:?} is too long: {len} characters, at most {MAX_CLUSTER_NAME_LEN}")]
    NameTooLong { name: String, len: usize },
    #[error("spec.switchover.targetInstance {target:?} is not an instance of this cluster")]
    UnknownSwitchoverTarget { target: String },
    #[error(
        "spec.parameters.{name} does not exist in PostgreSQL {major} (spec.postgresVersion): {why}"
    )]
    ParameterNotInMajor {
        name: String,
        major: u32,
        why: String,
    },
}

/// Checks the operator needs beyond the schema (the API server cannot relate `metadata.name` to
/// the names derived from it). Pure: run in the validate step before building.
pub fn validate(cluster: &PgReplicaSet) -> Result<(), InvalidSpec> {
    let name = cluster
        .metadata
        .name
        .as_deref()
        .ok_or(InvalidSpec::MissingName)?;
    if name.len() > MAX_CLUSTER_NAME_LEN {
        return Err(InvalidSpec::NameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    if let Some(switchover) = &cluster.spec.switchover {
        let instances = super::instance_names(name, &cluster.spec);
        if !instances.contains(&switchover.target_instance) {
            return Err(InvalidSpec::UnknownSwitchoverTarget {
                target: switchover.target_instance.clone(),
            });
        }
    }
    // postgres would not start with them: every pod would crash-loop on its parameters file.
    let major = cluster.spec.postgres_version;
    for name in cluster.spec.parameters.keys() {
        if let Some(why) = crate::postgres::version::removed_parameter(major, name) {
            return Err(InvalidSpec::ParameterNotInMajor {
                name: name.clone(),
                major,
                why,
            });
        }
    }
    Ok(())
}
