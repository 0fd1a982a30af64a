//! Validation: every problem with the values, each naming its key, found
//! at once (an operator fixes a config in one round, not one per restart).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslMode;

use super::{format_duration, parse_level, Config, Problem, RedisMode};

/// A Postgres URL tokio-postgres can use, or why not (naming the
/// `sslmode` values it does not know, since libpq users will try them).
fn check_pg_url(url: &str) -> Result<(), String> {
    match tokio_postgres::Config::from_str(url) {
        Ok(_) => Ok(()),
        Err(_) if url.contains("verify-ca") || url.contains("verify-full") => Err(
            "sslmode verify-ca and verify-full are not accepted in the URL; use sslmode=require, plus database.tls_ca_file to check the server certificate".into(),
        ),
        Err(e) => Err(format!("not a Postgres URL: {e}")),
    }
}

impl Config {
    /// Every problem with the values, each naming its key. Empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if let Err(e) = check_pg_url(&self.database.url) {
            bad("database.url", e);
        }
        if !self.database.listen_keyword() {
            if let Err(e) = check_pg_url(&self.database.listen_url) {
                bad(
                    "database.listen_url",
                    format!("{e} (or \"auto\": listen through database.url; \"off\": poll only)"),
                );
            }
        }
        if !self.database.tls_ca_file.is_empty() {
            if let Err(e) = crate::tls::read_ca_file(&self.database.tls_ca_file) {
                bad("database.tls_ca_file", e.to_string());
            } else if !crate::tls::names_sslmode(&self.database.url) {
                bad(
                    "database.tls_ca_file",
                    "is set, but database.url has no sslmode: add ?sslmode=require, or the CA is never used".into(),
                );
            }
            // A CA check the operator believes in must not be skippable: with
            // `prefer`, a server (or anyone on the path) that refuses TLS gets
            // a plaintext connection, certificate unchecked.
            for (key, url) in [
                ("database.url", &self.database.url),
                ("database.listen_url", &self.database.listen_url),
            ] {
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
        if !(1..=1000).contains(&self.database.pool_size) {
            bad(
                "database.pool_size",
                format!("must be between 1 and 1000 (got {})", self.database.pool_size),
            );
        }
        if let Err(e) = ::redis::Client::open(self.redis.url.as_str()) {
            bad("redis.url", format!("not a Redis URL: {e}"));
        }
        if !(1..=1000).contains(&self.redis.pool_size) {
            bad(
                "redis.pool_size",
                format!("must be between 1 and 1000 (got {})", self.redis.pool_size),
            );
        }
        if self.redis.key_prefix.chars().any(char::is_whitespace) {
            bad("redis.key_prefix", "must not contain whitespace".into());
        }
        if !braces_balanced(&self.redis.key_prefix) {
            bad(
                "redis.key_prefix",
                format!(
                    "{:?} has a '{{' or '}}' that is not part of a {{hash tag}}: a job's cancel fence could not share its schedule's cluster slot",
                    self.redis.key_prefix
                ),
            );
        }
        if !(self.redis.max_memory_ratio > 0.1 && self.redis.max_memory_ratio <= 1.0) {
            bad(
                "redis.max_memory_ratio",
                format!(
                    "{} is out of range: a share of Redis's maxmemory above 0.1 and at most 1 (0.9 = stop writing at 90%)",
                    self.redis.max_memory_ratio
                ),
            );
        }
        if self.redis.cancel_fence_ttl.0 < Duration::from_secs(60) {
            bad(
                "redis.cancel_fence_ttl",
                "must be at least 1m (it must outlive any Redis stall)".into(),
            );
        }
        if self.redis.mode == RedisMode::Cluster {
            if self.redis.cluster_urls.is_empty() {
                bad(
                    "redis.cluster_urls",
                    "cluster mode needs at least one seed node (e.g. [\"redis://10.0.0.1:6379\"])".into(),
                );
            }
            let mut urls_ok = true;
            for (i, url) in self.redis.cluster_urls.iter().enumerate() {
                if let Err(e) = ::redis::Client::open(url.as_str()) {
                    urls_ok = false;
                    bad(&format!("redis.cluster_urls[{i}]"), format!("not a Redis URL: {e}"));
                }
            }
            // Each URL is fine on its own; the set may still not be (e.g. mixed credentials).
            if urls_ok && !self.redis.cluster_urls.is_empty() {
                if let Err(e) = ::redis::cluster::ClusterClient::new(self.redis.cluster_urls.clone()) {
                    bad("redis.cluster_urls", format!("not usable as cluster seeds: {e}"));
                }
            }
        }
        if self.redis.mode == RedisMode::Sentinel {
            if self.redis.sentinel_urls.is_empty() {
                bad(
                    "redis.sentinel_urls",
                    "sentinel mode needs at least one sentinel (e.g. [\"redis://10.0.0.1:26379\"])".into(),
                );
            }
            for (i, url) in self.redis.sentinel_urls.iter().enumerate() {
                if let Err(e) = ::redis::Client::open(url.as_str()) {
                    bad(&format!("redis.sentinel_urls[{i}]"), format!("not a Redis URL: {e}"));
                }
            }
            if self.redis.sentinel_master.trim().is_empty() {
                bad(
                    "redis.sentinel_master",
                    "sentinel mode needs the name the sentinels monitor the master under (`sentinel monitor NAME …`, often mymaster)".into(),
                );
            }
        }
        if !self.redis.tls_ca_file.is_empty() {
            let urls: Vec<&String> = match self.redis.mode {
                RedisMode::Standalone => vec![&self.redis.url],
                RedisMode::Cluster => self.redis.cluster_urls.iter().collect(),
                RedisMode::Sentinel => self.redis.sentinel_urls.iter().chain([&self.redis.url]).collect(),
            };
            if let Err(e) = crate::tls::read_ca_file(&self.redis.tls_ca_file) {
                bad("redis.tls_ca_file", e.to_string());
            } else if !urls.iter().any(|u| u.starts_with("rediss://")) {
                bad(
                    "redis.tls_ca_file",
                    "is set, but no Redis URL is rediss://: use rediss://, or the CA is never used".into(),
                );
            }
        }
        let s = &self.sweep;
        if s.interval.0.is_zero() {
            bad("sweep.interval", "must be greater than 0".into());
        }
        if s.listen_poll_interval.0.is_zero() {
            bad("sweep.listen_poll_interval", "must be greater than 0".into());
        }
        if !(1..=100_000).contains(&s.batch_size) {
            bad(
                "sweep.batch_size",
                format!("must be between 1 and 100000 (got {})", s.batch_size),
            );
        }
        if !(65_536..=1 << 30).contains(&s.max_batch_bytes) {
            bad(
                "sweep.max_batch_bytes",
                format!("must be between 65536 and 1073741824 (got {})", s.max_batch_bytes),
            );
        }
        if s.tick_timeout.0 < Duration::from_millis(10) {
            bad(
                "sweep.tick_timeout",
                format!("must be at least 10ms (got {})", format_duration(s.tick_timeout.0)),
            );
        }
        if s.base_backoff.0.is_zero() {
            bad("sweep.base_backoff", "must be greater than 0".into());
        }
        if s.max_backoff.0 < s.base_backoff.0 {
            bad(
                "sweep.max_backoff",
                format!(
                    "must not be less than sweep.base_backoff ({} < {})",
                    format_duration(s.max_backoff.0),
                    format_duration(s.base_backoff.0)
                ),
            );
        }
        if s.max_attempts == 0 {
            bad("sweep.max_attempts", "must be at least 1".into());
        }
        if !(1..=64).contains(&s.concurrency) {
            bad(
                "sweep.concurrency",
                format!("must be between 1 and 64 (got {})", s.concurrency),
            );
        } else if s.concurrency > self.database.pool_size {
            bad(
                "sweep.concurrency",
                format!(
                    "{} concurrent ticks need database.pool_size >= {} (got {})",
                    s.concurrency, s.concurrency, self.database.pool_size
                ),
            );
        }
        if s.live_concurrency > s.concurrency {
            bad(
                "sweep.live_concurrency",
                format!(
                    "must be 0 (half of sweep.concurrency) or at most sweep.concurrency ({}) (got {})",
                    s.concurrency, s.live_concurrency
                ),
            );
        }
        if self.dead_letter.retention.0.is_some_and(|d| d.is_zero()) {
            bad(
                "dead_letter.retention",
                "must be greater than 0, or \"\" to keep dead letters forever".into(),
            );
        }
        if self.dead_letter.purge_interval.0.is_zero() {
            bad("dead_letter.purge_interval", "must be greater than 0".into());
        }
        if self.counter_sync.interval.0.is_zero() {
            bad("counter_sync.interval", "must be greater than 0".into());
        }
        if self.supervisor.max_restarts == 0 {
            bad("supervisor.max_restarts", "must be at least 1".into());
        }
        if self.supervisor.restart_window.0.is_zero() {
            bad("supervisor.restart_window", "must be greater than 0".into());
        }
        if self.supervisor.error_budget == 0 {
            bad("supervisor.error_budget", "must be at least 1".into());
        }
        if self.supervisor.backoff_base.0.is_zero() {
            bad("supervisor.backoff_base", "must be greater than 0".into());
        }
        if self.supervisor.backoff_max.0 < self.supervisor.backoff_base.0 {
            bad(
                "supervisor.backoff_max",
                format!(
                    "must not be less than supervisor.backoff_base ({} < {})",
                    format_duration(self.supervisor.backoff_max.0),
                    format_duration(self.supervisor.backoff_base.0)
                ),
            );
        }
        if self.health.interval.0.is_zero() {
            bad("health.interval", "must be greater than 0".into());
        }
        if SocketAddr::from_str(&self.http.listen).is_err() {
            bad(
                "http.listen",
                format!("{:?} is not an address like 127.0.0.1:9464", self.http.listen),
            );
        }
        self.validate_console(&mut bad);
        if self.metrics.app.trim().is_empty() {
            bad("metrics.app", "must not be empty".into());
        }
        if self.metrics.environment.trim().is_empty() {
            bad("metrics.environment", "must not be empty".into());
        }
        if self.metrics.probe_interval.0.is_zero() {
            bad("metrics.probe_interval", "must be greater than 0".into());
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            bad(
                "log.format",
                format!("{:?} is not one of \"json\", \"text\"", self.log.format),
            );
        }
        if parse_level(&self.log.level).is_none() {
            bad(
                "log.level",
                format!(
                    "{:?} is not one of critical, error, warning, info, debug, trace",
                    self.log.level
                ),
            );
        }
        p
    }
}

/// Every `{` of `prefix` opens a non-empty `{tag}` closed within it, and no
/// `}` stands alone: then a key's hash tag is either the prefix's (the same
/// for every key of the relay) or comes after the prefix.
fn braces_balanced(prefix: &str) -> bool {
    let mut open = false;
    let mut len = 0;
    for c in prefix.chars() {
        match (c, open) {
            ('{', false) => {
                open = true;
                len = 0;
            }
            ('}', true) if len > 0 => open = false,
            ('{' | '}', _) => return false,
            (_, true) => len += 1,
            _ => {}
        }
    }
    !open
}

impl Config {
    /// `console.*`: the address, the users file (read and checked here, so
    /// a bad line stops the start with its line number), and the refusal
    /// of an exposed console nobody must sign in to.
    fn validate_console(&self, bad: &mut impl FnMut(&str, String)) {
        let c = &self.console;
        let mut users = 0;
        if !c.users_file.is_empty() {
            match crate::users::read_users(&c.users_file) {
                Ok(u) if u.is_empty() => bad("console.users_file", format!("{} names no user", c.users_file)),
                Ok(u) => users = u.len(),
                Err(e) => bad("console.users_file", e.to_string()),
            }
        }
        if !c.listen.is_empty() {
            match SocketAddr::from_str(&c.listen) {
                Err(_) => bad(
                    "console.listen",
                    format!(
                        "{:?} is not an address like 127.0.0.1:9465 (or \"\": no console)",
                        c.listen
                    ),
                ),
                Ok(a) if !a.ip().is_loopback() && users == 0 && c.users_file.is_empty() => bad(
                    "console.listen",
                    format!(
                        "{} is not a loopback address and console.users_file names no user: refused, \
                         since anyone who reaches it would see the outbox (add users, or listen on 127.0.0.1)",
                        c.listen
                    ),
                ),
                Ok(_) if c.listen == self.http.listen => bad(
                    "console.listen",
                    format!(
                        "{} is http.listen's address too; give the console its own port",
                        c.listen
                    ),
                ),
                Ok(_) => {}
            }
        }
        if !c.database_url.is_empty() {
            if let Err(e) = check_pg_url(&c.database_url) {
                bad("console.database_url", e);
            }
        }
        if c.pool_size == 0 {
            bad("console.pool_size", "must be at least 1".into());
        }
        if c.statement_timeout.0.is_zero() {
            bad("console.statement_timeout", "must be greater than 0".into());
        }
        if c.session_ttl.0.is_zero() {
            bad("console.session_ttl", "must be greater than 0".into());
        }
        if c.idle_timeout.0.is_zero() {
            bad("console.idle_timeout", "must be greater than 0".into());
        }
        if !c.redis_url.is_empty() {
            if let Err(e) = ::redis::Client::open(c.redis_url.as_str()) {
                bad("console.redis_url", format!("not a Redis URL: {e}"));
            }
        }
        for (i, p) in c.trusted_proxies.iter().enumerate() {
            if let Err(e) = crate::netaddr::IpRange::parse(p) {
                bad(&format!("console.trusted_proxies[{i}]"), e);
            }
        }
    }
}
