//! What a tick needs, fixed for the actor's life ([`SweepSettings`]), and
//! what a tick is for ([`Lane`]).

use std::sync::Arc;
use std::time::Duration;

use crate::db::schema::{ClaimMode, Schema};
use crate::domain::RetryPolicy;

/// How long a commit may run past the deadline. The outcome of a commit cut
/// short is unknown, and both outcomes are safe (ZADD is idempotent), so a
/// short grace beats abandoning a commit that is about to succeed.
pub(super) const COMMIT_GRACE: Duration = Duration::from_secs(1);

/// What a tick needs, fixed for the actor's life.
#[derive(Clone, Debug)]
pub struct SweepSettings {
    pub database_url: String,
    pub pool_size: u32,
    pub batch_size: u32,
    /// `sweep.max_batch_bytes`: what one tick may claim (see
    /// [`crate::domain::ClaimLimit`]).
    pub max_batch_bytes: u64,
    pub interval: Duration,
    /// `sweep.listen_poll_interval`: how often an idle lane claims while
    /// the listener hears new rows (they are announced; a poll only looks
    /// for what no notification announces).
    pub listen_poll: Duration,
    pub tick_timeout: Duration,
    pub key_prefix: String,
    /// Ticks run at once, each with its own claimed batch and connection.
    pub concurrency: u32,
    /// Drain ticks run at once while new rows keep arriving: fewer drain
    /// ticks leave CPU for the fresh lane (latency) at some cost to how
    /// fast a backlog drains meanwhile. A backlog with no new rows drains
    /// with all `concurrency` lanes.
    pub live_concurrency: u32,
    /// Consecutive failed ticks after which the actor is restarted.
    pub error_budget: u32,
    pub retry: RetryPolicy,
    /// The id column types, read from the catalog at start (UUID or TEXT:
    /// the Go sweeper's database mixes them).
    pub schema: Arc<Schema>,
    /// Set when `task_outbox` changed under the relay (a column added, a
    /// type changed, INSERT revoked, a foreign key added) or a put-back
    /// failed: every later tick claims by locking, until the process
    /// restarts and reads the catalog again. Shared by the lanes, kept
    /// across actor restarts.
    pub claim_fallback: Arc<ClaimFallback>,
    /// `journal.keep` is set: each tick records what it delivered, in
    /// slots this many seconds wide ([`crate::domain::journal::slot_width`]).
    pub journal_width: Option<i64>,
}

/// Why delete claims stopped (see [`SweepSettings::claim_fallback`]).
#[derive(Debug, Default)]
pub struct ClaimFallback(std::sync::Mutex<Option<String>>);

impl ClaimFallback {
    /// Fall back for `why`; true only the first time (one warning line).
    pub fn set(&self, why: String) -> bool {
        match self.0.lock() {
            Ok(mut g) if g.is_none() => {
                *g = Some(why);
                true
            }
            _ => false,
        }
    }

    /// The claim mode in force given the one read at start.
    pub fn mode(&self, at_start: &ClaimMode) -> ClaimMode {
        match self.0.lock().ok().and_then(|g| g.clone()) {
            Some(why) => ClaimMode::Lock(why),
            None => at_start.clone(),
        }
    }
}

/// Rows a fresh-lane tick claims at most.
pub const FRESH_BATCH: u32 = 20;

/// What a tick is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// One of the `sweep.concurrency` lanes: oldest rows first, full batches,
    /// reschedules itself.
    Drain,
    /// A one-off tick started by a wake-up while every lane is busy: the
    /// newest rows first, so a just-committed row does not wait behind a
    /// backlog.
    Fresh,
}

impl Lane {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Drain => "drain",
            Lane::Fresh => "fresh",
        }
    }
}
