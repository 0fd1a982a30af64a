//! `[sweep]`: how the relay claims and retries rows (pace, batch, backoff,
//! concurrency), with the check of those values.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::database::DatabaseConfig;
use super::duration::{format_duration, Dur};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Pause between ticks when the last tick did not claim a full batch.
    pub interval: Dur,
    /// While the listener hears new rows (LISTEN/NOTIFY), the pause of a
    /// lane whose last tick settled every row: new rows are announced, and
    /// rows put back or not yet due have timers of their own; this poll
    /// only finds what nothing announces (rows made due by hand, a trigger
    /// disabled, a relay that died mid-tick).
    pub listen_poll_interval: Dur,
    /// Rows claimed per tick (and ZADDs per pipeline).
    pub batch_size: u32,
    /// What one tick may claim in bytes (its rows' text fields, plus 128 a
    /// row): a tick holds its rows several times over (the reply, the
    /// members, the pipeline), so large rows (50 KB paths) are claimed
    /// fewer at a time and the relay stays inside its memory limit.
    pub max_batch_bytes: u64,
    /// The tick's deadline; also its statement and idle-in-transaction timeout.
    pub tick_timeout: Dur,
    /// First retry delay; doubles with every failed attempt.
    pub base_backoff: Dur,
    /// Cap of the retry delay.
    pub max_backoff: Dur,
    /// Failed attempts after which a row moves to `task_outbox_dead`.
    pub max_attempts: u32,
    /// Ticks one process runs at once, each with its own batch.
    pub concurrency: u32,
    /// Drain ticks run at once while new rows keep arriving (a wake-up in
    /// the last second); 0: half of `concurrency`, rounded up.
    pub live_concurrency: u32,
}

impl SweepConfig {
    /// `live_concurrency`, with 0 resolved to its default.
    pub fn live_concurrency(&self) -> u32 {
        match self.live_concurrency {
            0 => self.concurrency.div_ceil(2),
            n => n,
        }
    }
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            interval: Dur::millis(500),
            listen_poll_interval: Dur::secs(5),
            // Measured (docs/BENCHMARKS.md, session 9): the Go sweeper's 500
            // and 1 left a third of one Postgres connection's speed unused;
            // 1000 rows per tick and two ticks in flight (one in Postgres
            // while the other is in Redis) drain at about the 1-connection
            // floor, with live rows still served first by the fresh lane.
            batch_size: 1000,
            // 2 MiB: a normal batch (1000 rows of a few hundred bytes) is a
            // tenth of it; with two ticks in flight a batch of large rows
            // keeps the relay well inside the Deployment's 64 MiB.
            max_batch_bytes: 2 * 1024 * 1024,
            tick_timeout: Dur::secs(5),
            base_backoff: Dur::secs(2),
            max_backoff: Dur::secs(300),
            max_attempts: 10,
            concurrency: 2,
            live_concurrency: 0,
        }
    }
}

impl SweepConfig {
    /// `sweep.*`; `database` because each concurrent tick holds one of its
    /// pool's connections.
    pub(super) fn check(&self, database: &DatabaseConfig, bad: &mut impl FnMut(&str, String)) {
        if self.interval.0.is_zero() {
            bad("sweep.interval", "must be greater than 0".into());
        }
        if self.listen_poll_interval.0.is_zero() {
            bad("sweep.listen_poll_interval", "must be greater than 0".into());
        }
        if !(1..=100_000).contains(&self.batch_size) {
            bad(
                "sweep.batch_size",
                format!("must be between 1 and 100000 (got {})", self.batch_size),
            );
        }
        if !(65_536..=1 << 30).contains(&self.max_batch_bytes) {
            bad(
                "sweep.max_batch_bytes",
                format!("must be between 65536 and 1073741824 (got {})", self.max_batch_bytes),
            );
        }
        if self.tick_timeout.0 < Duration::from_millis(10) {
            bad(
                "sweep.tick_timeout",
                format!("must be at least 10ms (got {})", format_duration(self.tick_timeout.0)),
            );
        }
        if self.base_backoff.0.is_zero() {
            bad("sweep.base_backoff", "must be greater than 0".into());
        }
        if self.max_backoff.0 < self.base_backoff.0 {
            bad(
                "sweep.max_backoff",
                format!(
                    "must not be less than sweep.base_backoff ({} < {})",
                    format_duration(self.max_backoff.0),
                    format_duration(self.base_backoff.0)
                ),
            );
        }
        if self.max_attempts == 0 {
            bad("sweep.max_attempts", "must be at least 1".into());
        }
        if !(1..=64).contains(&self.concurrency) {
            bad(
                "sweep.concurrency",
                format!("must be between 1 and 64 (got {})", self.concurrency),
            );
        } else if self.concurrency > database.pool_size {
            bad(
                "sweep.concurrency",
                format!(
                    "{} concurrent ticks need database.pool_size >= {} (got {})",
                    self.concurrency, self.concurrency, database.pool_size
                ),
            );
        }
        if self.live_concurrency > self.concurrency {
            bad(
                "sweep.live_concurrency",
                format!(
                    "must be 0 (half of sweep.concurrency) or at most sweep.concurrency ({}) (got {})",
                    self.concurrency, self.live_concurrency
                ),
            );
        }
    }
}
