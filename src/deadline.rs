//! Deadlines: one absolute instant per tick, carried in every message.
//!
//! A tick creates its [`Deadline`] once; every hop (pool checkout, query,
//! pipeline, mailbox) gets only the time that is left, through
//! [`Deadline::run`], and Postgres gets it as `SET LOCAL statement_timeout`
//! through [`Deadline::pg_timeout`]. Work whose deadline has passed is
//! abandoned with [`Expired`], which names the stage that ran out.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long start-up checks (and one-shot commands) may wait for a service.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The instant by which a unit of work must be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

/// A deadline ran out during `stage` (for example `"pool get"` or `"pipeline"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline exceeded during {stage}")]
pub struct Expired {
    pub stage: &'static str,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Deadline(Instant::now() + budget)
    }

    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left, zero once passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn expired(self) -> bool {
        Instant::now() >= self.0
    }

    /// Fail with [`Expired`] naming `stage` if the deadline has passed.
    pub fn check(self, stage: &'static str) -> Result<(), Expired> {
        if self.expired() {
            Err(Expired { stage })
        } else {
            Ok(())
        }
    }

    /// The time left as a Postgres interval literal (`'1234ms'`), at least 1ms
    /// because `0` means "no timeout" to Postgres.
    pub fn pg_timeout(self) -> String {
        format!("{}ms", self.remaining().as_millis().max(1))
    }

    /// Run `fut` until it finishes or the deadline passes.
    pub async fn run<F: Future>(self, stage: &'static str, fut: F) -> Result<F::Output, Expired> {
        self.check(stage)?;
        tokio::time::timeout_at(self.0, fut)
            .await
            .map_err(|_| Expired { stage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remaining_shrinks_and_expires() {
        let d = Deadline::after(Duration::from_millis(300));
        assert_eq!(d.pg_timeout(), "300ms");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(d.remaining(), Duration::from_millis(100));
        assert!(d.check("claim").is_ok());
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(d.expired());
        assert_eq!(d.pg_timeout(), "1ms");
        assert_eq!(d.check("claim"), Err(Expired { stage: "claim" }));
    }

    #[tokio::test(start_paused = true)]
    async fn run_times_out_naming_the_stage() {
        let d = Deadline::after(Duration::from_millis(50));
        let slow = tokio::time::sleep(Duration::from_secs(10));
        assert_eq!(d.run("pipeline", slow).await, Err(Expired { stage: "pipeline" }));
        let d = Deadline::after(Duration::from_millis(50));
        assert_eq!(d.run("query", async { 7 }).await, Ok(7));
    }
}
