//! `[supervisor]`: the restart budget and backoff of the actors, with
//! their check.

use serde::{Deserialize, Serialize};

use super::duration::{format_duration, Dur};

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

impl SupervisorConfig {
    /// `supervisor.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if self.max_restarts == 0 {
            bad("supervisor.max_restarts", "must be at least 1".into());
        }
        if self.restart_window.0.is_zero() {
            bad("supervisor.restart_window", "must be greater than 0".into());
        }
        if self.error_budget == 0 {
            bad("supervisor.error_budget", "must be at least 1".into());
        }
        if self.backoff_base.0.is_zero() {
            bad("supervisor.backoff_base", "must be greater than 0".into());
        }
        if self.backoff_max.0 < self.backoff_base.0 {
            bad(
                "supervisor.backoff_max",
                format!(
                    "must not be less than supervisor.backoff_base ({} < {})",
                    format_duration(self.backoff_max.0),
                    format_duration(self.backoff_base.0)
                ),
            );
        }
    }
}
