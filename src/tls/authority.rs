//! The cluster certificate authority and the certificates it issues (pure: no IO besides the
//! system clock and random number generator).
//!
//! Each cluster gets its own self-signed CA; its certificate is what every client pins. It
//! issues server certificates (serverAuth, with the DNS names and IPs clients connect to as
//! SANs) and client certificates (clientAuth, CN = the PostgreSQL role: `cert` authentication
//! maps the CN to the role). Keys are ECDSA P-256, accepted by PostgreSQL (OpenSSL) and rustls.
//! Every `not_before` is backdated by [`BACKDATE`] so a peer whose clock is slightly behind
//! accepts a freshly issued certificate.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};

use super::{Result, TlsError};

/// How far `not_before` lies in the past, for clock skew between issuer and peers.
pub const BACKDATE: Duration = Duration::from_secs(3600);

/// A certificate (PEM, leaf first if a chain) with its private key (PEM, PKCS#8). `Debug` does
/// not print the key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate authority: its certificate and the key that signs what it issues.
pub struct Authority {
    certified: CertifiedKey,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("cert_pem", &self.certified.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA named `common_name`, valid for `validity` from now. It may sign
    /// leaf certificates only (path length 0).
    pub fn generate(common_name: &str, validity: Duration) -> Result<Authority> {
        let what = format!("the CA certificate {common_name:?}");
        let key = generate_key(&what)?;
        let mut params = base_params(common_name, validity, &what)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: what.clone(),
                source: Box::new(source),
            })?;
        let certified = CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Authority {
            certified,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA stored earlier (e.g. in a Secret): its certificate and key, PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority> {
        let what = "the CA certificate";
        let key = KeyPair::from_pem(key_pem).map_err(|source| TlsError::Key {
            what: what.to_string(),
            source: Box::new(source),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| TlsError::Generate {
                what: format!("an issuer from {what}"),
                source: Box::new(source),
            })?;
        Ok(Authority {
            certified: CertifiedKey {
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
            },
            issuer,
        })
    }

    /// The CA certificate and key (PEM), e.g. to store them.
    pub fn certified(&self) -> &CertifiedKey {
        &self.certified
    }

    /// The CA certificate (PEM): what clients pin.
    pub fn cert_pem(&self) -> &str {
        &self.certified.cert_pem
    }

    /// A server certificate for `common_name`, with `dns_names` and `ips` as SANs (what clients
    /// verify the host they connect to against), valid for `validity` from now.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<CertifiedKey> {
        let what = format!("the server certificate {common_name:?}");
        let mut params = base_params(common_name, validity, &what)?;
        for name in dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|source| TlsError::Generate {
                    what: format!("the DNS name {name:?} of {what}"),
                    source: Box::new(source),
                })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, &what)
    }

    /// A client certificate for the PostgreSQL role `user` (CN = `user`), valid for `validity`
    /// from now.
    pub fn issue_client(&self, user: &str, validity: Duration) -> Result<CertifiedKey> {
        let what = format!("the client certificate of {user:?}");
        let mut params = base_params(user, validity, &what)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, &what)
    }

    fn sign(&self, params: CertificateParams, what: &str) -> Result<CertifiedKey> {
        let key = generate_key(what)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| TlsError::Generate {
                what: what.to_string(),
                source: Box::new(source),
            })?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn generate_key(what: &str) -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::Generate {
        what: format!("the key of {what}"),
        source: Box::new(source),
    })
}

/// Parameters common to every certificate: CN, validity window (backdated), random serial,
/// authority key identifier.
fn base_params(common_name: &str, validity: Duration, what: &str) -> Result<CertificateParams> {
    let now = SystemTime::now();
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| TlsError::Validity {
            what: what.to_string(),
        })?;
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, common_name);
    let mut serial: [u8; 16] = rand::random();
    // Positive and exactly 16 bytes once DER-encoded.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn debug_hides_the_key() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let client = ca.issue_client("app", DAY).unwrap();
        let shown = format!("{client:?} {ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(client.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn client_certificate_names_the_role() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let client = ca.issue_client("app_user", DAY).unwrap();
        let der = crate::tls::pem::first_certificate(&client.cert_pem, "test").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "app_user");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn reloaded_authority_issues_verifiable_certificates() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let stored = ca.certified().clone();
        let reloaded = Authority::from_pem(&stored.cert_pem, &stored.key_pem).unwrap();
        let server = reloaded
            .issue_server("db", &["db-0.example".to_string()], &[], DAY)
            .unwrap();
        assert!(crate::tls::issued_by(&server.cert_pem, ca.cert_pem()).unwrap());
    }

    #[test]
    fn bad_pem_is_reported() {
        let error = Authority::from_pem("nope", "nope").unwrap_err();
        assert!(error.to_string().contains("CA certificate"), "{error}");
    }
}
