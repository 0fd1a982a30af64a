//! `[database]`: the Postgres holding the outbox, the LISTEN target and
//! TLS, with the check of those values (and of any Postgres URL).

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokio_postgres::config::SslMode;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Postgres with the outbox; `?sslmode=require` for TLS (see [TLS to
    /// Postgres](postgres.md#tls-to-postgres)); libpq's multi-host forms for a primary
    /// with standbys:
    /// `postgres://u@pg-a:5432,pg-b:5432/db?target_session_attrs=read-write` or
    /// `host=pg-a,pg-b port=5432,5432 … target_session_attrs=read-write` (hosts are tried
    /// in order, read-only ones skipped; `check-config` and the start line show every
    /// host, never the password)
    // `DATABASE_URL` overrides it (config/layers.rs).
    pub url: String,
    /// connections of the sweep's pool, one per tick in flight (1–1000, ≥
    /// `sweep.concurrency`); the other actors hold one Postgres connection each (counter
    /// sync, dead-letter retention, metrics probe), LISTEN one of its own, and the
    /// console's pool is `console.pool_size`
    // Read by actors::tree::sweep_settings only; dead_letter.rs and
    // actors::small_pools build pools of one.
    pub pool_size: u32,
    /// accepted and ignored, kept for configs that set it: the relay never prepares named
    /// statements, so it works behind pgbouncer in transaction pooling whatever this says
    /// (see [pgbouncer](postgres.md#pgbouncer))
    // Read nowhere: every statement is unnamed (`query_typed`,
    // `execute_typed`, `batch_execute`), so there is no other mode to
    // switch to. Still a field so that configs setting it load.
    pub pgbouncer_compat: bool,
    /// where to LISTEN for new rows, which then wake the sweep at once: `auto` = through
    /// `database.url`'s server; a URL = there (a direct one when `database.url` goes
    /// through pgbouncer in transaction pooling); `off` (or `""`, which meant polling
    /// before `auto` became the default) = poll every `sweep.interval` only. Checked end
    /// to end at start (see "LISTEN/NOTIFY")
    pub listen_url: String,
    /// PEM file of the CA(s) that signed the server certificate: TLS connections then
    /// check the chain and the host name (libpq's `verify-full`); `""` = encrypt without
    /// checking
    // With a CA file, validation refuses `sslmode=prefer` and `disable` in
    // the URLs: a refused TLS would fall back to plaintext, unchecked.
    pub tls_ca_file: String,
}

/// `database.listen_url`'s default: listen through `database.url`'s server.
pub const LISTEN_AUTO: &str = "auto";

impl DatabaseConfig {
    /// The URL the relay LISTENs on, or `None` when it only polls
    /// (`listen_url` is `"off"` or `""`, the latter its meaning before
    /// `"auto"` became the default).
    pub fn listen_target(&self) -> Option<&str> {
        match self.listen_url.trim() {
            "" | "off" => None,
            LISTEN_AUTO => Some(&self.url),
            url => Some(url),
        }
    }

    /// `listen_url` holds a keyword (`"auto"`, `"off"`, `""`), not a URL.
    pub fn listen_keyword(&self) -> bool {
        matches!(self.listen_url.trim(), "" | "off" | LISTEN_AUTO)
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://root@127.0.0.1:5432/test".into(),
            pool_size: 4,
            pgbouncer_compat: true,
            listen_url: LISTEN_AUTO.into(),
            tls_ca_file: String::new(),
        }
    }
}

/// A Postgres URL tokio-postgres can use, or why not (naming the
/// `sslmode` values it does not know, since libpq users will try them).
pub(super) fn check_pg_url(url: &str) -> Result<(), String> {
    match tokio_postgres::Config::from_str(url) {
        Ok(_) => Ok(()),
        Err(_) if url.contains("verify-ca") || url.contains("verify-full") => Err(
            "sslmode verify-ca and verify-full are not accepted in the URL; use sslmode=require, plus database.tls_ca_file to check the server certificate".into(),
        ),
        Err(e) => Err(format!("not a Postgres URL: {e}")),
    }
}

impl DatabaseConfig {
    /// `database.*`: the URLs, the CA file and the pool size.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if let Err(e) = check_pg_url(&self.url) {
            bad("database.url", e);
        }
        if !self.listen_keyword() {
            if let Err(e) = check_pg_url(&self.listen_url) {
                bad(
                    "database.listen_url",
                    format!("{e} (or \"auto\": listen through database.url; \"off\": poll only)"),
                );
            }
        }
        if !self.tls_ca_file.is_empty() {
            if let Err(e) = crate::tls::read_ca_file(&self.tls_ca_file) {
                bad("database.tls_ca_file", e.to_string());
            } else if !crate::tls::names_sslmode(&self.url) {
                bad(
                    "database.tls_ca_file",
                    "is set, but database.url has no sslmode: add ?sslmode=require, or the CA is never used".into(),
                );
            }
            // A CA check the operator believes in must not be skippable: with
            // `prefer`, a server (or anyone on the path) that refuses TLS gets
            // a plaintext connection, certificate unchecked.
            for (key, url) in [("database.url", &self.url), ("database.listen_url", &self.listen_url)] {
                let mode = tokio_postgres::Config::from_str(url).map(|c| c.get_ssl_mode());
                let plaintext = match mode {
                    Ok(SslMode::Prefer) => "sslmode=prefer falls back to plaintext when TLS is refused",
                    Ok(SslMode::Disable) => "sslmode=disable is plaintext",
                    _ => continue,
                };
                if crate::tls::names_sslmode(url) {
                    bad(
                        key,
                        format!("{plaintext}, so database.tls_ca_file would not be enforced: use sslmode=require"),
                    );
                }
            }
        }
        if !(1..=1000).contains(&self.pool_size) {
            bad(
                "database.pool_size",
                format!("must be between 1 and 1000 (got {})", self.pool_size),
            );
        }
    }
}
