//! Validation beyond the schema's static attributes: the CEL rules at the root of the CRD (they
//! relate `metadata.name` to the spec: the names derived from it, the switchover target) and
//! the operator's own check of the same things, built from the same constants and messages so
//! that admission and the operator refuse alike. The `spec.parameters` rules live in
//! [`super::parameters`].

use kube::core::Rule;

use super::PgReplicaSet;
use super::names::{self, CLUSTER_NAME_PATTERN, MAX_STATEFULSET_NAME_LEN};
use super::parameters::{self, ParameterError};

/// Longest `metadata.name` of a cluster without `spec.groups` (its StatefulSet is named after
/// it). With groups, each `<name>-<group>` has at most [`MAX_STATEFULSET_NAME_LEN`] characters.
pub const MAX_CLUSTER_NAME_LEN: usize = MAX_STATEFULSET_NAME_LEN;

const NAME_LABEL_WHY: &str = "must be a DNS-1035 label (a lowercase letter first, then lowercase letters, digits and '-', not ending in '-'): the Services <name>-rw, <name>-ro, <name>-r and <name>-instances are named after it";

const REVISION_LABEL_WHY: &str = "must leave room for the controller-revision-hash label of its pods (<statefulset>-<hash>, at most 63 characters)";

/// Why the operator refuses a `PgReplicaSet` (admission refuses the same, see the rules below).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("metadata.name {name:?} {NAME_LABEL_WHY}")]
    NameNotLabel { name: String },
    #[error(
        "metadata.name {name:?} is too long: the StatefulSet {statefulset:?} has {len} characters, at most {MAX_STATEFULSET_NAME_LEN}: it {REVISION_LABEL_WHY}"
    )]
    NameTooLong {
        name: String,
        statefulset: String,
        len: usize,
    },
    #[error("spec.switchover.targetInstance {target:?} is not an instance of this cluster")]
    UnknownSwitchoverTarget { target: String },
    #[error(
        "spec.bootstrap.{field} {value:?} is not a lowercase PostgreSQL identifier (a letter or '_' first, then lowercase letters, digits and '_', at most 63 characters)"
    )]
    BootstrapNotIdentifier { field: &'static str, value: String },
    #[error("spec.bootstrap.{field} {value:?} is reserved: {why}")]
    BootstrapReserved {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(transparent)]
    Parameter(#[from] ParameterError),
    #[error(
        "spec.parameters.{name} does not exist in PostgreSQL {major} (spec.postgresVersion): {why}"
    )]
    ParameterNotInMajor {
        name: String,
        major: u32,
        why: String,
    },
}

/// Root rule: `metadata.name` is a DNS-1035 label. No `fieldPath`: `metadata` is not part of
/// the structural schema, and the API server refuses `.metadata.name` as a path; the message
/// names the field instead (the refusal shows `<nil>:` as its path).
pub fn name_is_a_label_rule() -> Rule {
    Rule::new(format!(
        "self.metadata.name.matches('{CLUSTER_NAME_PATTERN}')"
    ))
    .message(format!("metadata.name {NAME_LABEL_WHY}").as_str())
}

/// Root rule: without groups, the StatefulSet `<name>` fits.
pub fn name_length_rule() -> Rule {
    Rule::new(format!(
        "(has(self.spec.groups) && size(self.spec.groups) > 0) || size(self.metadata.name) <= {MAX_CLUSTER_NAME_LEN}"
    ))
    .message(
        format!(
            "metadata.name is too long: at most {MAX_CLUSTER_NAME_LEN} characters, as the StatefulSet <name> {REVISION_LABEL_WHY}"
        )
        .as_str(),
    )
}

/// Root rule: with groups, every StatefulSet `<name>-<group>` fits.
pub fn name_and_group_length_rule() -> Rule {
    Rule::new(format!(
        "!has(self.spec.groups) || self.spec.groups.all(g, size(self.metadata.name) + 1 + size(g.name) <= {MAX_STATEFULSET_NAME_LEN})"
    ))
    .message(
        format!(
            "metadata.name is too long for spec.groups: each StatefulSet <name>-<group> has at most {MAX_STATEFULSET_NAME_LEN} characters, as it {REVISION_LABEL_WHY}"
        )
        .as_str(),
    )
}

const SWITCHOVER_TARGET_MESSAGE: &str = "spec.switchover.targetInstance is not an instance of this cluster: <name>-<ordinal>, or <name>-<group>-<ordinal> with spec.groups, the ordinal below the replicas";

/// `self.spec.switchover.targetInstance`.
const TARGET: &str = "self.spec.switchover.targetInstance";

/// The CEL condition "`rest` is an ordinal below `replicas`". Ordinals as literals: a list
/// lookup is far cheaper for the API server's cost estimate than a regular expression
/// (replicas are at most 16).
fn ordinal_below(rest: &str, replicas: &str) -> String {
    let ordinals: Vec<String> = (0..16).map(|o| format!("'{o}'")).collect();
    format!(
        "{rest} in [{}] && int({rest}) < {replicas}",
        ordinals.join(", ")
    )
}

/// Root rule: without groups, `spec.switchover.targetInstance` is `<name>-<ordinal>`.
pub fn switchover_target_rule() -> Rule {
    let ordinal = ordinal_below(
        &format!("{TARGET}.substring(size(self.metadata.name) + 1)"),
        "self.spec.replicas",
    );
    Rule::new(format!(
        "!has(self.spec.switchover) || (has(self.spec.groups) && size(self.spec.groups) > 0) || ({TARGET}.startsWith(self.metadata.name + '-') && {ordinal})"
    ))
    .message(SWITCHOVER_TARGET_MESSAGE)
    .field_path(".spec.switchover.targetInstance")
}

/// Root rule: with groups, `spec.switchover.targetInstance` is `<name>-<group>-<ordinal>`.
/// The cluster name is matched once, outside the loop over groups (its length is unbounded
/// for the cost estimate).
pub fn switchover_target_in_groups_rule() -> Rule {
    let rest = format!("{TARGET}.substring(size(self.metadata.name) + 1)");
    let ordinal = ordinal_below(
        &format!("{TARGET}.substring(size(self.metadata.name) + size(g.name) + 2)"),
        "g.replicas",
    );
    Rule::new(format!(
        "!has(self.spec.switchover) || !has(self.spec.groups) || size(self.spec.groups) == 0 || ({TARGET}.startsWith(self.metadata.name + '-') && self.spec.groups.exists(g, {rest}.startsWith(g.name + '-') && {ordinal}))"
    ))
    .message(SWITCHOVER_TARGET_MESSAGE)
    .field_path(".spec.switchover.targetInstance")
}

/// The operator's check, before building anything: what admission refuses (a cluster stored
/// before a rule existed may still break it), and what PostgreSQL would refuse to start with.
/// Pure.
pub fn validate(cluster: &PgReplicaSet) -> Result<(), InvalidSpec> {
    let name = cluster
        .metadata
        .name
        .as_deref()
        .ok_or(InvalidSpec::MissingName)?;
    if !names::is_dns1035_label(name) {
        return Err(InvalidSpec::NameNotLabel {
            name: name.to_string(),
        });
    }
    for group in super::resolve_groups(name, &cluster.spec) {
        let len = group.statefulset.len();
        if len > MAX_STATEFULSET_NAME_LEN {
            return Err(InvalidSpec::NameTooLong {
                name: name.to_string(),
                statefulset: group.statefulset,
                len,
            });
        }
    }
    if let Some(switchover) = &cluster.spec.switchover {
        let instances = super::instance_names(name, &cluster.spec);
        if !instances.contains(&switchover.target_instance) {
            return Err(InvalidSpec::UnknownSwitchoverTarget {
                target: switchover.target_instance.clone(),
            });
        }
    }
    check_bootstrap(&cluster.spec.bootstrap)?;
    parameters::check(&cluster.spec.parameters)?;
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

/// Whether `name` is a lowercase PostgreSQL identifier that needs no quoting: `[a-z_]` first,
/// then `[a-z0-9_]`, at most 63 bytes (the schema's pattern of `spec.bootstrap`).
pub fn is_plain_identifier(name: &str) -> bool {
    let bytes = name.as_bytes();
    let Some(first) = bytes.first() else {
        return false;
    };
    bytes.len() <= 63
        && (first.is_ascii_lowercase() || *first == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

/// `spec.bootstrap`: plain identifiers, and none of the names pgrs or PostgreSQL own.
fn check_bootstrap(bootstrap: &super::BootstrapSpec) -> Result<(), InvalidSpec> {
    for (field, value) in [
        ("database", &bootstrap.database),
        ("owner", &bootstrap.owner),
    ] {
        if !is_plain_identifier(value) {
            return Err(InvalidSpec::BootstrapNotIdentifier {
                field,
                value: value.clone(),
            });
        }
    }
    let reserved = |field: &'static str, value: &String, why: &'static str| {
        Err(InvalidSpec::BootstrapReserved {
            field,
            value: value.clone(),
            why,
        })
    };
    if ["postgres", "replicator"].contains(&bootstrap.owner.as_str()) {
        return reserved(
            "owner",
            &bootstrap.owner,
            "the superuser and the replication role belong to pgrs",
        );
    }
    if bootstrap.owner.starts_with("pg_") {
        return reserved(
            "owner",
            &bootstrap.owner,
            "PostgreSQL reserves role names starting with pg_",
        );
    }
    if ["postgres", "template0", "template1"].contains(&bootstrap.database.as_str()) {
        return reserved(
            "database",
            &bootstrap.database,
            "postgres, template0 and template1 exist in every cluster",
        );
    }
    Ok(())
}
