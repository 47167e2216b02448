//! Questions about a stored certificate (pure), so an operator can decide whether a Secret's
//! certificate can stay or must be re-issued: it expires soon ([`needs_renewal`]), it lacks a
//! name clients now use ([`covers`]), or the cluster CA changed ([`issued_by`]).
//!
//! Each function reads the first certificate of its PEM argument (the leaf of a chain).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::{Result, TlsError};

/// Parses the first certificate of `pem` and hands it to `f`.
fn with_certificate<T>(
    pem: &str,
    what: &str,
    f: impl FnOnce(&X509Certificate<'_>) -> Result<T>,
) -> Result<T> {
    let der = super::pem::first_certificate(pem, what)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|error| TlsError::Certificate {
            what: what.to_string(),
            source: Box::new(error.into()),
        })?;
    f(&cert)
}

/// The end of the certificate's validity (`not_after`).
pub fn expires_at(cert_pem: &str) -> Result<SystemTime> {
    with_certificate(cert_pem, "the certificate to inspect", |cert| {
        let timestamp = cert.validity().not_after.timestamp();
        let since_epoch = Duration::from_secs(timestamp.unsigned_abs());
        let at = if timestamp >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(since_epoch)
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(since_epoch)
        };
        at.ok_or_else(|| TlsError::Validity {
            what: "the certificate to inspect".to_string(),
        })
    })
}

/// Whether the certificate expires within `renew_before` of `now` (or already has).
pub fn needs_renewal(cert_pem: &str, now: SystemTime, renew_before: Duration) -> Result<bool> {
    let expires = expires_at(cert_pem)?;
    Ok(match now.checked_add(renew_before) {
        Some(deadline) => expires <= deadline,
        None => true,
    })
}

/// Whether every wanted DNS name and IP is a SAN of the certificate (DNS names compare
/// case-insensitively; a wildcard SAN is not expanded, as this CA never issues one).
pub fn covers(cert_pem: &str, dns_names: &[String], ips: &[IpAddr]) -> Result<bool> {
    let what = "the certificate to inspect";
    with_certificate(cert_pem, what, |cert| {
        let san = cert
            .subject_alternative_name()
            .map_err(|source| TlsError::Certificate {
                what: what.to_string(),
                source: Box::new(source),
            })?;
        let names = san.map(|ext| &ext.value.general_names[..]).unwrap_or(&[]);
        let has_dns = |wanted: &String| {
            names.iter().any(|name| {
                matches!(name, GeneralName::DNSName(dns) if dns.eq_ignore_ascii_case(wanted))
            })
        };
        let has_ip = |wanted: &IpAddr| {
            names.iter().any(|name| match name {
                GeneralName::IPAddress(bytes) => ip_from_bytes(bytes) == Some(*wanted),
                _ => false,
            })
        };
        Ok(dns_names.iter().all(has_dns) && ips.iter().all(has_ip))
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

/// Whether the CA certificate `ca_pem` issued the certificate: the issuer name is the CA's
/// subject and the signature verifies with the CA's public key. (Validity dates are not
/// checked here; see [`needs_renewal`].)
pub fn issued_by(cert_pem: &str, ca_pem: &str) -> Result<bool> {
    with_certificate(ca_pem, "the CA certificate", |ca| {
        with_certificate(cert_pem, "the certificate to inspect", |cert| {
            Ok(cert.issuer() == ca.subject()
                && cert.verify_signature(Some(ca.public_key())).is_ok())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Authority;

    const DAY: Duration = Duration::from_secs(86_400);

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn expiry_and_renewal() {
        let ca = Authority::generate("test CA", 10 * DAY).unwrap();
        let server = ca
            .issue_server("db", &names(&["db-0.example"]), &[], 10 * DAY)
            .unwrap();
        let now = SystemTime::now();
        let expires = expires_at(&server.cert_pem).unwrap();
        let left = expires.duration_since(now).unwrap();
        assert!(left > 9 * DAY && left <= 10 * DAY, "{left:?}");
        assert!(!needs_renewal(&server.cert_pem, now, DAY).unwrap());
        assert!(needs_renewal(&server.cert_pem, now, 11 * DAY).unwrap());
        assert!(needs_renewal(&server.cert_pem, now + 10 * DAY, Duration::ZERO).unwrap());
    }

    #[test]
    fn backdated_for_clock_skew() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let der = crate::tls::pem::first_certificate(ca.cert_pem(), "test").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let not_before = cert.validity().not_before.timestamp();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((now - not_before - 3600).abs() < 60, "{now} {not_before}");
    }

    #[test]
    fn covers_every_wanted_name() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let ip6: IpAddr = "fd00::7".parse().unwrap();
        let server = ca
            .issue_server("db", &names(&["db-0.example", "db"]), &[ip, ip6], DAY)
            .unwrap();
        let pem = &server.cert_pem;
        assert!(covers(pem, &names(&["db-0.example", "db"]), &[ip, ip6]).unwrap());
        assert!(covers(pem, &names(&["DB-0.Example"]), &[]).unwrap());
        assert!(covers(pem, &[], &[]).unwrap());
        assert!(!covers(pem, &names(&["db-1.example"]), &[]).unwrap());
        assert!(!covers(pem, &names(&["db"]), &["10.0.0.8".parse().unwrap()]).unwrap());
        let client = ca.issue_client("app", DAY).unwrap();
        assert!(!covers(&client.cert_pem, &names(&["app"]), &[]).unwrap());
        // A wildcard SAN is compared as written, not expanded.
        let wildcard = ca
            .issue_server("db", &names(&["*.db-instances.ns.svc"]), &[], DAY)
            .unwrap();
        assert!(covers(&wildcard.cert_pem, &names(&["*.db-instances.ns.svc"]), &[]).unwrap());
        assert!(
            !covers(
                &wildcard.cert_pem,
                &names(&["db-0.db-instances.ns.svc"]),
                &[]
            )
            .unwrap()
        );
    }

    #[test]
    fn issued_by_checks_the_signature() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let other = Authority::generate("test CA", DAY).unwrap();
        let server = ca.issue_server("db", &names(&["db"]), &[], DAY).unwrap();
        let client = ca.issue_client("app", DAY).unwrap();
        assert!(issued_by(&server.cert_pem, ca.cert_pem()).unwrap());
        assert!(issued_by(&client.cert_pem, ca.cert_pem()).unwrap());
        assert!(issued_by(ca.cert_pem(), ca.cert_pem()).unwrap());
        // Same name, different key: not issued by it.
        assert!(!issued_by(&server.cert_pem, other.cert_pem()).unwrap());
        assert!(!issued_by(other.cert_pem(), ca.cert_pem()).unwrap());
    }

    #[test]
    fn garbage_is_an_error() {
        let error = expires_at("not a certificate").unwrap_err();
        assert!(
            error.to_string().contains("certificate to inspect"),
            "{error}"
        );
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error = covers(broken, &[], &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "failed to parse the certificate in the certificate to inspect"
        );
    }
}
