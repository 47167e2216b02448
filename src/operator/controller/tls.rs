//! The cluster's TLS in the reconcile: the CA and server certificate kept in their Secrets
//! (issued, renewed — [`crate::operator::build::tls`]) or the user's `spec.tls.serverSecret`
//! checked, and the client the operator reaches the instances with: an HTTPS client for the
//! agents pinned to the cluster CA, verifying the cluster's server name (the operator has no
//! SQL session to the instances).
//!
//! The Secrets are read again every [`RECHECK`] (renewal is a matter of days), at once when
//! `spec.tls` changes, and never in between: a reconcile costs no extra API calls.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;

use crate::api::TlsSpec;
use crate::operator::build::tls::{StoredTls, ca_secret, plan, tls_secret};
use crate::operator::build::{Owner, names};
use crate::protocol::client::AgentClient;
use crate::tls::CertifiedKey;

use super::ReconcileError;
use super::pipeline::Reconciler;

/// How often the Secrets are read again for a renewal or a changed user Secret.
pub const RECHECK: Duration = Duration::from_secs(300);

/// How the operator reaches a TLS cluster's instances.
#[derive(Debug)]
pub struct ClusterTls {
    /// Pinned to the cluster CA, verifying `<name>-instances.<namespace>.svc` (what every
    /// instance's certificate is checked for); kept between rounds (its connections too).
    pub http: reqwest::Client,
}

/// The TLS a cluster's runtime keeps between reconciles.
#[derive(Debug, Default)]
pub struct TlsMemory {
    checked: Option<(Instant, TlsSpec, Option<Arc<ClusterTls>>)>,
}

impl TlsMemory {
    /// The current clients, `None` for a plain cluster.
    pub fn current(&self) -> Option<Arc<ClusterTls>> {
        self.checked.as_ref().and_then(|(_, _, tls)| tls.clone())
    }
}

/// An agent client over the cluster's pinned HTTPS client (plain HTTP without TLS).
pub fn agent_client(tls: Option<&ClusterTls>, url: String, token: String) -> Option<AgentClient> {
    match tls {
        Some(tls) => Some(AgentClient::with_http(url, Some(token), tls.http.clone())),
        None => AgentClient::new(url, Some(token)).ok(),
    }
}

impl Reconciler<'_> {
    /// Ensures the cluster's certificates and returns the clients to reach it.
    pub(super) async fn tls(&mut self) -> Result<Option<Arc<ClusterTls>>, ReconcileError> {
        let spec = self.cluster.spec.tls.clone();
        if let Some((at, checked_spec, tls)) = &self.runtime.tls.checked
            && *checked_spec == spec
            && at.elapsed() < RECHECK
        {
            return Ok(tls.clone());
        }
        let tls = if spec.enabled {
            let (name, namespace) = (self.name(), self.namespace());
            let server_name = names::tls_server_name(&name, &namespace);
            let ca_pem = match &spec.server_secret {
                Some(secret) => self.user_certificate(secret).await?,
                None => self.own_certificates().await?,
            };
            let http = crate::tls::agent_http_client(&ca_pem, &server_name).map_err(|source| {
                ReconcileError::Tls {
                    what: "the agents' HTTPS client".into(),
                    source,
                }
            })?;
            Some(Arc::new(ClusterTls { http }))
        } else {
            None
        };
        self.runtime.tls.checked = Some((Instant::now(), spec, tls.clone()));
        Ok(tls)
    }

    /// `<name>-ca` and `<name>-tls`: created on the first reconcile, the server certificate
    /// issued again when it must be. Returns the CA certificate.
    async fn own_certificates(&self) -> Result<String, ReconcileError> {
        let (name, namespace) = (self.name(), self.namespace());
        let ca = self.read_secret(&names::ca_secret(&name)).await?;
        let server = self.read_secret(&names::tls_secret(&name)).await?;
        let text = |data: &std::collections::BTreeMap<String, k8s_openapi::ByteString>,
                    key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let stored = StoredTls {
            ca: ca
                .as_ref()
                .and_then(|data| Some((text(data, names::CA_CRT)?, text(data, names::CA_KEY)?))),
            server: server.as_ref().and_then(|data| {
                Some(CertifiedKey {
                    cert_pem: text(data, names::TLS_CRT)?,
                    key_pem: text(data, names::TLS_KEY)?,
                })
            }),
        };
        let dns_names = names::tls_dns_names(&name, &namespace);
        let plan = plan(&name, &stored, &dns_names, SystemTime::now()).map_err(|source| {
            ReconcileError::Tls {
                what: format!("the certificates of Secret {}", names::ca_secret(&name)),
                source,
            }
        })?;
        let owner = Owner::of(self.cluster)?;
        if plan.new_ca {
            self.write_secret(ca_secret(&owner, &plan.authority))
                .await?;
        }
        let ca_pem = plan.authority.cert_pem().to_string();
        if let Some((server, why)) = &plan.new_server {
            self.write_secret(tls_secret(&owner, server, &ca_pem))
                .await?;
            self.context
                .publish(
                    self.cluster,
                    EventType::Normal,
                    "CertificateIssued",
                    format!(
                        "issued the server certificate in Secret {} ({why}); the instances serve it without a restart",
                        names::tls_secret(&name)
                    ),
                )
                .await;
        }
        Ok(ca_pem)
    }

    /// The user's Secret (`spec.tls.serverSecret`), checked: its certificate must chain to its
    /// `ca.crt` and name the cluster's services. Returns its CA certificate.
    async fn user_certificate(&self, secret: &str) -> Result<String, ReconcileError> {
        let invalid = |why: String| ReconcileError::TlsSecretInvalid {
            name: secret.to_string(),
            why,
        };
        let data = self
            .read_secret(secret)
            .await?
            .ok_or_else(|| invalid("it does not exist".into()))?;
        let key = |key: &'static str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .ok_or_else(|| invalid(format!("key {key} is missing or not UTF-8")))
        };
        let (ca_pem, cert_pem) = (key(names::CA_CRT)?, key(names::TLS_CRT)?);
        key(names::TLS_KEY)?;
        let dns_names = names::tls_dns_names(&self.name(), &self.namespace());
        let checked = crate::tls::issued_by(&cert_pem, &ca_pem)
            .and_then(|issued| Ok((issued, crate::tls::covers(&cert_pem, &dns_names, &[])?)));
        match checked {
            Ok((true, true)) => Ok(ca_pem),
            Ok((false, _)) => Err(invalid(format!(
                "its {} was not issued by its {}",
                names::TLS_CRT,
                names::CA_CRT
            ))),
            Ok((true, false)) => Err(invalid(format!(
                "its certificate must name every one of: {}",
                dns_names.join(", ")
            ))),
            Err(error) => Err(invalid(error.to_string())),
        }
    }

    /// Server-side apply of one of the cluster's Secrets.
    async fn write_secret(&self, secret: Secret) -> Result<(), ReconcileError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.context.client.clone(), &self.namespace());
        let patch = PatchParams::apply(names::MANAGER).force();
        super::pipeline::bounded(
            || format!("applying the Secret {name}"),
            api.patch(&name, &patch, &Patch::Apply(&secret)),
        )
        .await?
        .map(|_| ())
        .map_err(|source| ReconcileError::Apply {
            kind: "Secret",
            name,
            source,
        })
    }
}
