//! TLS settings shared by both stores. CA files: the PEM bundles `database.tls_ca_file` and
//! `redis.tls_ca_file` name, read and checked the same way for both (config
//! validation reports a bad one by its key before anything connects).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// Whether a Postgres `url` names an `sslmode` at all (URL or key=value
/// form): without one the relay connects in plain TCP, as before TLS existed.
pub fn names_sslmode(url: &str) -> bool {
    url.contains("sslmode")
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_only_what_the_url_says() {
        for (url, named) in [
            ("postgres://u@h/d", false),
            ("postgres://u@h/d?sslmode=require", true),
            ("host=h user=u sslmode=prefer", true),
        ] {
            assert_eq!(names_sslmode(url), named, "{url}");
        }
    }
}
