//! `[dead_letter]`: how long dead letters are kept, with its check.

use serde::{Deserialize, Serialize};

use super::duration::{Dur, OptDur};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// purge dead letters older than this (e.g. `30d`), in batches of 1000; `""` keeps
    /// them forever
    pub retention: OptDur,
    /// how often the retention purge runs (each round has a `sweep.tick_timeout`
    /// deadline)
    // Runs only when `retention` is set.
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

impl DeadLetterConfig {
    /// `dead_letter.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if self.retention.0.is_some_and(|d| d.is_zero()) {
            bad(
                "dead_letter.retention",
                "must be greater than 0, or \"\" to keep dead letters forever".into(),
            );
        }
        if self.purge_interval.0.is_zero() {
            bad("dead_letter.purge_interval", "must be greater than 0".into());
        }
    }
}
