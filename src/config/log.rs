//! `[log]`: the log format and level, with their check.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`
    // `text` is for terminals.
    pub format: String,
    /// `critical`, `error`, `warning`, `info`, `debug`, `trace`
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

impl LogConfig {
    /// `log.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if !matches!(self.format.as_str(), "json" | "text") {
            bad(
                "log.format",
                format!("{:?} is not one of \"json\", \"text\"", self.format),
            );
        }
        if parse_level(&self.level).is_none() {
            bad(
                "log.level",
                format!(
                    "{:?} is not one of critical, error, warning, info, debug, trace",
                    self.level
                ),
            );
        }
    }
}
