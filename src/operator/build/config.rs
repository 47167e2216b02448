//! The Secret (credentials, passed in by the caller) and the ConfigMap of PostgreSQL parameters.
//! Parameters live in a mounted file, not in the pod template: changing them must not roll the
//! StatefulSet (the operator reloads, or restarts replicas first and switches over before
//! restarting the primary).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};

use super::names;
use super::{ClusterSecrets, Owner};
use crate::api::PgReplicaSetSpec;

pub fn secret(owner: &Owner, secrets: &ClusterSecrets) -> Secret {
    let entry = |key: &str, value: &str| (key.to_string(), ByteString(value.as_bytes().to_vec()));
    Secret {
        metadata: owner.meta(names::secret(&owner.name)),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            entry(
                names::SECRET_SUPERUSER_PASSWORD,
                &secrets.superuser_password,
            ),
            entry(
                names::SECRET_REPLICATION_PASSWORD,
                &secrets.replication_password,
            ),
            entry(names::SECRET_AGENT_TOKEN, &secrets.agent_token),
        ])),
        ..Secret::default()
    }
}

pub fn parameters_config_map(owner: &Owner, spec: &PgReplicaSetSpec) -> ConfigMap {
    ConfigMap {
        metadata: owner.meta(names::config_map(&owner.name)),
        data: Some(BTreeMap::from([(
            names::CONFIG_PARAMETERS.to_string(),
            render_parameters(&spec.parameters),
        )])),
        ..ConfigMap::default()
    }
}

/// The control loop's state as the operator persists it.
pub fn control_state_config_map(owner: &Owner, state_json: &str) -> ConfigMap {
    ConfigMap {
        metadata: owner.meta(names::control_state(&owner.name)),
        data: Some(BTreeMap::from([(
            names::CONTROL_STATE_KEY.to_string(),
            state_json.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// `parameters` in postgresql.conf syntax, one `name = 'value'` per line, sorted by name.
pub fn render_parameters(parameters: &BTreeMap<String, String>) -> String {
    let mut text = String::from("# Managed by pgrs from spec.parameters of the PgReplicaSet.\n");
    for (name, value) in parameters {
        let quoted = value.replace('\\', "\\\\").replace('\'', "''");
        text.push_str(&format!("{name} = '{quoted}'\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_quoted_for_postgresql_conf() {
        let parameters = BTreeMap::from([
            ("log_line_prefix".to_string(), "it's %m \\ ".to_string()),
            ("work_mem".to_string(), "4MB".to_string()),
        ]);
        let rendered = render_parameters(&parameters);
        assert_eq!(
            rendered,
            "# Managed by pgrs from spec.parameters of the PgReplicaSet.\n\
             log_line_prefix = 'it''s %m \\\\ '\n\
             work_mem = '4MB'\n"
        );
    }
}
