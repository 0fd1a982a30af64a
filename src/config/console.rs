//! `[console]`: the browser console (address, users, its own Postgres and
//! Redis users, sessions), with the check of those values.

use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::database::{check_pg_url, DatabaseConfig};
use super::duration::Dur;
use super::http::HttpConfig;
use super::redis::RedisConfig;

/// The browser console (docs/console.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// where `run` serves the browser console (e.g. `127.0.0.1:9465`); `""` = none.
    /// `outbox-relay console` serves it alone, on `127.0.0.1:9465` when empty. A
    /// non-loopback address needs `console.users_file` (see [Console](console.md))
    // The address `outbox-relay console` uses when it is empty is `DEFAULT_CONSOLE_LISTEN`.
    pub listen: String,
    /// one user per line, `name:role:argon2-hash`, role `viewer` or `operator`
    /// (`outbox-relay console hash-password` makes the hash); mount it from the Secret.
    /// Without users the console is read-only and loopback-only
    pub users_file: String,
    /// hide and refuse every action, whoever signs in
    pub read_only: bool,
    /// the console's own Postgres URL (`outbox_triage` fits); `""` = `database.url`
    pub database_url: String,
    /// connections of the console's own pool (the sweep's pool is never used)
    pub pool_size: u32,
    /// every console read is cancelled on the server past this (an action's batches are
    /// not limited; one whose Postgres answers no batch for 60 s, a hung server, is
    /// stopped, its audit line written)
    pub statement_timeout: Dur,
    /// how long a sign-in lasts at most (sessions live in memory: a restart signs
    /// everyone out)
    pub session_ttl: Dur,
    /// a session unused this long ends
    // A console left open on a shared screen signs itself out.
    pub idle_timeout: Dur,
    /// set it when the console is served over TLS (a reverse proxy): `Secure` cookies
    /// named `__Host-…`, and HSTS
    pub secure_cookie: bool,
    /// the console's own Redis user (`outbox-console` in [Redis
    /// ACL](redis.md#redis-acl)); in cluster mode its user and password replace those of
    /// `redis.cluster_urls`; `""` = `redis.url`
    pub redis_url: String,
    /// reverse proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the
    /// client for the failed-sign-in limit; env: comma-separated
    // From any other peer the header is ignored; the limit counts per
    // client address.
    pub trusted_proxies: Vec<String>,
}

/// Where `outbox-relay console` listens when `console.listen` is empty.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:9465";

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            listen: String::new(),
            users_file: String::new(),
            read_only: false,
            database_url: String::new(),
            pool_size: 2,
            statement_timeout: Dur::secs(2),
            session_ttl: Dur::secs(8 * 3600),
            idle_timeout: Dur::secs(30 * 60),
            secure_cookie: false,
            redis_url: String::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl ConsoleConfig {
    /// The Redis settings the console connects with: the relays' own,
    /// with `console.redis_url`'s user where it is set.
    pub fn redis(&self, redis: &RedisConfig) -> RedisConfig {
        let mut r = redis.clone();
        if self.redis_url.is_empty() {
            return r;
        }
        r.url = self.redis_url.clone();
        if let Ok(own) = url::Url::parse(&self.redis_url) {
            r.cluster_urls = r
                .cluster_urls
                .iter()
                .map(|seed| match url::Url::parse(seed) {
                    Ok(mut u) => {
                        let _ = u.set_username(own.username());
                        let _ = u.set_password(own.password());
                        u.to_string()
                    }
                    Err(_) => seed.clone(),
                })
                .collect();
        }
        r
    }

    /// The console's Postgres URL.
    pub fn database_url<'a>(&'a self, database: &'a DatabaseConfig) -> &'a str {
        if self.database_url.is_empty() {
            &database.url
        } else {
            &self.database_url
        }
    }
}

impl ConsoleConfig {
    /// `console.*`: the address, the users file (read and checked here, so
    /// a bad line stops the start with its line number), and the refusal
    /// of an exposed console nobody must sign in to.
    pub(super) fn check(&self, http: &HttpConfig, bad: &mut impl FnMut(&str, String)) {
        let mut users = 0;
        if !self.users_file.is_empty() {
            match crate::users::read_users(&self.users_file) {
                Ok(u) if u.is_empty() => bad("console.users_file", format!("{} names no user", self.users_file)),
                Ok(u) => users = u.len(),
                Err(e) => bad("console.users_file", e.to_string()),
            }
        }
        if !self.listen.is_empty() {
            match SocketAddr::from_str(&self.listen) {
                Err(_) => bad(
                    "console.listen",
                    format!(
                        "{:?} is not an address like 127.0.0.1:9465 (or \"\": no console)",
                        self.listen
                    ),
                ),
                Ok(a) if !a.ip().is_loopback() && users == 0 && self.users_file.is_empty() => bad(
                    "console.listen",
                    format!(
                        "{} is not a loopback address and console.users_file names no user: refused, \
                         since anyone who reaches it would see the outbox (add users, or listen on 127.0.0.1)",
                        self.listen
                    ),
                ),
                Ok(_) if self.listen == http.listen => bad(
                    "console.listen",
                    format!(
                        "{} is http.listen's address too; give the console its own port",
                        self.listen
                    ),
                ),
                Ok(_) => {}
            }
        }
        if !self.database_url.is_empty() {
            if let Err(e) = check_pg_url(&self.database_url) {
                bad("console.database_url", e);
            }
        }
        if self.pool_size == 0 {
            bad("console.pool_size", "must be at least 1".into());
        }
        if self.statement_timeout.0.is_zero() {
            bad("console.statement_timeout", "must be greater than 0".into());
        }
        if self.session_ttl.0.is_zero() {
            bad("console.session_ttl", "must be greater than 0".into());
        }
        if self.idle_timeout.0.is_zero() {
            bad("console.idle_timeout", "must be greater than 0".into());
        }
        if !self.redis_url.is_empty() {
            if let Err(e) = ::redis::Client::open(self.redis_url.as_str()) {
                bad("console.redis_url", format!("not a Redis URL: {e}"));
            }
        }
        for (i, p) in self.trusted_proxies.iter().enumerate() {
            if let Err(e) = crate::netaddr::IpRange::parse(p) {
                bad(&format!("console.trusted_proxies[{i}]"), e);
            }
        }
    }
}
