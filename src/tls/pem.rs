//! PEM decoding shared by the other pieces: certificate chains and private keys as rustls
//! (pki-types) DER values, with errors that name what was being read.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Result, TlsError};

/// Every certificate in `pem`, in order (leaf first for a chain); at least one.
pub(crate) fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source: Box::new(source),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            source: Box::new(rustls::pki_types::pem::Error::NoItemsFound),
        });
    }
    Ok(certs)
}

/// The first certificate in `pem` (the leaf of a chain).
pub(crate) fn first_certificate(pem: &str, what: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem {
        what: what.to_string(),
        source: Box::new(source),
    })
}

/// The private key in `pem` (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem {
        what: what.to_string(),
        source: Box::new(source),
    })
}
