//! Configuration: one TOML file, layered under environment overrides.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`--config`),
//! `DATABASE_URL` / `REDIS_URL`, then `OUTBOX_RELAY_<SECTION>__<KEY>`.
//! Every section denies unknown keys, so a typo is an error rather than a
//! silently ignored setting. [`Config::validate`] reports *every* problem at
//! once, each naming its key, and runs before any actor starts.
//!
//! Files, leaves first: `error` and `duration` are the shared types; one
//! file per section (`database`, `redis`, `sweep`, `counter_sync`,
//! `dead_letter`, `journal`, `supervisor`, `health`, `http`, `console`, `metrics`,
//! `log`) holds its struct, its defaults and its own `check`; `root` is the
//! whole [`Config`] and its redacted form; `layers` merges defaults, file
//! and environment; `validate` runs the sections' checks in order; `load`
//! is the loading API. This file only declares and re-exports them.
//!
//! Secrets: [`Config::to_redacted_toml`] (passwords hidden by
//! [`crate::redact`]) is what `check-config` prints and what logs may show.

mod console;
mod counter_sync;
mod database;
mod dead_letter;
mod duration;
mod error;
mod health;
mod http;
mod journal;
mod layers;
mod load;
mod log;
mod metrics;
mod redis;
mod root;
mod supervisor;
mod sweep;
mod validate;

pub use self::console::{ConsoleConfig, DEFAULT_CONSOLE_LISTEN};
pub use self::counter_sync::CounterSyncConfig;
pub use self::database::{DatabaseConfig, LISTEN_AUTO};
pub use self::dead_letter::DeadLetterConfig;
pub use self::duration::{format_duration, parse_duration, Dur, OptDur};
pub use self::error::{ConfigError, Problem};
pub use self::health::HealthConfig;
pub use self::http::HttpConfig;
pub use self::journal::JournalConfig;
pub use self::layers::{CONFIG_PATH_ENV, ENV_PREFIX};
pub use self::log::{parse_level, LogConfig};
pub use self::metrics::MetricsConfig;
pub use self::redis::{RedisConfig, RedisMode};
pub use self::root::Config;
pub use self::supervisor::SupervisorConfig;
pub use self::sweep::SweepConfig;

/// The config file used when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";

#[cfg(test)]
mod tests;
