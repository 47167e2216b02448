//! The cluster's certificates: what to keep, what to issue (pure), and the two Secrets that
//! hold them — `<name>-ca` (the CA's certificate and key; only the operator reads it) and
//! `<name>-tls` (`kubernetes.io/tls` with `ca.crt`: the server certificate every instance
//! serves, mounted into the pods).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::Owner;
use super::names;
use crate::tls::{Authority, CertifiedKey, TlsError};

/// Validity of a cluster CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of the server certificate.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// A server certificate with less than this left is issued again.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The PEM texts found in the cluster's Secrets.
#[derive(Debug, Clone, Default)]
pub struct StoredTls {
    /// `<name>-ca`: certificate and key.
    pub ca: Option<(String, String)>,
    /// `<name>-tls`: certificate and key.
    pub server: Option<CertifiedKey>,
}

/// What the operator must write.
#[derive(Debug)]
pub struct TlsPlan {
    pub authority: Authority,
    /// A new CA to store (none was stored, or it could not be read).
    pub new_ca: bool,
    /// A new server certificate to store, and why.
    pub new_server: Option<(CertifiedKey, &'static str)>,
}

/// Keeps what is stored and still good; issues a CA when there is none and a server certificate
/// when there is none, it expires within [`RENEW_BEFORE`], misses one of `dns_names`, or
/// another CA issued it. A stored CA that cannot be read is an error: replacing it would make
/// every certificate it issued (perhaps trusted by clients) worthless without saying so.
pub fn plan(
    cluster: &str,
    stored: &StoredTls,
    dns_names: &[String],
    now: SystemTime,
) -> Result<TlsPlan, TlsError> {
    let (authority, new_ca) = match &stored.ca {
        Some((cert, key)) => (Authority::from_pem(cert, key)?, false),
        None => (
            Authority::generate(&format!("pgrs {cluster} CA"), CA_VALIDITY)?,
            true,
        ),
    };
    let why = match &stored.server {
        None => Some("none was stored"),
        Some(server) => {
            if !crate::tls::issued_by(&server.cert_pem, authority.cert_pem())? {
                Some("another CA issued it")
            } else if crate::tls::needs_renewal(&server.cert_pem, now, RENEW_BEFORE)? {
                Some("it expires within 30 days")
            } else if !crate::tls::covers(&server.cert_pem, dns_names, &[])? {
                Some("it does not name every service")
            } else {
                None
            }
        }
    };
    let new_server = match why {
        Some(why) => Some((
            authority.issue_server(
                &names::headless_service(cluster),
                dns_names,
                &[],
                SERVER_VALIDITY,
            )?,
            why,
        )),
        None => None,
    };
    Ok(TlsPlan {
        authority,
        new_ca,
        new_server,
    })
}

fn entry(key: &str, value: &str) -> (String, ByteString) {
    (key.to_string(), ByteString(value.as_bytes().to_vec()))
}

/// `<name>-ca`.
pub fn ca_secret(owner: &Owner, authority: &Authority) -> Secret {
    Secret {
        metadata: owner.meta(names::ca_secret(&owner.name)),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            entry(names::CA_CRT, authority.cert_pem()),
            entry(names::CA_KEY, &authority.certified().key_pem),
        ])),
        ..Secret::default()
    }
}

/// `<name>-tls`.
pub fn tls_secret(owner: &Owner, server: &CertifiedKey, ca_pem: &str) -> Secret {
    Secret {
        metadata: owner.meta(names::tls_secret(&owner.name)),
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            entry(names::TLS_CRT, &server.cert_pem),
            entry(names::TLS_KEY, &server.key_pem),
            entry(names::CA_CRT, ca_pem),
        ])),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_of(cluster: &str) -> Vec<String> {
        names::tls_dns_names(cluster, "ns")
    }

    #[test]
    fn a_new_cluster_gets_a_ca_and_a_certificate_for_every_service_and_pod() {
        let plan = plan(
            "db",
            &StoredTls::default(),
            &names_of("db"),
            SystemTime::now(),
        )
        .unwrap();
        assert!(plan.new_ca);
        let (server, why) = plan.new_server.unwrap();
        assert_eq!(why, "none was stored");
        let wanted = [
            "db-rw.ns.svc".to_string(),
            "db-instances.ns.svc".to_string(),
            "*.db-instances.ns.svc".to_string(),
        ];
        assert!(crate::tls::covers(&server.cert_pem, &wanted, &[]).unwrap());
        assert!(crate::tls::issued_by(&server.cert_pem, plan.authority.cert_pem()).unwrap());
    }

    #[test]
    fn a_good_certificate_is_kept_and_a_stale_foreign_or_narrow_one_replaced() {
        let first = plan(
            "db",
            &StoredTls::default(),
            &names_of("db"),
            SystemTime::now(),
        )
        .unwrap();
        let ca = (
            first.authority.cert_pem().to_string(),
            first.authority.certified().key_pem.clone(),
        );
        let server = first.new_server.unwrap().0;
        let stored = StoredTls {
            ca: Some(ca.clone()),
            server: Some(server.clone()),
        };
        let now = SystemTime::now();
        let again = plan("db", &stored, &names_of("db"), now).unwrap();
        assert!(!again.new_ca && again.new_server.is_none());
        // 61 days later, 29 are left of 90.
        let later = now + Duration::from_secs(61 * 86_400);
        let renew = plan("db", &stored, &names_of("db"), later).unwrap();
        assert_eq!(renew.new_server.unwrap().1, "it expires within 30 days");
        // Another CA's certificate.
        let other = Authority::generate("other", CA_VALIDITY).unwrap();
        let foreign = StoredTls {
            ca: Some(ca.clone()),
            server: Some(
                other
                    .issue_server("x", &names_of("db"), &[], SERVER_VALIDITY)
                    .unwrap(),
            ),
        };
        let replaced = plan("db", &foreign, &names_of("db"), now).unwrap();
        assert_eq!(replaced.new_server.unwrap().1, "another CA issued it");
        // Names of another namespace.
        let narrow = plan("db", &stored, &names::tls_dns_names("db", "other"), now).unwrap();
        assert_eq!(
            narrow.new_server.unwrap().1,
            "it does not name every service"
        );
    }

    #[test]
    fn an_unreadable_ca_is_an_error_not_a_silent_new_one() {
        let stored = StoredTls {
            ca: Some(("garbage".into(), "garbage".into())),
            server: None,
        };
        assert!(plan("db", &stored, &names_of("db"), SystemTime::now()).is_err());
    }
}
