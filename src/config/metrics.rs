//! `[metrics]`: the labels of every metric and the probe pace, with their
//! check.

use serde::{Deserialize, Serialize};

use super::duration::Dur;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// constant label `app` on every metric
    pub app: String,
    /// constant label `environment` on every metric
    pub environment: String,
    /// cadence of the backlog / dead-letter / Redis probes (each with a deadline: the
    /// interval or `sweep.tick_timeout`, whichever is shorter). The outbox count walks
    /// the table, so a count that took `d` skips the rounds of the next 20 `d` (at most
    /// 60 s; about 1 s for 5,000,000 rows here, so such a table is counted every 20 s);
    /// the Redis ping runs every round
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
