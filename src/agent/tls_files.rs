//! The TLS files an agent serves: copies of `--tls-dir` (a mounted Secret, or local mode's
//! `tls/`) in the run directory. postgres refuses a key file that others can read unless root
//! owns it, and a Secret volume is group-readable (`fsGroup`), so the agent writes its own
//! copies, mode 0600, owned by the postgres user. The source is read again every
//! [`TLS_POLL`]: a renewed certificate is copied, postgres re-reads it on SIGHUP, and the HTTP
//! API serves it to new connections — no restart, no dropped connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::config::TlsSettings;
use crate::agent::instance::{AgentConfig, InstanceError, write_private_file};

/// How often `--tls-dir` is read for a renewed certificate.
pub const TLS_POLL: Duration = Duration::from_secs(5);

/// The files of `--tls-dir`, named as in a `kubernetes.io/tls` Secret with its CA.
pub const FILES: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    #[error("failed to read TLS file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS file {path} holds no PEM block ({expected})")]
    NotPem { path: PathBuf, expected: String },
    #[error("failed to use the TLS files of {dir}: {source}")]
    Tls {
        dir: PathBuf,
        #[source]
        source: crate::tls::TlsError,
    },
}

/// The agent's HTTPS: what it serves and how it reaches the other agents.
pub struct Https {
    /// The certificate the API serves; replaced when the files change.
    pub resolver: std::sync::Arc<crate::tls::CertResolver>,
    pub server_config: std::sync::Arc<rustls::ServerConfig>,
    /// Client for the other agents (failsafe): the cluster CA pinned, verified as the
    /// cluster's server name.
    pub peers: reqwest::Client,
}

impl Https {
    /// Loads `--tls-dir` (checked PEM) for the HTTP API.
    pub fn load(source: &Path, server_name: &str) -> Result<Https, TlsFilesError> {
        let files = read_source(source)?;
        let file = |name: &str| {
            files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, text)| text.clone())
                .unwrap_or_default()
        };
        let tls = |error| TlsFilesError::Tls {
            dir: source.to_path_buf(),
            source: error,
        };
        let server = crate::tls::CertifiedKey {
            cert_pem: file("tls.crt"),
            key_pem: file("tls.key"),
        };
        let resolver = std::sync::Arc::new(crate::tls::CertResolver::new(&server).map_err(tls)?);
        let server_config = crate::tls::server_config(resolver.clone()).map_err(tls)?;
        let peers = crate::tls::agent_http_client(&file("ca.crt"), server_name).map_err(tls)?;
        Ok(Https {
            resolver,
            server_config,
            peers,
        })
    }
}

/// Serves the certificate of the copies in `dir` (after [`install`] changed them).
pub fn reload_resolver(
    resolver: &crate::tls::CertResolver,
    dir: &Path,
) -> Result<(), TlsFilesError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| TlsFilesError::Read { path, source })
    };
    let server = crate::tls::CertifiedKey {
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
    };
    resolver.set(&server).map_err(|source| TlsFilesError::Tls {
        dir: dir.to_path_buf(),
        source,
    })
}

/// The settings of an instance whose copies live in `run_dir/tls`.
pub fn settings(run_dir: &Path, server_name: String) -> TlsSettings {
    let dir = run_dir.join("tls");
    TlsSettings {
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        ca_file: dir.join("ca.crt"),
        server_name,
    }
}

/// The source's contents, checked to be PEM (a half-written or empty file is refused, and the
/// previous copies stay in use).
pub fn read_source(source: &Path) -> Result<Vec<(&'static str, String)>, TlsFilesError> {
    FILES
        .iter()
        .map(|name| {
            let path = source.join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| TlsFilesError::Read {
                path: path.clone(),
                source,
            })?;
            let expected = if *name == "tls.key" {
                "a private key"
            } else {
                "a certificate"
            };
            let pem = text.contains("-----BEGIN ") && text.contains("-----END ");
            if !pem {
                return Err(TlsFilesError::NotPem {
                    path,
                    expected: expected.into(),
                });
            }
            Ok((*name, text))
        })
        .collect()
}

/// Copies `source` into the run directory when it differs from the copies there. Returns
/// whether anything changed.
pub fn install(config: &AgentConfig, source: &Path) -> Result<bool, InstanceError> {
    let files = read_source(source)?;
    let dir = config.run_dir.join("tls");
    crate::agent::instance::create_private_dir(&config.identity, &dir)?;
    let mut changed = false;
    for (name, text) in files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
            continue;
        }
        let staged = dir.join(format!("{name}.new"));
        write_private_file(&config.identity, &staged, &text)?;
        std::fs::rename(&staged, &path).map_err(|source| InstanceError::Io {
            what: "rename the TLS file to",
            path: path.clone(),
            source,
        })?;
        changed = true;
    }
    Ok(changed)
}

/// Reads `source` every [`TLS_POLL`]; on a change installs the copies, signals postgres and
/// calls `on_change` (the HTTP API's certificate). Errors are logged and retried: the previous
/// certificate stays in use.
pub async fn watch(
    config: std::sync::Arc<AgentConfig>,
    source: PathBuf,
    handle: crate::agent::supervisor::SupervisorHandle,
    on_change: impl Fn() + Send + 'static,
) {
    loop {
        tokio::time::sleep(TLS_POLL).await;
        match install(&config, &source) {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(source = %source.display(), "TLS files changed; reloading postgres and the HTTP certificate");
                if let Err(error) = handle.reload_files() {
                    tracing::warn!(%error, "failed to signal postgres to reload its TLS files");
                }
                on_change();
            }
            Err(error) => {
                tracing::warn!(%error, source = %source.display(), "cannot install the TLS files; keeping the previous ones");
            }
        }
    }
}
