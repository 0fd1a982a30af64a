//! `[metrics]`: the labels of every metric and the probe pace, with their
//! check.

use serde::{Deserialize, Serialize};

use super::duration::Dur;

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

impl MetricsConfig {
    /// `metrics.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if self.app.trim().is_empty() {
            bad("metrics.app", "must not be empty".into());
        }
        if self.environment.trim().is_empty() {
            bad("metrics.environment", "must not be empty".into());
        }
        if self.probe_interval.0.is_zero() {
            bad("metrics.probe_interval", "must be greater than 0".into());
        }
    }
}
