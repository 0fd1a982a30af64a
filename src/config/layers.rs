//! The layers of a configuration, lowest first: built-in defaults, the
//! TOML file, `DATABASE_URL` / `REDIS_URL`, `OUTBOX_RELAY_<SECTION>__<KEY>`.
//!
//! Hand-written on purpose (figment and config-rs were the candidates):
//! they type an environment value by its look, so
//! `OUTBOX_RELAY_REDIS__KEY_PREFIX=123` fails as "found an integer", and
//! their errors say "environment variable(s)" where ours name the variable.
//! Here each value takes the type of the key's default, and every problem
//! names the variable it came from.

use std::collections::BTreeMap;

use super::error::{ConfigError, Problem};
use super::root::Config;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// Environment variable naming the config file (same as `--config`).
pub const CONFIG_PATH_ENV: &str = "OUTBOX_RELAY_CONFIG";

/// Defaults, then the file's text (when there is one), then `env`,
/// deserialized; `path` only names the file in error messages.
pub(super) fn layered<I>(path: &str, toml_text: Option<&str>, env: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut merged =
        toml::Value::try_from(Config::default()).map_err(|e| ConfigError::one("(defaults)", e.to_string()))?;
    if let Some(text) = toml_text {
        // The error's message and position only: its Display quotes the
        // offending line, which may hold a password.
        let file: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_string(),
            message: match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("{} (line {line}, column {column})", one_line(e.message()))
                }
                None => one_line(e.message()),
            },
        })?;
        merge(&mut merged, toml::Value::Table(file));
    }
    apply_env(&mut merged, env)?;
    serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = e.path().to_string();
        // serde quotes a mistyped value, which may be a connection string.
        let message = one_line(&crate::redact::redact_text(&e.into_inner().to_string()));
        ConfigError::one(if key == "." { "(top level)".into() } else { key }, message)
    })
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
            // Without `__` it is not ours: Kubernetes injects
            // OUTBOX_RELAY_SERVICE_HOST, OUTBOX_RELAY_PORT=tcp://… and the
            // like into every pod when a Service is named outbox-relay.
            _ => var
                .strip_prefix(ENV_PREFIX)
                .and_then(|rest| rest.split_once("__"))
                .map(|(section, key)| (1, section.to_ascii_lowercase(), key.to_ascii_lowercase())),
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
