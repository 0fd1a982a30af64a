//! TLS for Postgres connections, when `database.url` asks for it.
//!
//! `sslmode` in the URL decides, with libpq's meanings:
//! - absent or `disable`: plain TCP, as the relay always did (a local
//!   socket, a pgbouncer without TLS, a test server);
//! - `prefer`: TLS when the server offers it, plain TCP when it says no;
//! - `require`: TLS or no connection (the usual setting for managed
//!   Postgres services).
//!
//! Like libpq's `prefer` and `require`, neither checks the server's
//! certificate: the traffic (passwords, rows) is encrypted against anyone
//! listening, not against an active man in the middle. tokio-postgres
//! refuses `verify-ca` and `verify-full` as values; config validation says
//! so in one line. Absent means `disable` here, not libpq's `prefer`, so a
//! URL that worked before TLS existed behaves exactly as it did.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// What every Postgres connection of the relay is made with.
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// Whether `url` names an `sslmode` at all (URL or key=value form).
pub fn names_sslmode(url: &str) -> bool {
    url.contains("sslmode")
}

/// The connector (built once; it holds no per-connection state).
pub fn connector() -> Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports rustls's default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth();
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    })
    .clone()
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
    use super::*;
    use std::str::FromStr;
    use tokio_postgres::config::SslMode;

    #[test]
    fn sslmode_is_only_what_the_url_says() {
        for (url, named) in [
            ("postgres://u@h/d", false),
            ("postgres://u@h/d?sslmode=require", true),
            ("host=h user=u sslmode=prefer", true),
        ] {
            assert_eq!(names_sslmode(url), named, "{url}");
        }
        let cfg = crate::db::pg_config("postgres://u@h/d", std::time::Duration::from_secs(1)).expect("url");
        assert_eq!(cfg.get_ssl_mode(), SslMode::Disable);
        let cfg =
            crate::db::pg_config("postgres://u@h/d?sslmode=require", std::time::Duration::from_secs(1)).expect("url");
        assert_eq!(cfg.get_ssl_mode(), SslMode::Require);
        assert!(tokio_postgres::Config::from_str("postgres://u@h/d?sslmode=verify-full").is_err());
    }
}
