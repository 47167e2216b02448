//! The certificate a TLS server presents, replaceable while the server runs.
//!
//! A [`CertResolver`] is the server configuration's certificate source: every handshake reads
//! the current certificate, so after [`CertResolver::set`] (e.g. the operator renewed the
//! Secret) new connections get the new certificate while established ones are untouched, with
//! no listener restart.

use std::sync::{Arc, PoisonError, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};

use super::{CertifiedKey, Result, TlsError};

/// Serves the current certificate to every handshake; see the module documentation.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl CertResolver {
    /// A resolver serving `server` (its certificate chain and key, PEM).
    pub fn new(server: &CertifiedKey) -> Result<CertResolver> {
        Ok(CertResolver {
            current: RwLock::new(load(server)?),
        })
    }

    /// Serves `server` to the handshakes from now on. On error the previous certificate stays.
    pub fn set(&self, server: &CertifiedKey) -> Result<()> {
        let loaded = load(server)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded;
        Ok(())
    }

    /// The certificate currently served.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// The chain and key of `server` as rustls loads them with the ring provider, checked to match.
fn load(server: &CertifiedKey) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let what = "the server certificate";
    let chain = super::pem::certificates(&server.cert_pem, what)?;
    let key = super::pem::private_key(&server.key_pem, "the server certificate's key")?;
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, key, &super::provider()).map_err(|source| {
            TlsError::Rustls {
                what: what.to_string(),
                source: Box::new(source),
            }
        })?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::Authority;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn set_replaces_and_rejects_mismatched_keys() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let first = ca.issue_server("a", &["a".to_string()], &[], DAY).unwrap();
        let second = ca.issue_server("b", &["b".to_string()], &[], DAY).unwrap();
        let resolver = CertResolver::new(&first).unwrap();
        let served = |resolver: &CertResolver| resolver.current().cert[0].to_vec();
        let first_der = crate::tls::pem::first_certificate(&first.cert_pem, "t").unwrap();
        assert_eq!(served(&resolver), first_der.to_vec());

        resolver.set(&second).unwrap();
        let second_der = crate::tls::pem::first_certificate(&second.cert_pem, "t").unwrap();
        assert_eq!(served(&resolver), second_der.to_vec());

        let mismatched = CertifiedKey {
            cert_pem: first.cert_pem.clone(),
            key_pem: second.key_pem.clone(),
        };
        let error = resolver.set(&mismatched).unwrap_err();
        assert!(error.to_string().contains("server certificate"), "{error}");
        assert_eq!(served(&resolver), second_der.to_vec());
    }
}
