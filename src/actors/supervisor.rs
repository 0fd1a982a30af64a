//! Supervision decisions: when a failed actor restarts, and when the
//! process gives up.
//!
//! actix's `Supervisor` re-runs `restarting()` + `started()` on an actor
//! that stopped itself, and drops its in-flight futures. It has no restart
//! count, window or backoff; [`Supervision::actor_failed`] adds them, OTP
//! style: at most `max_restarts` restarts in `restart_window`, across
//! actors, each actor's restart delayed by an exponential backoff. Past the
//! limit it logs one line naming the actor and its last error and tells
//! the process to exit (see `app::run`). How an actor reaches this point
//! is [`super::lifecycle`]; which actors exist is [`super::tree`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slog::{error, warn, Logger};
use tokio::sync::mpsc;

use crate::config::SupervisorConfig;
use crate::telemetry::health::ActorHealth;

/// The restart-intensity and backoff rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl From<&SupervisorConfig> for RestartPolicy {
    fn from(c: &SupervisorConfig) -> Self {
        RestartPolicy {
            max_restarts: c.max_restarts,
            window: c.restart_window.0,
            backoff_base: c.backoff_base.0,
            backoff_max: c.backoff_max.0,
        }
    }
}

/// Whose fault a failure is. Only the relay's own faults count toward the
/// restart intensity: a dependency that is down, refusing or stalled makes
/// actors restart (fresh connections can help) and stay `degraded`, but it
/// must never make the process exit, since a crash loop would only add the
/// container runtime's back-off to the recovery (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A panic, an actor that cannot start: the relay's own fault.
    Own,
    /// Postgres or Redis failing the actor's work (error budget spent,
    /// connection lost): restart with backoff, never give up.
    Dependency,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Own => "own",
            Cause::Dependency => "dependency",
        }
    }
}

/// What to do with an actor that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart it after this delay.
    Restart { after: Duration },
    /// Too many restarts within the window: stop the process.
    GiveUp { restarts_in_window: usize },
}

/// Recent restarts, oldest first, with their cause (pure logic; time is
/// passed in).
#[derive(Debug, Default)]
pub struct RestartLog {
    recent: VecDeque<(Instant, &'static str, Cause)>,
}

impl RestartLog {
    /// Every restart in the window makes the actor's next one wait longer;
    /// only [`Cause::Own`] restarts count toward `max_restarts`.
    pub fn decide(&mut self, policy: &RestartPolicy, actor: &'static str, cause: Cause, now: Instant) -> Decision {
        while let Some((t, _, _)) = self.recent.front() {
            if now.saturating_duration_since(*t) > policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        let own = self.recent.iter().filter(|(_, _, c)| *c == Cause::Own).count();
        if cause == Cause::Own && own >= policy.max_restarts as usize {
            return Decision::GiveUp {
                restarts_in_window: own,
            };
        }
        let previous = self.recent.iter().filter(|(_, a, _)| *a == actor).count() as u32;
        let factor = 1u32.checked_shl(previous.min(31)).unwrap_or(u32::MAX);
        let after = policy
            .backoff_base
            .checked_mul(factor)
            .unwrap_or(policy.backoff_max)
            .min(policy.backoff_max);
        self.recent.push_back((now, actor, cause));
        Decision::Restart { after }
    }
}

/// The process must stop: an actor exceeded the restart intensity.
#[derive(Debug, Clone)]
pub struct GiveUp {
    pub actor: &'static str,
    pub error: String,
}

/// Shared by every actor: where failures are reported and decided.
#[derive(Clone)]
pub struct Supervision {
    policy: RestartPolicy,
    restarts: Arc<Mutex<RestartLog>>,
    given_up: Arc<AtomicBool>,
    fatal: mpsc::UnboundedSender<GiveUp>,
    log: Logger,
}

impl Supervision {
    pub fn new(policy: RestartPolicy, log: &Logger) -> (Self, mpsc::UnboundedReceiver<GiveUp>) {
        let (fatal, rx) = mpsc::unbounded_channel();
        (
            Supervision {
                policy,
                restarts: Arc::new(Mutex::new(RestartLog::default())),
                given_up: Arc::new(AtomicBool::new(false)),
                fatal,
                log: log.clone(),
            },
            rx,
        )
    }

    /// The process is giving up: actors must not start work again.
    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Relaxed)
    }

    /// An actor failed with `error`. Returns the restart delay, or `None`
    /// when the restart intensity is exceeded (the process will exit).
    /// The caller then stops its context so actix restarts it.
    pub fn actor_failed(&self, health: &ActorHealth, error: &str, cause: Cause) -> Option<Duration> {
        let decision = match self.restarts.lock() {
            Ok(mut log) => log.decide(&self.policy, health.name, cause, Instant::now()),
            Err(_) => Decision::GiveUp { restarts_in_window: 0 },
        };
        match decision {
            Decision::Restart { after } => {
                health.set_restarting();
                warn!(self.log, "actor failed; restarting it with fresh state";
                    "actor" => health.name, "error" => error,
                    "cause" => cause.as_str(),
                    "restart_in_ms" => after.as_millis() as u64,
                    "restarts" => health.snapshot().restarts);
                Some(after)
            }
            Decision::GiveUp { restarts_in_window } => {
                health.set_stopped();
                if !self.given_up.swap(true, Ordering::Relaxed) {
                    error!(self.log, "restart intensity exceeded; exiting so the process can be restarted";
                        "actor" => health.name, "last_error" => error,
                        "restarts_in_window" => restarts_in_window,
                        "max_restarts" => self.policy.max_restarts,
                        "restart_window_ms" => self.policy.window.as_millis() as u64);
                    let _ = self.fatal.send(GiveUp {
                        actor: health.name,
                        error: error.to_string(),
                    });
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
        }
    }

    #[test]
    fn backoff_doubles_per_actor_and_caps() {
        let mut log = RestartLog::default();
        let t0 = Instant::now();
        let p = RestartPolicy {
            max_restarts: 10,
            ..policy()
        };
        let ms = |d: Decision| match d {
            Decision::Restart { after } => after.as_millis(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ms(log.decide(&p, "A", Cause::Own, t0)), 500);
        assert_eq!(ms(log.decide(&p, "A", Cause::Own, t0)), 1000);
        assert_eq!(ms(log.decide(&p, "B", Cause::Own, t0)), 500, "backoff is per actor");
        assert_eq!(ms(log.decide(&p, "A", Cause::Own, t0)), 2000);
        assert_eq!(ms(log.decide(&p, "A", Cause::Own, t0)), 2000, "capped");
    }

    #[test]
    fn intensity_limit_counts_every_actor_within_the_window() {
        let mut log = RestartLog::default();
        let t0 = Instant::now();
        let p = policy();
        assert!(matches!(log.decide(&p, "A", Cause::Own, t0), Decision::Restart { .. }));
        assert!(matches!(log.decide(&p, "B", Cause::Own, t0), Decision::Restart { .. }));
        assert!(matches!(
            log.decide(&p, "A", Cause::Own, t0 + Duration::from_secs(1)),
            Decision::Restart { .. }
        ));
        assert_eq!(
            log.decide(&p, "C", Cause::Own, t0 + Duration::from_secs(2)),
            Decision::GiveUp { restarts_in_window: 3 }
        );
        // Once the window has moved past the old restarts, restarts are allowed again.
        assert!(matches!(
            log.decide(&p, "A", Cause::Own, t0 + Duration::from_secs(62)),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn dependency_restarts_back_off_but_never_give_up() {
        let mut log = RestartLog::default();
        let t0 = Instant::now();
        let p = policy();
        let mut last = Duration::ZERO;
        for i in 0..50 {
            match log.decide(&p, "SweepActor", Cause::Dependency, t0 + Duration::from_millis(i * 100)) {
                Decision::Restart { after } => last = after,
                other => panic!("a dependency outage gave up: {other:?}"),
            }
        }
        assert_eq!(last, p.backoff_max, "the backoff still grows to its cap");
        // They do not use up the budget for the relay's own faults either.
        assert!(matches!(
            log.decide(&p, "DispatchActor", Cause::Own, t0 + Duration::from_secs(6)),
            Decision::Restart { .. }
        ));
    }
}
