//! Per-cluster TLS: a private certificate authority per cluster, the certificates it issues, and
//! the rustls plumbing that uses them.
//!
//! Pieces:
//! - [`authority`] (pure): the cluster CA ([`Authority`]) and the server/client certificates it
//!   issues ([`CertifiedKey`], PEM).
//! - [`inspect`] (pure): questions an operator asks of a stored certificate before reusing it:
//!   when does it expire, must it be renewed, does it cover these names, did this CA issue it.
//! - [`rustls_config`]: rustls client and server configurations pinned to the cluster CA (ring
//!   crypto provider, chosen explicitly, never the process default), the tokio-postgres connector
//!   and a pinned HTTPS client (reqwest).
//! - [`resolver`]: [`CertResolver`], the server certificate a running listener serves, replaceable
//!   at run time so a renewed certificate reaches new connections without a restart.
//! - [`serve`]: [`serve_https`], an axum router behind rustls.
//!
//! Trust model: every client trusts exactly its cluster's CA (no system roots) and checks the
//! server name against the certificate's SANs (verify-full semantics).

pub mod authority;
pub mod inspect;
mod pem;
pub mod pinned;
#[cfg(test)]
mod postgres_tests;
pub mod resolver;
pub mod rustls_config;
pub mod serve;

pub use authority::{Authority, CertifiedKey};
pub use inspect::{covers, expires_at, issued_by, needs_renewal};
pub use pinned::{agent_http_client, client_config_for_name, encrypt_only_connector};
pub use resolver::CertResolver;
pub use rustls_config::{
    client_config, http_client, http_client_builder, postgres_connector, server_config,
};
pub use serve::serve_https;

/// Everything that can fail while issuing, reading or using certificates. `what` names the
/// object concerned (e.g. "the cluster CA certificate") so the message says what failed.
/// Sources are boxed to keep this error small: other errors embed it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to generate {what}")]
    Generate {
        what: String,
        #[source]
        source: Box<rcgen::Error>,
    },
    #[error("failed to read the PEM in {what}")]
    Pem {
        what: String,
        #[source]
        source: Box<rustls::pki_types::pem::Error>,
    },
    #[error("failed to parse the certificate in {what}")]
    Certificate {
        what: String,
        #[source]
        source: Box<x509_parser::error::X509Error>,
    },
    #[error("failed to load the key of {what}")]
    Key {
        what: String,
        #[source]
        source: Box<rcgen::Error>,
    },
    #[error("the validity of {what} ends beyond the representable time")]
    Validity { what: String },
    #[error("failed to build the TLS configuration for {what}")]
    Rustls {
        what: String,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("failed to build the HTTPS client")]
    HttpClient {
        #[source]
        source: reqwest::Error,
    },
}

pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// The crypto provider of every TLS configuration built here: ring, explicitly, so nothing
/// depends on which provider the process happened to install as its default.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_error_stays_small() {
        // It is embedded in other errors; clippy's `result_large_err` limit is 128 bytes.
        assert!(std::mem::size_of::<super::TlsError>() <= 40);
    }
}
