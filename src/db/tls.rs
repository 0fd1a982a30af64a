//! TLS for Postgres connections, when `database.url` asks for it.
//!
//! `sslmode` in the URL decides, with libpq's meanings:
//! - absent or `disable`: plain TCP, as the relay always did (a local
//!   socket, a pgbouncer without TLS, a test server);
//! - `prefer`: TLS when the server offers it, plain TCP when it says no;
//! - `require`: TLS or no connection (the usual setting for managed
//!   Postgres services).
//!
//! Without `database.tls_ca_file`, like libpq's `prefer` and `require`,
//! neither checks the server's certificate: the traffic (passwords, rows)
//! is encrypted against anyone listening, not against an active man in the
//! middle. With it, the chain must lead to one of the file's CAs and the
//! certificate must name the URL's host (libpq's `verify-full`; the value
//! itself is refused by tokio-postgres's URL parser, so it is a key of
//! ours). Absent means `disable` here, not libpq's `prefer`, so a URL that
//! worked before TLS existed behaves exactly as it did.
//!
//! The connector is process-wide: [`configure`] sets it once from the
//! config at start-up; until then (tests, tools) it encrypts without checks.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::tls::{read_ca_file, TlsError};

/// What every Postgres connection of the relay is made with.
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

static CONNECTOR: OnceLock<Tls> = OnceLock::new();

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls's default protocol versions")
}

fn encrypt_only() -> Tls {
    let config = builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// Set the process's connector from `database.tls_ca_file` ("" = encrypt
/// without checks). Call once, before the first connection; a later call
/// keeps the first connector.
pub fn configure(ca_file: &str) -> Result<(), TlsError> {
    let tls = if ca_file.is_empty() {
        encrypt_only()
    } else {
        let config = builder()
            .with_root_certificates(read_ca_file(ca_file)?)
            .with_no_client_auth();
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    };
    let _ = CONNECTOR.set(tls);
    Ok(())
}

/// The connector every Postgres connection is made with.
pub fn connector() -> Tls {
    CONNECTOR.get_or_init(encrypt_only).clone()
}

/// libpq's `sslmode=require`: any certificate is accepted, but the
/// handshake's signatures are still checked against it, so the session is
/// encrypted with the key of the certificate the server presented.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use tokio_postgres::config::SslMode;

    #[test]
    fn sslmode_is_only_what_the_url_says() {
        let cfg = crate::db::url::pg_config("postgres://u@h/d", std::time::Duration::from_secs(1)).expect("url");
        assert_eq!(cfg.get_ssl_mode(), SslMode::Disable);
        let cfg = crate::db::url::pg_config("postgres://u@h/d?sslmode=require", std::time::Duration::from_secs(1))
            .expect("url");
        assert_eq!(cfg.get_ssl_mode(), SslMode::Require);
        assert!(tokio_postgres::Config::from_str("postgres://u@h/d?sslmode=verify-full").is_err());
    }
}
