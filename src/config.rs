//! Configuration: one TOML file, layered under environment overrides.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`--config`),
//! `DATABASE_URL` / `REDIS_URL`, then `OUTBOX_RELAY_<SECTION>__<KEY>`.
//! Every section denies unknown keys, so a typo is an error rather than a
//! silently ignored setting. [`Config::validate`] reports *every* problem at
//! once, each naming its key, and runs before any actor starts.
//!
//! Secrets: [`redact_url`] hides passwords; [`Config::to_redacted_toml`] is
//! what `check-config` prints and what the logs may show.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid(vec![Problem {
            key: key.into(),
            message: message.into(),
        }])
    }
}

/// A duration written as a string: `250ms`, `5s`, `5m`, `2h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

/// Parse `90s`, `15m`, `250ms`, `12h`, `7d` (a whole number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("{text:?} is negative; durations must be positive"));
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (use ms, s, m, h or d, e.g. \"5s\")"))?;
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "{text:?} is not a duration (expected a number and a unit, e.g. \"500ms\")"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("{text:?}: number out of range"))?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?} has unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Format a duration in the largest unit that represents it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

/// A duration that may be switched off with `""`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptDur(pub Option<Duration>);

impl Serialize for OptDur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(d) => s.serialize_str(&format_duration(d)),
            None => s.serialize_str(""),
        }
    }
}

impl<'de> Deserialize<'de> for OptDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(OptDur(None));
        }
        parse_duration(&s)
            .map(|d| OptDur(Some(d)))
            .map_err(serde::de::Error::custom)
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
    /// Direct (non-pgbouncer) URL for LISTEN/NOTIFY; empty means poll only.
    pub listen_url: String,
    /// PEM file of the CA(s) that signed the server's certificate. Set, every
    /// TLS connection (`sslmode=require|prefer` in the URL) checks the
    /// certificate chain and that it names the host of the URL (libpq's
    /// `verify-full`); empty, TLS encrypts without checking (libpq's `require`).
    pub tls_ca_file: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://root@127.0.0.1:5432/test".into(),
            pool_size: 4,
            pgbouncer_compat: true,
            listen_url: String::new(),
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
    /// `standalone` (one server, `url`) or `cluster` (Redis Cluster, `cluster_urls`).
    pub mode: RedisMode,
    /// Seed nodes of the cluster (any reachable subset will do); cluster mode only.
    pub cluster_urls: Vec<String>,
    /// PEM file of the CA(s) that signed the servers' certificates, for
    /// `rediss://` URLs whose CA is not in the system's trust store (a
    /// private CA). Empty: the system's roots.
    pub tls_ca_file: String,
}

/// How the relay talks to Redis.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
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
            tls_ca_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Pause between ticks when the last tick did not claim a full batch.
    pub interval: Dur,
    /// Rows claimed per tick (and ZADDs per pipeline).
    pub batch_size: u32,
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
            batch_size: 500,
            tick_timeout: Dur::secs(5),
            base_backoff: Dur::secs(2),
            max_backoff: Dur::secs(300),
            max_attempts: 10,
            concurrency: 1,
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

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

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
    /// Load from an optional TOML text and an environment, then validate.
    ///
    /// `path` only names the file in error messages.
    pub fn load_from<I>(path: &str, toml_text: Option<&str>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut merged =
            toml::Value::try_from(Config::default()).map_err(|e| ConfigError::one("(defaults)", e.to_string()))?;
        if let Some(text) = toml_text {
            let file: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_string(),
                message: one_line(&e.to_string()),
            })?;
            merge(&mut merged, toml::Value::Table(file));
        }
        apply_env(&mut merged, env)?;
        let config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            let message = one_line(&e.into_inner().to_string());
            ConfigError::one(if key == "." { "(top level)".into() } else { key }, message)
        })?;
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
        if !self.database.listen_url.is_empty() {
            if let Err(e) = check_pg_url(&self.database.listen_url) {
                bad("database.listen_url", e);
            }
        }
        if !self.database.tls_ca_file.is_empty() {
            if let Err(e) = crate::tls::read_ca_file(&self.database.tls_ca_file) {
                bad("database.tls_ca_file", e.to_string());
            } else if !crate::db::tls::names_sslmode(&self.database.url) {
                bad(
                    "database.tls_ca_file",
                    "is set, but database.url has no sslmode: add ?sslmode=require, or the CA is never used".into(),
                );
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
        if !self.redis.tls_ca_file.is_empty() {
            let urls: Vec<&String> = match self.redis.mode {
                RedisMode::Standalone => vec![&self.redis.url],
                RedisMode::Cluster => self.redis.cluster_urls.iter().collect(),
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
        if !(1..=100_000).contains(&s.batch_size) {
            bad(
                "sweep.batch_size",
                format!("must be between 1 and 100000 (got {})", s.batch_size),
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
        if crate::telemetry::logging::parse_level(&self.log.level).is_none() {
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

    /// The effective configuration as TOML, passwords replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.database.url = redact_url(&c.database.url);
        c.database.listen_url = redact_url(&c.database.listen_url);
        c.redis.url = redact_url(&c.redis.url);
        c.redis.cluster_urls = c.redis.cluster_urls.iter().map(|u| redact_url(u)).collect();
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Deep-merge `over` into `base` (tables merge key by key, values replace).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Apply `DATABASE_URL`, `REDIS_URL` and `OUTBOX_RELAY_<SECTION>__<KEY>`.
///
/// A value is converted to the type the key already has (every key has a
/// default), so `OUTBOX_RELAY_SWEEP__BATCH_SIZE=1000` becomes an integer and
/// `OUTBOX_RELAY_REDIS__KEY_PREFIX=123` stays a string.
fn apply_env<I>(merged: &mut toml::Value, env: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut overrides: BTreeMap<(u8, String), (String, String, String)> = BTreeMap::new();
    let mut problems = Vec::new();
    for (var, value) in env {
        let target = match var.as_str() {
            "DATABASE_URL" => Some((0, "database".to_string(), "url".to_string())),
            "REDIS_URL" => Some((0, "redis".to_string(), "url".to_string())),
            // Names the config file itself, not a key in it.
            CONFIG_PATH_ENV => None,
            _ => var.strip_prefix(ENV_PREFIX).map(|rest| {
                let (section, key) = rest.split_once("__").unwrap_or((rest, ""));
                (1, section.to_ascii_lowercase(), key.to_ascii_lowercase())
            }),
        };
        if let Some((rank, section, key)) = target {
            overrides.insert((rank, var.clone()), (section, key, value));
        }
    }
    for ((_, var), (section, key, value)) in overrides {
        let slot = merged
            .get_mut(&section)
            .and_then(|s| s.as_table_mut())
            .and_then(|t| t.get_mut(&key));
        let Some(slot) = slot else {
            problems.push(Problem {
                key: var.clone(),
                message: format!("unknown key {section}.{key} (expected OUTBOX_RELAY_<SECTION>__<KEY>)"),
            });
            continue;
        };
        let parsed = match slot {
            toml::Value::Integer(_) => value
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| "an integer"),
            toml::Value::Float(_) => value
                .trim()
                .parse::<f64>()
                .map(toml::Value::Float)
                .map_err(|_| "a number"),
            toml::Value::Boolean(_) => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
                "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
                _ => Err("true or false"),
            },
            // A list (`redis.cluster_urls`) is written comma-separated.
            toml::Value::Array(_) => Ok(toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| toml::Value::String(v.to_string()))
                    .collect(),
            )),
            _ => Ok(toml::Value::String(value.clone())),
        };
        match parsed {
            Ok(v) => *slot = v,
            Err(expected) => problems.push(Problem {
                key: format!("{section}.{key} (from {var})"),
                message: format!("{value:?} is not {expected}"),
            }),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Hide the password of a URL (`scheme://user:secret@host` → `scheme://user:***@host`)
/// or of a key/value connection string (`password=secret` → `password=***`).
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &rest[at..]);
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_from(
            "test.toml",
            Some(toml),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn problems(toml: &str, env: &[(&str, &str)]) -> Vec<Problem> {
        match load(toml, env) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = load("", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.sweep.batch_size, 500);
        assert_eq!(c.sweep.interval.0, Duration::from_millis(500));
        assert_eq!(c.redis.key_prefix, "hover:");
        assert!(c.database.pgbouncer_compat);
    }

    #[test]
    fn shipped_default_toml_equals_builtin_defaults() {
        let text = include_str!("../config/default.toml");
        let c = load(text, &[]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn file_then_env_layering() {
        let c = load(
            "[sweep]\nbatch_size = 100\n[redis]\nkey_prefix = \"x:\"",
            &[
                ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "1000"),
                ("OUTBOX_RELAY_REDIS__KEY_PREFIX", "123"),
                ("DATABASE_URL", "postgres://a@b/c"),
                ("OUTBOX_RELAY_DATABASE__PGBOUNCER_COMPAT", "false"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.sweep.batch_size, 1000);
        assert_eq!(c.redis.key_prefix, "123");
        assert_eq!(c.database.url, "postgres://a@b/c");
        assert!(!c.database.pgbouncer_compat);
    }

    #[test]
    fn live_concurrency_defaults_to_half_of_concurrency_and_is_bounded_by_it() {
        let c = load("[sweep]\nconcurrency = 3\n[database]\npool_size = 4", &[]).unwrap();
        assert_eq!(c.sweep.live_concurrency(), 2, "0 means half, rounded up");
        assert_eq!(load("", &[]).unwrap().sweep.live_concurrency(), 1);
        let c = load(
            "[sweep]\nconcurrency = 4\n[database]\npool_size = 4",
            &[("OUTBOX_RELAY_SWEEP__LIVE_CONCURRENCY", "4")],
        )
        .unwrap();
        assert_eq!(c.sweep.live_concurrency(), 4);
        let p = problems("[sweep]\nconcurrency = 2\nlive_concurrency = 3", &[]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "sweep.live_concurrency");
    }

    #[test]
    fn cluster_mode_needs_seed_nodes_and_takes_them_from_the_environment() {
        let p = problems("[redis]\nmode = \"cluster\"", &[]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "redis.cluster_urls");
        let c = load(
            "[redis]\nmode = \"cluster\"",
            &[(
                "OUTBOX_RELAY_REDIS__CLUSTER_URLS",
                "redis://10.0.0.1:7000, redis://:pw@10.0.0.2:7001",
            )],
        )
        .unwrap();
        assert_eq!(c.redis.mode, RedisMode::Cluster);
        assert_eq!(
            c.redis.cluster_urls,
            vec!["redis://10.0.0.1:7000", "redis://:pw@10.0.0.2:7001"]
        );
        assert!(!c.to_redacted_toml().contains("pw@"));
        let p = problems(
            "[redis]\nmode = \"cluster\"\ncluster_urls = [\"redis://ok:1\", \"nope://x\"]",
            &[],
        );
        assert!(p.iter().any(|p| p.key == "redis.cluster_urls[1]"), "{p:?}");
        let p = problems("[redis]\nmode = \"sharded\"", &[]);
        assert!(p.iter().any(|p| p.key.contains("redis.mode")), "{p:?}");
    }

    #[test]
    fn specific_env_beats_generic_url_variable() {
        let c = load(
            "",
            &[
                ("OUTBOX_RELAY_REDIS__URL", "redis://specific:6379"),
                ("REDIS_URL", "redis://generic:6379"),
            ],
        )
        .unwrap();
        assert_eq!(c.redis.url, "redis://specific:6379");
    }

    #[test]
    fn unknown_keys_are_named() {
        let p = problems("[sweep]\nbatchsize = 1", &[]);
        assert_eq!(p.len(), 1);
        assert!(p[0].key.starts_with("sweep"), "{p:?}");
        assert!(p[0].message.contains("batchsize"), "{p:?}");
        let p = problems("[swep]\ninterval = \"1s\"", &[]);
        assert!(p[0].message.contains("swep"), "{p:?}");
        let p = problems("", &[("OUTBOX_RELAY_SWEEP__NOPE", "1")]);
        assert!(p[0].key.contains("OUTBOX_RELAY_SWEEP__NOPE"), "{p:?}");
    }

    #[test]
    fn wrong_types_are_named() {
        let p = problems("[sweep]\nbatch_size = \"many\"", &[]);
        assert_eq!(p[0].key, "sweep.batch_size");
        let p = problems("[sweep]\ninterval = \"-5s\"", &[]);
        assert_eq!(p[0].key, "sweep.interval");
        assert!(p[0].message.contains("negative"));
        let p = problems("", &[("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "lots")]);
        assert!(p[0].key.starts_with("sweep.batch_size"));
    }

    #[test]
    fn validation_reports_every_problem() {
        let p = problems(
            "[sweep]\nbatch_size = 0\nbase_backoff = \"10s\"\nmax_backoff = \"1s\"\nmax_attempts = 0\n[log]\nformat = \"xml\"",
            &[],
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "sweep.batch_size",
                "sweep.max_backoff",
                "sweep.max_attempts",
                "log.format"
            ]
        );
    }

    #[test]
    fn sslmodes_tokio_postgres_lacks_are_named() {
        let p = problems("", &[("DATABASE_URL", "postgres://u@h/d?sslmode=verify-full")]);
        assert_eq!(p[0].key, "database.url");
        assert!(p[0].message.contains("sslmode=require"), "{p:?}");
        assert!(load("", &[("DATABASE_URL", "postgres://u@h/d?sslmode=require")]).is_ok());
        let p = problems("", &[("DATABASE_URL", "postgres://u@h/d?nonsense=1")]);
        assert!(p[0].message.starts_with("not a Postgres URL"), "{p:?}");
    }

    #[test]
    fn tls_ca_file_must_hold_certificates_and_be_asked_for() {
        let tls =
            |ca: &str, url: &str| problems("", &[("OUTBOX_RELAY_DATABASE__TLS_CA_FILE", ca), ("DATABASE_URL", url)]);
        let p = tls("/nonexistent/ca.pem", "postgres://u@h/d?sslmode=require");
        assert_eq!(p[0].key, "database.tls_ca_file");
        assert!(p[0].message.contains("/nonexistent/ca.pem"), "{p:?}");
        let junk = std::env::temp_dir().join(format!("outbox-relay-junk-{}.pem", std::process::id()));
        std::fs::write(&junk, "not a certificate\n").expect("write junk");
        let p = tls(&junk.display().to_string(), "postgres://u@h/d?sslmode=require");
        let _ = std::fs::remove_file(&junk);
        assert_eq!(p[0].key, "database.tls_ca_file");
        assert!(p[0].message.contains("no PEM certificate"), "{p:?}");
        assert!(load("", &[]).is_ok_and(|c| c.database.tls_ca_file.is_empty()));
        let p = problems(
            "",
            &[
                ("OUTBOX_RELAY_REDIS__TLS_CA_FILE", "/nonexistent/ca.pem"),
                ("REDIS_URL", "rediss://h:6380/0"),
            ],
        );
        assert_eq!(p[0].key, "redis.tls_ca_file");
        assert!(p[0].message.contains("/nonexistent/ca.pem"), "{p:?}");
    }

    #[test]
    fn negative_integers_are_rejected_by_type() {
        let p = problems("[sweep]\nbatch_size = -1", &[]);
        assert_eq!(p[0].key, "sweep.batch_size");
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact_url("postgres://user:s3cret@db:5432/x"),
            "postgres://user:***@db:5432/x"
        );
        assert_eq!(redact_url("redis://:pw@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(
            redact_url("host=db user=u password=secret"),
            "host=db user=u password=***"
        );
        let mut c = Config::default();
        c.database.url = "postgres://u:topsecret@h/d".into();
        c.redis.url = "redis://:alsosecret@h:6379".into();
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("topsecret") && !shown.contains("alsosecret"), "{shown}");
    }
}
