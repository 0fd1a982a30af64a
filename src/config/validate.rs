//! Validation: every problem with the values, each naming its key, found
//! at once (an operator fixes a config in one round, not one per restart).
//!
//! Each section checks its own keys (`fn check` in its file); this runs
//! them in a fixed order, so the problems (and the first of them) are
//! always listed in the same order.

use super::error::Problem;
use super::root::Config;

impl Config {
    /// Every problem with the values, each naming its key. Empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        self.database.check(&mut bad);
        self.redis.check(&mut bad);
        self.sweep.check(&self.database, &mut bad);
        self.dead_letter.check(&mut bad);
        self.journal.check(&mut bad);
        self.counter_sync.check(&mut bad);
        self.supervisor.check(&mut bad);
        self.health.check(&mut bad);
        self.http.check(&mut bad);
        self.console.check(&self.http, &mut bad);
        self.metrics.check(&mut bad);
        self.log.check(&mut bad);
        p
    }
}
