//! CA files for TLS: the PEM bundles `database.tls_ca_file` and
//! `redis.tls_ca_file` name, read and checked the same way for both (config
//! validation reports a bad one by its key before anything connects).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// Why a CA file (`database.tls_ca_file`, `redis.tls_ca_file`) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA certificates from {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("CA certificate in {path} is not usable: {reason}")]
    BadCertificate { path: String, reason: String },
}

/// The certificates of a PEM file, as trust anchors.
pub fn read_ca_file(path: &str) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::CaFile {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_string() });
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}
