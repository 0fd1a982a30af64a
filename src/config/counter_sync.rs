//! `[counter_sync]`: the pace of the counter sync, with its check.

use serde::{Deserialize, Serialize};

use super::duration::Dur;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CounterSyncConfig {
    /// how often `{prefix}running` is copied to `jobs.running_tasks` (each round has a
    /// `sweep.tick_timeout` deadline)
    pub interval: Dur,
}

impl Default for CounterSyncConfig {
    fn default() -> Self {
        CounterSyncConfig { interval: Dur::secs(5) }
    }
}

impl CounterSyncConfig {
    /// `counter_sync.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if self.interval.0.is_zero() {
            bad("counter_sync.interval", "must be greater than 0".into());
        }
    }
}
