//! `[supervisor]`: the restart budget and backoff of the actors, with
//! their check.

use serde::{Deserialize, Serialize};

use super::duration::{format_duration, Dur};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// actor restarts (all actors together) allowed within `restart_window`; one more and
    /// the process exits 1
    pub max_restarts: u32,
    /// the window of `max_restarts`
    pub restart_window: Dur,
    /// consecutive failed ticks / batches / pings after which an actor is restarted
    // Restarted with fresh state (new connections).
    pub error_budget: u32,
    /// delay before an actor's first restart, doubled per further restart within the
    /// window
    // Doubles per further restart of that same actor.
    pub backoff_base: Dur,
    /// cap of the restart delay (≥ `backoff_base`)
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
