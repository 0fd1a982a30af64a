//! What goes wrong: one [`Problem`] per bad key, and the [`ConfigError`]
//! a load returns (an unreadable file, bad TOML, or the problems).

use std::fmt;

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
