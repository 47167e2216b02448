//! rustls configurations pinned to the cluster CA, and the clients built on them.
//!
//! Every configuration uses the ring crypto provider, passed explicitly ([`super::provider`]),
//! so nothing depends on a process-wide default provider. Clients trust exactly the cluster CA
//! (no system roots) and verify the server name against the certificate's SANs, like libpq's
//! `sslmode=verify-full`.

use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::{CertResolver, CertifiedKey, Result, TlsError};

fn rustls_error(what: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |source| TlsError::Rustls {
        what: what.to_string(),
        source: Box::new(source),
    }
}

/// A client configuration trusting only the CA certificate(s) in `ca_pem`, presenting `client`
/// (certificate and key, PEM) when the server asks for one.
pub fn client_config(ca_pem: &str, client: Option<&CertifiedKey>) -> Result<Arc<ClientConfig>> {
    let what = "a client pinned to the cluster CA";
    let mut roots = RootCertStore::empty();
    for cert in super::pem::certificates(ca_pem, "the cluster CA certificate")? {
        roots
            .add(cert)
            .map_err(rustls_error("the cluster CA certificate"))?;
    }
    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error(what))?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let chain = super::pem::certificates(&client.cert_pem, "the client certificate")?;
            let key = super::pem::private_key(&client.key_pem, "the client certificate's key")?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(rustls_error("the client certificate"))?
        }
    };
    Ok(Arc::new(config))
}

/// A server configuration presenting `resolver`'s current certificate, without client
/// authentication, offering HTTP/2 and HTTP/1.1 by ALPN (it is meant for [`super::serve_https`]).
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error("the HTTPS server"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The tokio-postgres TLS connector for `config`. The host name it verifies is the connection's
/// `host` (with `hostaddr` giving the address to dial), and it supports SCRAM channel binding
/// (`tls-server-end-point`, so `channel_binding=require` works) for RSA and ECDSA certificates.
pub fn postgres_connector(config: Arc<ClientConfig>) -> tokio_postgres_rustls::MakeRustlsConnect {
    tokio_postgres_rustls::MakeRustlsConnect::new(Arc::unwrap_or_clone(config))
}

/// An HTTPS client trusting only the CA certificate(s) in `ca_pem`, ignoring proxy settings,
/// with `timeout` for each whole request.
pub fn http_client(ca_pem: &str, timeout: Duration) -> Result<reqwest::Client> {
    http_client_builder(ca_pem, timeout)?
        .build()
        .map_err(|source| TlsError::HttpClient { source })
}

/// The builder of [`http_client`], to add settings first (e.g. `resolve` a host name the
/// certificate carries to the address to dial).
pub fn http_client_builder(ca_pem: &str, timeout: Duration) -> Result<reqwest::ClientBuilder> {
    let config = client_config(ca_pem, None)?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(config))
        .no_proxy()
        .timeout(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Authority;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn configs_build_with_and_without_client_certificate() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let client = ca.issue_client("app", DAY).unwrap();
        let server = ca
            .issue_server("db", &["db".to_string()], &[], DAY)
            .unwrap();
        assert!(
            !client_config(ca.cert_pem(), None)
                .unwrap()
                .client_auth_cert_resolver
                .has_certs()
        );
        let with_cert = client_config(ca.cert_pem(), Some(&client)).unwrap();
        assert!(with_cert.client_auth_cert_resolver.has_certs());
        let _connector = postgres_connector(with_cert);
        let resolver = Arc::new(CertResolver::new(&server).unwrap());
        let config = server_config(resolver).unwrap();
        assert_eq!(config.alpn_protocols.len(), 2);
        http_client(ca.cert_pem(), Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn a_mismatched_client_key_is_refused() {
        let ca = Authority::generate("test CA", DAY).unwrap();
        let a = ca.issue_client("a", DAY).unwrap();
        let b = ca.issue_client("b", DAY).unwrap();
        let mixed = CertifiedKey {
            cert_pem: a.cert_pem,
            key_pem: b.key_pem,
        };
        let error = client_config(ca.cert_pem(), Some(&mixed)).unwrap_err();
        assert!(error.to_string().contains("client certificate"), "{error}");
        let error = client_config("garbage", None).unwrap_err();
        assert!(error.to_string().contains("cluster CA"), "{error}");
    }
}
