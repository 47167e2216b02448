//! `spec.tls`: TLS of every connection to and between a cluster's instances.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// TLS of client connections, replication, the operator's SQL sessions and the agents' API.
/// On by default: the operator creates a CA for the cluster (Secret `<name>-ca`, 10 years) and
/// one server certificate every instance serves (Secret `<name>-tls`, 90 days, renewed 30 days
/// before it expires, without a restart).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.enabled || !has(self.serverSecret)",
        "message": "spec.tls.serverSecret needs spec.tls.enabled: true",
        "fieldPath": ".serverSecret"
    }
]))]
pub struct TlsSpec {
    /// `false` runs every connection in plain TCP (not recommended: the agents' bearer token
    /// and SCRAM handshakes then cross the pod network unencrypted).
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,

    /// A Secret of type `kubernetes.io/tls` with `tls.crt`, `tls.key` and `ca.crt` to serve
    /// instead of the operator's own certificate (for example one cert-manager keeps). Its
    /// certificate must name `<name>-rw`, `<name>-ro`, `<name>-r`, `<name>-instances` and
    /// `*.<name>-instances` in the cluster's namespace (`.svc`); the operator checks and refuses it with a Warning
    /// Event `TlsSecretInvalid` otherwise. Renewal is then the Secret owner's business: the
    /// instances pick up a changed Secret without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub server_secret: Option<String>,
}

impl Default for TlsSpec {
    fn default() -> Self {
        TlsSpec {
            enabled: true,
            server_secret: None,
        }
    }
}

fn enabled_by_default() -> bool {
    true
}
