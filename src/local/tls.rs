//! Local mode's certificates, under `<dir>/tls`: a CA of the cluster (`ca.crt`, `ca.key`) and
//! one server certificate every node serves (`tls.crt`, `tls.key`) for `localhost`,
//! `127.0.0.1` and `::1`. Made by the first `pgrs local up`; a later `up` issues a new server
//! certificate when fewer than [`RENEW_BEFORE`] remain (the agents pick it up while running).
//! Clients verify with `sslmode=verify-full sslrootcert=<dir>/tls/ca.crt host=localhost`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::postgres::probe::PostgresTls;
use crate::tls::{Authority, TlsError};

/// The name the nodes' certificate carries and peers are verified against.
pub const SERVER_NAME: &str = "localhost";
/// Validity of the CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of the server certificate.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A server certificate with less than this left is issued again by `up`.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum LocalTlsError {
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to make the certificates in {dir}: {source}")]
    Certificates {
        dir: PathBuf,
        #[source]
        source: TlsError,
    },
}

/// `<dir>/tls`.
pub fn tls_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("tls")
}

/// Makes the CA and the server certificate when missing, and a new server certificate when
/// the current one expires within [`RENEW_BEFORE`] or was not issued by the CA.
pub fn ensure(cluster_dir: &Path, cluster: &str) -> Result<(), LocalTlsError> {
    let dir = tls_dir(cluster_dir);
    create_private_dir(&dir)?;
    let certificates = |source| LocalTlsError::Certificates {
        dir: dir.clone(),
        source,
    };
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let authority = match (read(&ca_crt)?, read(&ca_key)?) {
        (Some(cert), Some(key)) => Authority::from_pem(&cert, &key).map_err(certificates)?,
        _ => {
            let authority = Authority::generate(&format!("pgrs local {cluster} CA"), CA_VALIDITY)
                .map_err(certificates)?;
            write_private(&ca_key, &authority.certified().key_pem)?;
            write_private(&ca_crt, authority.cert_pem())?;
            authority
        }
    };
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let current = match (read(&crt)?, read(&key)?) {
        (Some(cert), Some(_)) => Some(cert),
        _ => None,
    };
    let fresh = match &current {
        Some(cert) => {
            !crate::tls::needs_renewal(cert, SystemTime::now(), RENEW_BEFORE)
                .map_err(certificates)?
                && crate::tls::issued_by(cert, authority.cert_pem()).map_err(certificates)?
        }
        None => false,
    };
    if !fresh {
        let server = authority
            .issue_server(
                &format!("pgrs local {cluster}"),
                &[SERVER_NAME.to_string()],
                &[
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
                SERVER_VALIDITY,
            )
            .map_err(certificates)?;
        // The key first: an agent reading between the two writes installs a mismatched pair,
        // which postgres refuses on reload (keeping the certificate it serves), and installs
        // the new certificate on its next read.
        write_private(&key, &server.key_pem)?;
        write_private(&crt, &server.cert_pem)?;
        tracing::info!(dir = %dir.display(), "issued the nodes' server certificate");
    }
    Ok(())
}

/// How the controller verifies the nodes' postgres.
pub fn postgres_tls(cluster_dir: &Path) -> Result<PostgresTls, LocalTlsError> {
    let path = tls_dir(cluster_dir).join("ca.crt");
    let ca_pem = std::fs::read_to_string(&path).map_err(|source| LocalTlsError::Io {
        what: "read",
        path,
        source,
    })?;
    Ok(PostgresTls {
        ca_pem,
        server_name: SERVER_NAME.to_string(),
    })
}

fn read(path: &Path) -> Result<Option<String>, LocalTlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LocalTlsError::Io {
            what: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), LocalTlsError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |what| {
        move |source| LocalTlsError::Io {
            what,
            path: dir.to_path_buf(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(failed("create"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed("chmod"))
}

/// Writes beside and renames: a reader sees the old file or the new one.
fn write_private(path: &Path, text: &str) -> Result<(), LocalTlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let staged = path.with_extension("new");
    let failed = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| LocalTlsError::Io { what, path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)
        .map_err(failed("create", &staged))?;
    file.write_all(text.as_bytes())
        .map_err(failed("write", &staged))?;
    std::fs::rename(&staged, path).map_err(failed("rename into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_makes_the_certificates_once_and_renews_only_a_foreign_or_expiring_one() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), "c").unwrap();
        let tls = tls_dir(dir.path());
        let first = std::fs::read_to_string(tls.join("tls.crt")).unwrap();
        let ca = std::fs::read_to_string(tls.join("ca.crt")).unwrap();
        assert!(crate::tls::issued_by(&first, &ca).unwrap());
        assert!(
            crate::tls::covers(
                &first,
                &[SERVER_NAME.to_string()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)]
            )
            .unwrap()
        );
        ensure(dir.path(), "c").unwrap();
        assert_eq!(
            std::fs::read_to_string(tls.join("tls.crt")).unwrap(),
            first,
            "a fresh certificate was replaced"
        );
        // A certificate of another CA (e.g. copied from another cluster) is replaced.
        let other = Authority::generate("other", CA_VALIDITY).unwrap();
        let foreign = other
            .issue_server("x", &[SERVER_NAME.into()], &[], SERVER_VALIDITY)
            .unwrap();
        std::fs::write(tls.join("tls.crt"), &foreign.cert_pem).unwrap();
        ensure(dir.path(), "c").unwrap();
        let renewed = std::fs::read_to_string(tls.join("tls.crt")).unwrap();
        assert!(crate::tls::issued_by(&renewed, &ca).unwrap());
        assert_eq!(std::fs::read_to_string(tls.join("ca.crt")).unwrap(), ca);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(tls.join("ca.key")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
