//! Configuration: one TOML file, layered under environment overrides.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`--config`),
//! `DATABASE_URL` / `REDIS_URL`, then `OUTBOX_RELAY_<SECTION>__<KEY>`.
//! Every section denies unknown keys, so a typo is an error rather than a
//! silently ignored setting. [`Config::validate`] reports *every* problem at
//! once, each naming its key, and runs before any actor starts.
//!
//! Files: this one holds the sections, their defaults and the loading API;
//! `layers` merges defaults, file and environment; `validate` checks
//! the values; `duration` parses `5s`-style values.
//!
//! Secrets: [`Config::to_redacted_toml`] (passwords hidden by
//! [`crate::redact`]) is what `check-config` prints and what logs may show.

mod duration;
mod layers;
mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use duration::{format_duration, parse_duration, Dur, OptDur};

use crate::redact::redact_url;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// Environment variable naming the config file (same as `--config`).
pub const CONFIG_PATH_ENV: &str = "OUTBOX_RELAY_CONFIG";

/// The config file used when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";

/// One problem with the configuration, naming the key (or variable) at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    /// One or more keys are wrong; every problem is listed.
    #[error("{}", .0.iter().map(|p| format!("invalid config: {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub(crate) fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid(vec![Problem {
            key: key.into(),
            message: message.into(),
        }])
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub sweep: SweepConfig,
    pub counter_sync: CounterSyncConfig,
    pub dead_letter: DeadLetterConfig,
    pub supervisor: SupervisorConfig,
    pub health: HealthConfig,
    pub http: HttpConfig,
    pub console: ConsoleConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Where the outbox lives. `DATABASE_URL` overrides it.
    pub url: String,
    /// Connections per pool (the sweep and the dead-letter actor each own one).
    pub pool_size: u32,
    /// Never use named prepared statements (pgbouncer transaction pooling).
    /// The relay currently uses unnamed statements in both modes.
    pub pgbouncer_compat: bool,
    /// Where to LISTEN for new rows: `"auto"` (the default) listens through
    /// `url`'s server; a URL listens there (a direct one when `url` goes
    /// through pgbouncer); `"off"` or `""` polls every `sweep.interval` only.
    pub listen_url: String,
    /// PEM file of the CA(s) that signed the server's certificate. Set, every
    /// TLS connection (`sslmode=require|prefer` in the URL) checks the
    /// certificate chain and that it names the host of the URL (libpq's
    /// `verify-full`); empty, TLS encrypts without checking (libpq's `require`).
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// The Redis holding the schedules. `REDIS_URL` overrides it.
    pub url: String,
    pub pool_size: u32,
    /// Prefix of every key the relay writes; `hover:` matches existing consumers.
    pub key_prefix: String,
    /// With N > 0 every pipeline ends with `WAIT N <time>`; a batch not
    /// acknowledged by N replicas is re-sent instead of deleted.
    pub wait_replicas: u32,
    /// `standalone` (one server, `url`), `cluster` (Redis Cluster,
    /// `cluster_urls`) or `sentinel` (the master `sentinel_urls` name).
    pub mode: RedisMode,
    /// Seed nodes of the cluster (any reachable subset will do); cluster mode only.
    pub cluster_urls: Vec<String>,
    /// The sentinels to ask for the master (any one that answers will do),
    /// each with its own password and TLS; sentinel mode only. The master
    /// is reached with `url`'s user, password, database and TLS, at the
    /// address the sentinels name.
    pub sentinel_urls: Vec<String>,
    /// The name the sentinels monitor the master under (`sentinel monitor
    /// NAME …`); sentinel mode only.
    pub sentinel_master: String,
    /// PEM file of the CA(s) that signed the servers' certificates, for
    /// `rediss://` URLs whose CA is not in the system's trust store (a
    /// private CA). Empty: the system's roots.
    pub tls_ca_file: String,
    /// How long `cancel-job`'s fence (`{prefix}cancelled:{…}`) outlives the
    /// cancel: a ZADD of the job that a stalled Redis executes within this
    /// time is refused. Must exceed any stall or partition Redis can resume
    /// from with old writes still queued.
    pub cancel_fence_ttl: Dur,
    /// Back-pressure: when Redis has a `maxmemory` and `used_memory`
    /// reaches this share of it, the relay stops writing (rows wait in the
    /// outbox, no attempt counted) until it falls below this minus 0.05,
    /// instead of driving Redis into OOM refusals. 1 = only when full.
    pub max_memory_ratio: f64,
}

/// How the relay talks to Redis.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
    Sentinel,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            pool_size: 4,
            key_prefix: "hover:".into(),
            wait_replicas: 0,
            mode: RedisMode::Standalone,
            cluster_urls: Vec::new(),
            sentinel_urls: Vec::new(),
            sentinel_master: String::new(),
            tls_ca_file: String::new(),
            cancel_fence_ttl: Dur::secs(7 * 86_400),
            max_memory_ratio: 0.9,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Pause between ticks when the last tick did not claim a full batch.
    pub interval: Dur,
    /// While the listener hears new rows (LISTEN/NOTIFY), the pause of a
    /// lane whose last tick settled every row: new rows are announced, and
    /// rows put back or not yet due have timers of their own; this poll
    /// only finds what nothing announces (rows made due by hand, a trigger
    /// disabled, a relay that died mid-tick).
    pub listen_poll_interval: Dur,
    /// Rows claimed per tick (and ZADDs per pipeline).
    pub batch_size: u32,
    /// What one tick may claim in bytes (its rows' text fields, plus 128 a
    /// row): a tick holds its rows several times over (the reply, the
    /// members, the pipeline), so large rows (50 KB paths) are claimed
    /// fewer at a time and the relay stays inside its memory limit.
    pub max_batch_bytes: u64,
    /// The tick's deadline; also its statement and idle-in-transaction timeout.
    pub tick_timeout: Dur,
    /// First retry delay; doubles with every failed attempt.
    pub base_backoff: Dur,
    /// Cap of the retry delay.
    pub max_backoff: Dur,
    /// Failed attempts after which a row moves to `task_outbox_dead`.
    pub max_attempts: u32,
    /// Ticks one process runs at once, each with its own batch.
    pub concurrency: u32,
    /// Drain ticks run at once while new rows keep arriving (a wake-up in
    /// the last second); 0: half of `concurrency`, rounded up.
    pub live_concurrency: u32,
}

impl SweepConfig {
    /// `live_concurrency`, with 0 resolved to its default.
    pub fn live_concurrency(&self) -> u32 {
        match self.live_concurrency {
            0 => self.concurrency.div_ceil(2),
            n => n,
        }
    }
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            interval: Dur::millis(500),
            listen_poll_interval: Dur::secs(5),
            // Measured (docs/BENCHMARKS.md, session 9): the Go sweeper's 500
            // and 1 left a third of one Postgres connection's speed unused;
            // 1000 rows per tick and two ticks in flight (one in Postgres
            // while the other is in Redis) drain at about the 1-connection
            // floor, with live rows still served first by the fresh lane.
            batch_size: 1000,
            // 2 MiB: a normal batch (1000 rows of a few hundred bytes) is a
            // tenth of it; with two ticks in flight a batch of large rows
            // keeps the relay well inside the Deployment's 64 MiB.
            max_batch_bytes: 2 * 1024 * 1024,
            tick_timeout: Dur::secs(5),
            base_backoff: Dur::secs(2),
            max_backoff: Dur::secs(300),
            max_attempts: 10,
            concurrency: 2,
            live_concurrency: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CounterSyncConfig {
    pub interval: Dur,
}

impl Default for CounterSyncConfig {
    fn default() -> Self {
        CounterSyncConfig { interval: Dur::secs(5) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Age after which dead letters are purged; `""` keeps them forever.
    pub retention: OptDur,
    /// How often the retention purge runs (when `retention` is set).
    pub purge_interval: Dur,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            retention: OptDur(None),
            purge_interval: Dur::secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Restarts allowed (all actors together) within `restart_window` before
    /// the process gives up and exits non-zero.
    pub max_restarts: u32,
    pub restart_window: Dur,
    /// Consecutive failed units of work (ticks, batches, pings) after which
    /// an actor is restarted with fresh state.
    pub error_budget: u32,
    /// Delay before an actor's first restart; doubles for each further
    /// restart of that actor within the window.
    pub backoff_base: Dur,
    /// Cap of the restart delay.
    pub backoff_max: Dur,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            max_restarts: 5,
            restart_window: Dur::secs(60),
            error_budget: 5,
            backoff_base: Dur::millis(500),
            backoff_max: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub interval: Dur,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Dur::secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// The browser console (README "Console").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where `run` serves the console, e.g. `127.0.0.1:9465`; `""` (the
    /// default): `run` serves none. `outbox-relay console` uses
    /// [`DEFAULT_CONSOLE_LISTEN`] when it is empty.
    pub listen: String,
    /// One user per line, `name:role:argon2-hash` (role `viewer` or
    /// `operator`), e.g. a file mounted from the Secret. Without users the
    /// console is read-only and only on a loopback address.
    pub users_file: String,
    /// Hide and refuse every action, whoever signs in.
    pub read_only: bool,
    /// The console's own Postgres (the triage role fits); `""`:
    /// `database.url`.
    pub database_url: String,
    /// Connections of the console's own pool.
    pub pool_size: u32,
    /// Every console statement ends after this.
    pub statement_timeout: Dur,
    /// A session lasts this long, however busy.
    pub session_ttl: Dur,
    /// A session unused this long ends (a console left open on a shared
    /// screen signs itself out).
    pub idle_timeout: Dur,
    /// Mark the session cookie `Secure` (serve it behind TLS): the cookies
    /// get the `__Host-` prefix and every answer carries HSTS.
    pub secure_cookie: bool,
    /// The console's own Redis user (README "Redis ACL", `outbox-console`):
    /// its URL, or in cluster mode the URL whose user and password replace
    /// those of `redis.cluster_urls`; `""`: `redis.url`, the relays' user.
    pub redis_url: String,
    /// Addresses (or CIDR ranges) of reverse proxies whose
    /// `X-Forwarded-For` names the client; from any other peer the header
    /// is ignored. The failed-sign-in limit counts per client address.
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub app: String,
    pub environment: String,
    pub probe_interval: Dur,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            app: "outbox-relay".into(),
            environment: "development".into(),
            probe_interval: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (one object per line) or `text` (for terminals).
    pub format: String,
    /// `critical`, `error`, `warning`, `info`, `debug` or `trace`.
    pub level: String,
}

impl LogConfig {
    /// The configured level (validation rejects names this does not know).
    pub fn level(&self) -> Option<slog::Level> {
        parse_level(&self.level)
    }
}

/// A level name as written in `log.level` (a few common aliases too).
pub fn parse_level(name: &str) -> Option<slog::Level> {
    use slog::Level;
    match name.to_ascii_lowercase().as_str() {
        "critical" | "crit" => Some(Level::Critical),
        "error" => Some(Level::Error),
        "warning" | "warn" => Some(Level::Warning),
        "info" => Some(Level::Info),
        "debug" => Some(Level::Debug),
        "trace" => Some(Level::Trace),
        _ => None,
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

impl Config {
    /// Load from an optional TOML text and an environment, then validate.
    ///
    /// `path` only names the file in error messages.
    pub fn load_from<I>(path: &str, toml_text: Option<&str>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let config = layers::layered(path, toml_text, env)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Load `path` (when it exists or was named explicitly) and the process environment.
    pub fn load(path: &str, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => None,
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_string(),
                    source,
                })
            }
        };
        Config::load_from(path, text.as_deref(), std::env::vars())
    }

    /// The effective configuration as TOML, passwords replaced by `***`.
    /// Every password in the connection strings, for `redact::remember`.
    pub fn secrets(&self) -> Vec<String> {
        [
            &self.database.url,
            &self.database.listen_url,
            &self.redis.url,
            &self.console.database_url,
            &self.console.redis_url,
        ]
        .into_iter()
        .chain(self.redis.cluster_urls.iter())
        .chain(self.redis.sentinel_urls.iter())
        .flat_map(|u| crate::redact::passwords(u))
        .collect()
    }

    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.database.url = redact_url(&c.database.url);
        if !c.database.listen_keyword() {
            c.database.listen_url = redact_url(&c.database.listen_url);
        }
        c.redis.url = redact_url(&c.redis.url);
        if !c.console.database_url.is_empty() {
            c.console.database_url = redact_url(&c.console.database_url);
        }
        if !c.console.redis_url.is_empty() {
            c.console.redis_url = redact_url(&c.console.redis_url);
        }
        c.redis.cluster_urls = c.redis.cluster_urls.iter().map(|u| redact_url(u)).collect();
        c.redis.sentinel_urls = c.redis.sentinel_urls.iter().map(|u| redact_url(u)).collect();
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
