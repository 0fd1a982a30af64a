//! A Postgres URL read into a connection config, with the relay's defaults
//! (TLS only where asked, its application name, keepalives) applied.

use std::str::FromStr;
use std::time::Duration;

use super::error::DbSetupError;
use crate::redact::redact_url;

/// Name the relay's sessions carry in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "outbox-relay";

/// Parse a URL into a connection config with the relay's defaults applied.
pub fn pg_config(url: &str, connect_timeout: Duration) -> Result<tokio_postgres::Config, DbSetupError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| DbSetupError::Url {
        url: redact_url(url),
        reason: e.to_string(),
    })?;
    // TLS only where the URL asks for it (see `tls`): tokio-postgres's own
    // default would be `prefer`.
    if !crate::tls::names_sslmode(url) {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(APPLICATION_NAME);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(connect_timeout);
    }
    // Keepalive settings the URL names win (libpq's parameter names).
    cfg.keepalives(true);
    if !url.contains("keepalives_idle") {
        cfg.keepalives_idle(crate::pool::tcp::KEEPALIVE_IDLE);
    }
    if !url.contains("keepalives_interval") {
        cfg.keepalives_interval(crate::pool::tcp::KEEPALIVE_INTERVAL);
    }
    if !url.contains("keepalives_retries") {
        cfg.keepalives_retries(crate::pool::tcp::KEEPALIVE_RETRIES);
    }
    if !url.contains("tcp_user_timeout") {
        cfg.tcp_user_timeout(crate::pool::tcp::USER_TIMEOUT);
    }
    Ok(cfg)
}
