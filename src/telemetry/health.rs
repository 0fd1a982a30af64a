//! Actor health: what each actor reports about itself, readable without
//! going through its mailbox (a mailbox can be busy with a long tick, or
//! gone with a dead actor — exactly when health matters most).
//!
//! Each actor owns one [`ActorHealth`] (shared through an `Arc`, surviving
//! restarts) and records successes, failures, deadline drops and restarts.
//! [`ActorHealth::snapshot`] turns that into a [`Status`]:
//!
//! - `stopped`: the actor is not running (shut down, or the process gave up);
//! - `restarting`: it failed and waits out its restart backoff;
//! - `degraded`: running, but its last unit of work failed, or it has not
//!   succeeded for [`STALE_CADENCES`] of its cadences;
//! - `healthy`: otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// An actor is `degraded` after this many cadences without a success.
pub const STALE_CADENCES: u32 = 3;

/// An actor is wedged after this many cadences without any sign of work:
/// no success, no failure, no deadline, no heartbeat. An actor whose
/// dependency is down still fails on its cadence; one that does nothing at
/// all is stuck in the relay's own code (see `actors::watchdog`).
pub const WEDGE_CADENCES: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Restarting,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Restarting => "restarting",
            Status::Stopped => "stopped",
        }
    }
}

const RUNNING: u8 = 0;
const RESTARTING: u8 = 1;
const STOPPED: u8 = 2;

/// Live health facts of one actor.
#[derive(Debug)]
pub struct ActorHealth {
    pub name: &'static str,
    /// A success is expected at least this often (its tick or probe cadence).
    cadence: Duration,
    lifecycle: AtomicU8,
    restarts: AtomicU64,
    processed: AtomicU64,
    failures: AtomicU64,
    consecutive_failures: AtomicU64,
    deadline_exceeded: AtomicU64,
    /// The actor has reached its service at least once (for /readyz).
    connected: AtomicBool,
    /// Whether readiness waits for this actor to connect.
    needs_connection: bool,
    last_ok: Mutex<Instant>,
    /// Last sign of work of any kind (success, failure, deadline, heartbeat).
    last_activity: Mutex<Instant>,
    last_error: Mutex<Option<String>>,
}

/// A point-in-time copy, as logged and served on /healthz.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthSnapshot {
    pub actor: &'static str,
    pub status: Status,
    pub restarts: u64,
    pub last_ok_ms_ago: u64,
    pub processed: u64,
    pub failures: u64,
    pub deadline_exceeded: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl ActorHealth {
    /// `needs_connection`: the actor talks to a service, and the relay is
    /// not ready until it has reached it once.
    pub fn new(name: &'static str, cadence: Duration, needs_connection: bool) -> Arc<Self> {
        Arc::new(ActorHealth {
            name,
            cadence,
            needs_connection,
            lifecycle: AtomicU8::new(RUNNING),
            restarts: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            deadline_exceeded: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            last_ok: Mutex::new(Instant::now()),
            last_activity: Mutex::new(Instant::now()),
            last_error: Mutex::new(None),
        })
    }

    /// A unit of work succeeded.
    pub fn ok(&self) {
        self.processed.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        if let Ok(mut t) = self.last_ok.lock() {
            *t = Instant::now();
        }
        self.active();
    }

    fn active(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    /// The actor is alive and on its cadence, with no unit of work to
    /// report (an event-driven actor's heartbeat): keeps it from going stale.
    pub fn alive(&self) {
        if let Ok(mut t) = self.last_ok.lock() {
            *t = Instant::now();
        }
        self.active();
    }

    /// A unit of work failed; returns the length of the failure streak.
    pub fn failed(&self, error: &str) -> u64 {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.active();
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error.to_string());
        }
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Work was abandoned or dropped because its deadline passed.
    pub fn deadline_exceeded(&self) {
        self.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
        self.active();
    }

    pub fn needs_connection(&self) -> bool {
        self.needs_connection
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_restarting(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.lifecycle.store(RESTARTING, Ordering::Relaxed);
    }

    /// Back at work after a (re)start: the staleness clock starts afresh.
    pub fn set_running(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if let Ok(mut t) = self.last_ok.lock() {
            *t = Instant::now();
        }
        self.active();
        self.lifecycle.store(RUNNING, Ordering::Relaxed);
    }

    pub fn set_stopped(&self) {
        self.lifecycle.store(STOPPED, Ordering::Relaxed);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// How long a running actor has shown no sign of work, once that is
    /// [`WEDGE_CADENCES`] of its cadences or more; `None` otherwise (and
    /// while it restarts or is stopped).
    pub fn wedged_for(&self, now: Instant) -> Option<Duration> {
        if self.lifecycle.load(Ordering::Relaxed) != RUNNING {
            return None;
        }
        let silent = self
            .last_activity
            .lock()
            .map(|t| now.saturating_duration_since(*t))
            .ok()?;
        (silent >= self.wedge_limit()).then_some(silent)
    }

    /// The silence after which the actor counts as wedged.
    pub fn wedge_limit(&self) -> Duration {
        self.cadence.saturating_mul(WEDGE_CADENCES)
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> HealthSnapshot {
        let since_ok = self
            .last_ok
            .lock()
            .map(|t| now.saturating_duration_since(*t))
            .unwrap_or_default();
        let status = match self.lifecycle.load(Ordering::Relaxed) {
            STOPPED => Status::Stopped,
            RESTARTING => Status::Restarting,
            _ if self.consecutive_failures.load(Ordering::Relaxed) > 0 => Status::Degraded,
            _ if self
                .cadence
                .checked_mul(STALE_CADENCES)
                .is_some_and(|limit| since_ok > limit) =>
            {
                Status::Degraded
            }
            _ => Status::Healthy,
        };
        HealthSnapshot {
            actor: self.name,
            status,
            restarts: self.restarts.load(Ordering::Relaxed),
            last_ok_ms_ago: since_ok.as_millis() as u64,
            processed: self.processed.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            deadline_exceeded: self.deadline_exceeded.load(Ordering::Relaxed),
            last_error: if status == Status::Healthy {
                None
            } else {
                self.last_error()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_lifecycle() {
        let h = ActorHealth::new("T", Duration::from_secs(60), true);
        assert_eq!(h.snapshot().status, Status::Healthy);
        assert_eq!(h.failed("boom"), 1);
        assert_eq!(h.failed("boom again"), 2);
        let s = h.snapshot();
        assert_eq!(s.status, Status::Degraded);
        assert_eq!(s.last_error.as_deref(), Some("boom again"));
        h.set_restarting();
        assert_eq!(h.snapshot().status, Status::Restarting);
        assert_eq!(h.snapshot().restarts, 1);
        h.set_running();
        assert_eq!(h.snapshot().status, Status::Healthy);
        h.ok();
        let s = h.snapshot();
        assert_eq!((s.processed, s.failures, s.last_error), (1, 2, None));
        assert!(h.connected());
        h.set_stopped();
        assert_eq!(h.snapshot().status, Status::Stopped);
    }

    #[test]
    fn silence_of_five_cadences_is_a_wedge_but_failing_is_not() {
        let h = ActorHealth::new("T", Duration::from_secs(1), true);
        let now = Instant::now();
        assert_eq!(h.wedged_for(now + Duration::from_millis(4900)), None);
        assert!(h.wedged_for(now + Duration::from_millis(5100)).is_some());
        // Failing on its cadence (a dependency is down) is a sign of work.
        h.failed("redis down");
        let now = Instant::now();
        assert_eq!(h.wedged_for(now + Duration::from_millis(4900)), None);
        // Restarting or stopped actors are not wedged, however long.
        h.set_restarting();
        assert_eq!(h.wedged_for(now + Duration::from_secs(60)), None);
        h.set_stopped();
        assert_eq!(h.wedged_for(now + Duration::from_secs(60)), None);
    }

    #[test]
    fn no_success_for_three_cadences_is_degraded() {
        let h = ActorHealth::new("T", Duration::from_secs(10), true);
        let now = Instant::now();
        assert_eq!(h.snapshot_at(now + Duration::from_secs(29)).status, Status::Healthy);
        let late = h.snapshot_at(now + Duration::from_secs(31));
        assert_eq!(late.status, Status::Degraded);
        assert!(late.last_ok_ms_ago >= 31_000);
    }
}
