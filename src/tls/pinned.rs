//! Clients that dial an instance by IP yet verify it by name.
//!
//! Every instance of a cluster serves the same certificate, which names the cluster's services
//! and `<name>-headless.<namespace>.svc` but no pod IP (pod IPs change on every restart). The
//! operator and the agents reach each other by pod IP; these clients check the chain against
//! the cluster CA and the certificate against one expected name, whatever address was dialed:
//! `verify-full` semantics for a name the caller chose, not the one in the URL.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{Result, TlsError};

fn rustls_error(what: &str, source: rustls::Error) -> TlsError {
    TlsError::Rustls {
        what: what.to_string(),
        source: Box::new(source),
    }
}

/// Verifies the chain with webpki against the pinned roots and the certificate against
/// `expected` instead of the dialed host.
#[derive(Debug)]
struct PinnedName {
    inner: Arc<WebPkiServerVerifier>,
    expected: ServerName<'static>,
}

impl ServerCertVerifier for PinnedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialed: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.expected,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client configuration trusting only `ca_pem` and accepting only a certificate for
/// `expected`, whichever address the connection dialed.
pub fn client_config_for_name(ca_pem: &str, expected: &str) -> Result<Arc<ClientConfig>> {
    let what = format!("a client verifying {expected:?} against the cluster CA");
    let mut roots = RootCertStore::empty();
    for cert in super::pem::certificates(ca_pem, "the cluster CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| rustls_error("the cluster CA certificate", e))?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::provider())
        .build()
        .map_err(|e| rustls_error(&what, rustls::Error::General(e.to_string())))?;
    let expected = ServerName::try_from(expected.to_string()).map_err(|e| {
        rustls_error(
            &what,
            rustls::Error::General(format!("not a server name: {e}")),
        )
    })?;
    let config = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error(&what, e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedName { inner, expected }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// libpq's `sslmode=require`: encrypted, the server's certificate not verified. For tools
/// and tests that reach an instance without knowing its cluster; never for the operator's or
/// the agents' own connections (they verify, above).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A tokio-postgres connector with `sslmode=require` semantics (see [`EncryptOnly`]).
pub fn encrypt_only_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let provider = super::provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error("an encrypt-only client", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// An HTTPS client for the agents' API: the cluster CA pinned, every agent verified as
/// `expected`, a 2 s connect timeout (request timeouts are per call), no proxy.
pub fn agent_http_client(ca_pem: &str, expected: &str) -> Result<reqwest::Client> {
    let config = client_config_for_name(ca_pem, expected)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(config))
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|source| TlsError::HttpClient { source })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::tls::{Authority, CertResolver, serve_https, server_config};

    const DAY: Duration = Duration::from_secs(86_400);

    async fn serve(server: &crate::tls::CertifiedKey) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let config = server_config(Arc::new(CertResolver::new(server).unwrap())).unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve_https(listener, config, app, std::future::pending()));
        address
    }

    #[tokio::test]
    async fn an_agent_dialed_by_ip_is_verified_by_the_cluster_name() {
        let ca = Authority::generate("ca", DAY).unwrap();
        let server = ca
            .issue_server("db", &["db-headless.ns.svc".into()], &[], DAY)
            .unwrap();
        let address = serve(&server).await;
        let url = format!("https://{address}/");
        let good = agent_http_client(ca.cert_pem(), "db-headless.ns.svc").unwrap();
        assert_eq!(
            good.get(&url).send().await.unwrap().text().await.unwrap(),
            "ok"
        );
        // Another expected name (another cluster's), or another CA: refused.
        let other_name = agent_http_client(ca.cert_pem(), "other-headless.ns.svc").unwrap();
        assert!(other_name.get(&url).send().await.is_err());
        let other_ca = Authority::generate("other", DAY).unwrap();
        let foreign = agent_http_client(other_ca.cert_pem(), "db-headless.ns.svc").unwrap();
        assert!(foreign.get(&url).send().await.is_err());
    }
}
