//! `[sweep]`: how the relay claims and retries rows (pace, batch, backoff,
//! concurrency), with the check of those values.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::database::DatabaseConfig;
use super::duration::{format_duration, Dur};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// pause between ticks that did not claim a full batch (while LISTEN hears, only
    /// after a tick that left rows due: Redis unavailable or held back, a failed tick)
    pub interval: Dur,
    /// while LISTEN hears new rows, the pause of a lane whose last tick settled every
    /// row: it only finds rows nothing announces (made due by hand, triggers disabled, a
    /// relay that died mid-tick); rows put back and rows not yet due have timers of their
    /// own
    pub listen_poll_interval: Dur,
    /// rows per tick = ZADDs per pipeline (1–100000); the Go sweeper's 500 measured
    /// slower (see "Tuning for speed")
    pub batch_size: u32,
    /// bytes one claim may take (its rows' text fields plus 128 a row; 65536–1073741824):
    /// a tick holds its rows several times over, so the claim's row limit is
    /// `max_batch_bytes` ÷ the largest recent row (rows with 50 KB paths: about 40 at a
    /// time) and the relay stays inside the Deployment's 64 MiB (`tests/memory_limit.rs`
    /// drains 300 MB of paths in a 64 MiB cgroup: 32 MiB peak, against about 600 MB and
    /// an OOM kill before). After a start the first tick measures the rows at the head of
    /// the queue (their sizes only) and sizes itself by them; with none due yet the limit
    /// begins at 64 rows and doubles with each full batch (normal rows reach `batch_size`
    /// in four ticks). One tick that meets large rows right after a run of small ones can
    /// still claim `batch_size` of them; the limit is down from the next tick, and a
    /// restart starts small again
    // Held several times over: the reply, the members, the pipeline.
    pub max_batch_bytes: u64,
    /// a tick's deadline and statement timeout (≥ 10ms)
    // Also the tick's idle-in-transaction timeout (`SET LOCAL`).
    pub tick_timeout: Dur,
    /// first retry delay, doubled per attempt
    pub base_backoff: Dur,
    /// retry delay cap (≥ `base_backoff`)
    pub max_backoff: Dur,
    /// failed attempts before a row is dead-lettered (≥ 1)
    // Dead-lettered: moved to `task_outbox_dead`.
    pub max_attempts: u32,
    /// ticks run at once, each with its own batch and connection (1–64, ≤
    /// `database.pool_size`); two keep Postgres and Redis busy together
    pub concurrency: u32,
    /// drain ticks run at once while new rows keep arriving (a wake-up in the last
    /// second); `0` = half of `concurrency`, rounded up; `concurrency` = always drain at
    /// full speed (see "Tuning for speed")
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
