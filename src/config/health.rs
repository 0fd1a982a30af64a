//! `[health]`: the pace of the health checks, with its check.

use serde::{Deserialize, Serialize};

use super::duration::Dur;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// cadence of the `actor health` lines; the dispatch actor pings Redis when idle this
    /// long
    pub interval: Dur,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Dur::secs(10),
        }
    }
}

impl HealthConfig {
    /// `health.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if self.interval.0.is_zero() {
            bad("health.interval", "must be greater than 0".into());
        }
    }
}
