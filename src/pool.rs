//! What bb8 pools share: remembering why connections fail.
//!
//! bb8 connects in the background and a waiting `get()` only ever reports
//! "timed out"; the real cause (connection refused, auth failed, a server
//! that accepts but never answers) goes to the pool's error sink.
//! [`LastError`] keeps the latest one so a failed checkout can say *why*,
//! and whether it was a timeout (a stalled service) or a refusal (a service
//! that is down), which callers report differently.

use std::fmt;
use std::sync::{Arc, Mutex};

/// The services whose connections [`opened`] counts.
pub const SERVICES: [&str; 2] = ["postgres", "redis"];

static OPENED: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// A pool opened a connection to `service` (one of [`SERVICES`]).
pub fn note_opened(service: usize) {
    OPENED[service].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Connections opened by every pool of the process, per [`SERVICES`].
pub fn opened() -> [u64; 2] {
    [0, 1].map(|i| OPENED[i].load(std::sync::atomic::Ordering::Relaxed))
}

pub const POSTGRES: usize = 0;
pub const REDIS: usize = 1;

/// Errors that can tell a timeout from other failures (each store
/// implements it for its client's error type).
pub trait FailureKind: fmt::Display {
    fn is_timeout(&self) -> bool;

    /// What an operator reads: the error and its causes.
    fn text(&self) -> String {
        self.to_string()
    }
}

/// One connection failure seen by a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFailure {
    pub text: String,
    pub timeout: bool,
}

/// The most recent connection failure of one pool (cheap to clone, shared).
#[derive(Debug, Clone, Default)]
pub struct LastError(Arc<Mutex<Option<PoolFailure>>>);

impl LastError {
    /// The latest failure, kept until a checkout succeeds ([`LastError::clear`]):
    /// while a service stays down, every failed checkout can say why.
    pub fn get(&self) -> Option<PoolFailure> {
        self.0.lock().ok().and_then(|g| g.clone())
    }

    /// A checkout succeeded: the service is back.
    pub fn clear(&self) {
        if let Ok(mut g) = self.0.lock() {
            *g = None;
        }
    }

    /// Describe a failed checkout: `timed out (Connection refused)`.
    pub fn describe<E: fmt::Display>(&self, err: &bb8::RunError<E>) -> String {
        match (err, self.get()) {
            (bb8::RunError::TimedOut, Some(cause)) => format!("timed out ({})", cause.text),
            (bb8::RunError::TimedOut, None) => "timed out".to_string(),
            (bb8::RunError::User(e), _) => e.to_string(),
        }
    }
}

impl<E: FailureKind + 'static> bb8::ErrorSink<E> for LastError {
    fn sink(&self, error: E) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(PoolFailure {
                text: error.text(),
                timeout: error.is_timeout(),
            });
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(self.clone())
    }
}

/// TCP keepalive and user timeout on every Postgres and Redis socket, so a
/// peer that vanished (a host gone, a network black hole, a failover that
/// moved the address) is noticed within about half a minute instead of the
/// kernel's two hours: a probe after 10 s idle, every 5 s, 3 unanswered
/// probes close the connection; data unacknowledged for 30 s does too. A
/// server that is frozen but whose kernel still answers (SIGSTOP) is caught
/// by the deadline every call runs under instead.
pub mod tcp {
    use std::time::Duration;

    pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
    pub const KEEPALIVE_RETRIES: u32 = 3;
    pub const USER_TIMEOUT: Duration = Duration::from_secs(30);
}
