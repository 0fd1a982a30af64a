//! Supervision: starts every actor, restarts the ones that fail, and gives
//! up (exits non-zero) when restarts come too fast.
//!
//! Tree (one level, one-for-one):
//! - `DispatchActor` on its own arbiter (thread): the Redis pool and pipeline;
//! - `DeadLetterActor`: dead-letter reporting;
//! - `SweepActor`: the tick, talking to the two others only through messages;
//! - `CounterSyncActor`: running-task counters, Redis hash → `jobs`;
//! - `MetricsActor`: probes behind the Prometheus gauges.
//!
//! What actix gives: `Supervisor` re-runs `restarting()` + `started()` on an
//! actor that stopped itself, and drops its in-flight futures (so an open
//! tick transaction is dropped, i.e. rolled back). What we add here:
//! - [`Supervision::actor_failed`]: the restart-intensity limit (OTP style:
//!   at most `max_restarts` restarts in `restart_window`, across actors) and
//!   an exponential restart backoff per actor; past the limit it logs one
//!   line naming the actor and its last error and tells the process to exit;
//! - [`contain`] / [`contain_sync`]: a panic in a handler becomes an actor
//!   failure instead of a dead actor in a live-looking process;
//! - the health reporter: one `actor health` line per actor per interval.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use slog::{error, info, warn, Logger};
use tokio::sync::mpsc;

use super::counter_sync::{CounterSyncActor, CounterSyncSettings};
use super::dead_letter::{DeadLetterActor, DeadLetterSettings};
use super::dispatch::{DispatchActor, DispatchSettings};
use super::metrics::{MetricsActor, MetricsSettings};
use super::sweep::{Stop, SweepActor, SweepSettings, SweepStats, Wake};
use crate::config::{Config, SupervisorConfig};
use crate::domain::RetryPolicy;
use crate::telemetry::health::{ActorHealth, Status};
use crate::telemetry::metrics::Metrics;

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

/// What to do with an actor that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart it after this delay.
    Restart { after: Duration },
    /// Too many restarts within the window: stop the process.
    GiveUp { restarts_in_window: usize },
}

/// Recent restarts, oldest first (pure logic; time is passed in).
#[derive(Debug, Default)]
pub struct RestartLog {
    recent: VecDeque<(Instant, &'static str)>,
}

impl RestartLog {
    pub fn decide(&mut self, policy: &RestartPolicy, actor: &'static str, now: Instant) -> Decision {
        while let Some((t, _)) = self.recent.front() {
            if now.saturating_duration_since(*t) > policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= policy.max_restarts as usize {
            return Decision::GiveUp {
                restarts_in_window: self.recent.len(),
            };
        }
        let previous = self.recent.iter().filter(|(_, a)| *a == actor).count() as u32;
        let factor = 1u32.checked_shl(previous.min(31)).unwrap_or(u32::MAX);
        let after = policy
            .backoff_base
            .checked_mul(factor)
            .unwrap_or(policy.backoff_max)
            .min(policy.backoff_max);
        self.recent.push_back((now, actor));
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
    pub fn actor_failed(&self, health: &ActorHealth, error: &str) -> Option<Duration> {
        let decision = match self.restarts.lock() {
            Ok(mut log) => log.decide(&self.policy, health.name, Instant::now()),
            Err(_) => Decision::GiveUp { restarts_in_window: 0 },
        };
        match decision {
            Decision::Restart { after } => {
                health.set_restarting();
                warn!(self.log, "actor failed; restarting it with fresh state";
                    "actor" => health.name, "error" => error,
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

/// Every actor's `started`: do its work now on a first start, or after the
/// restart backoff the supervision decided when it failed.
pub fn begin_after<A>(act: &mut A, ctx: &mut Context<A>, delay: Option<Duration>, begin: fn(&mut A, &mut Context<A>))
where
    A: Actor<Context = Context<A>>,
{
    match delay {
        Some(delay) => {
            ctx.run_later(delay, begin);
        }
        None => begin(act, ctx),
    }
}

/// Text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".to_string()
    }
}

/// Run a future, turning a panic inside it into `Err(message)`.
pub async fn contain<F: Future>(fut: F) -> Result<F::Output, String> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|p| panic_message(p.as_ref()))
}

/// Run a closure, turning a panic inside it into `Err(message)`.
pub fn contain_sync<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// Handles on the running actors.
pub struct Relay {
    pub sweep: Addr<SweepActor>,
    pub dispatch: Addr<DispatchActor>,
    pub dead_letter: Addr<DeadLetterActor>,
    pub counter_sync: Addr<CounterSyncActor>,
    pub metrics: Addr<MetricsActor>,
    pub stats: Arc<SweepStats>,
    pub dead_lettered_total: Arc<AtomicU64>,
    /// Every actor's health, in a fixed order (see [`Healths::all`]).
    pub health: Arc<Vec<Arc<ActorHealth>>>,
    dispatch_arbiter: Arbiter,
    reporter: actix_rt::task::JoinHandle<()>,
    /// The LISTEN task, when `database.listen_url` is set.
    listener: Option<actix_rt::task::JoinHandle<()>>,
}

/// The health record of every actor.
#[derive(Clone)]
pub struct Healths {
    pub sweep: Arc<ActorHealth>,
    pub dispatch: Arc<ActorHealth>,
    pub dead_letter: Arc<ActorHealth>,
    pub counter_sync: Arc<ActorHealth>,
    pub metrics: Arc<ActorHealth>,
}

impl Healths {
    /// Created before the actors so the HTTP endpoint can be bound (and
    /// fail) before any work starts. Each cadence is how often the actor
    /// must succeed to stay `healthy` (see `health::STALE_CADENCES`).
    pub fn new(cfg: &Config) -> Self {
        let tick = cfg.sweep.tick_timeout.0;
        Healths {
            sweep: ActorHealth::new("SweepActor", cfg.sweep.interval.0 + tick, true),
            dispatch: ActorHealth::new("DispatchActor", cfg.health.interval.0.max(cfg.sweep.interval.0), true),
            // Event-driven unless retention runs: then it must purge every interval.
            dead_letter: ActorHealth::new(
                "DeadLetterActor",
                match cfg.dead_letter.retention.0 {
                    Some(_) => cfg.dead_letter.purge_interval.0 + tick,
                    None => Duration::MAX,
                },
                cfg.dead_letter.retention.0.is_some(),
            ),
            counter_sync: ActorHealth::new("CounterSyncActor", cfg.counter_sync.interval.0 + tick, true),
            metrics: ActorHealth::new("MetricsActor", cfg.metrics.probe_interval.0 + tick, false),
        }
    }

    /// All of them, in a fixed order (sweep, dispatch, dead letter, counter
    /// sync, metrics).
    pub fn all(&self) -> Arc<Vec<Arc<ActorHealth>>> {
        Arc::new(vec![
            self.sweep.clone(),
            self.dispatch.clone(),
            self.dead_letter.clone(),
            self.counter_sync.clone(),
            self.metrics.clone(),
        ])
    }
}

/// Start all actors and the health reporter. Must be called inside a
/// running actix `System`. The receiver yields when the process must exit.
pub fn start(
    cfg: &Config,
    healths: &Healths,
    metrics: &Metrics,
    log: &Logger,
) -> (Relay, mpsc::UnboundedReceiver<GiveUp>) {
    let (supervision, fatal) = Supervision::new(RestartPolicy::from(&cfg.supervisor), log);
    let budget = cfg.supervisor.error_budget;
    let health_interval = cfg.health.interval.0;
    let health = healths.all();
    let (sweep_health, dispatch_health, dead_letter_health) = (
        healths.sweep.clone(),
        healths.dispatch.clone(),
        healths.dead_letter.clone(),
    );

    let dispatch_arbiter = Arbiter::new();
    let dispatch_settings = DispatchSettings {
        redis: cfg.redis.clone(),
        ping_interval: health_interval,
        checkout_timeout: cfg.sweep.tick_timeout.0.max(health_interval),
        error_budget: budget,
    };
    let (dh, ds, dm, dlog) = (
        dispatch_health.clone(),
        supervision.clone(),
        metrics.clone(),
        log.clone(),
    );
    let dispatch = Supervisor::start_in_arbiter(&dispatch_arbiter.handle(), move |_| {
        DispatchActor::new(dispatch_settings, dh, ds, dm, &dlog)
    });

    let dead_lettered_total = Arc::new(AtomicU64::new(0));
    let (moved, dlh, dls, dl_log) = (
        dead_lettered_total.clone(),
        dead_letter_health.clone(),
        supervision.clone(),
        log.clone(),
    );
    let dl_settings = DeadLetterSettings {
        database_url: cfg.database.url.clone(),
        retention: cfg.dead_letter.retention.0,
        purge_interval: cfg.dead_letter.purge_interval.0,
        round_timeout: cfg.sweep.tick_timeout.0,
        error_budget: budget,
    };
    let dead_letter = Supervisor::start(move |_| DeadLetterActor::new(dl_settings, moved, dlh, dls, &dl_log));

    let stats = Arc::new(SweepStats::default());
    let settings = SweepSettings {
        database_url: cfg.database.url.clone(),
        pool_size: cfg.database.pool_size,
        batch_size: cfg.sweep.batch_size,
        interval: cfg.sweep.interval.0,
        tick_timeout: cfg.sweep.tick_timeout.0,
        key_prefix: cfg.redis.key_prefix.clone(),
        concurrency: cfg.sweep.concurrency,
        live_concurrency: cfg.sweep.live_concurrency(),
        error_budget: budget,
        retry: RetryPolicy {
            base_backoff: cfg.sweep.base_backoff.0,
            max_backoff: cfg.sweep.max_backoff.0,
            max_attempts: cfg.sweep.max_attempts,
        },
    };
    let (d, dl, st, sh, ss, sm, slog_) = (
        dispatch.clone().recipient(),
        dead_letter.clone().recipient(),
        stats.clone(),
        sweep_health.clone(),
        supervision.clone(),
        metrics.clone(),
        log.clone(),
    );
    let sweep = Supervisor::start(move |_| SweepActor::new(settings, (d, dl), st, sh, ss, sm, &slog_));

    let cs_settings = CounterSyncSettings {
        database_url: cfg.database.url.clone(),
        redis: cfg.redis.clone(),
        interval: cfg.counter_sync.interval.0,
        round_timeout: cfg.sweep.tick_timeout.0,
        error_budget: budget,
    };
    let (csh, css, cs_log) = (healths.counter_sync.clone(), supervision.clone(), log.clone());
    let skew = metrics.counter_sync_skew.clone();
    let on_skew: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |v| skew.observe(v as f64));
    let counter_sync =
        Supervisor::start(move |_| CounterSyncActor::new(cs_settings, csh, css, Some(on_skew.clone()), &cs_log));

    let m_settings = MetricsSettings {
        database_url: cfg.database.url.clone(),
        redis: cfg.redis.clone(),
        probe_interval: cfg.metrics.probe_interval.0,
        round_timeout: cfg.sweep.tick_timeout.0,
    };
    let (mm, mall, mh, ms, m_log) = (
        metrics.clone(),
        healths.all(),
        healths.metrics.clone(),
        supervision.clone(),
        log.clone(),
    );
    let metrics_actor = Supervisor::start(move |_| {
        MetricsActor::new(m_settings, mm.clone(), mall.clone(), mh.clone(), ms.clone(), &m_log)
    });

    let listener = (!cfg.database.listen_url.is_empty()).then(|| {
        let sweep = sweep.clone();
        actix_rt::spawn(crate::db::listen::listen(
            cfg.database.listen_url.clone(),
            move || sweep.do_send(Wake),
            log.new(slog::o!("actor" => "SweepActor")),
        ))
    });

    let reporter = actix_rt::spawn(report_health(health.clone(), health_interval, log.clone()));
    (
        Relay {
            sweep,
            dispatch,
            dead_letter,
            counter_sync,
            metrics: metrics_actor,
            stats,
            dead_lettered_total,
            health,
            dispatch_arbiter,
            reporter,
            listener,
        },
        fatal,
    )
}

/// One `actor health` line per actor every `interval`.
async fn report_health(health: Arc<Vec<Arc<ActorHealth>>>, interval: Duration, log: Logger) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for h in health.iter() {
            log_health(&log, h, false);
        }
    }
}

/// One health line; unhealthy states are warnings unless the process is
/// shutting down on purpose.
fn log_health(log: &Logger, h: &ActorHealth, shutting_down: bool) {
    let s = h.snapshot();
    let last_error = s.last_error.unwrap_or_default();
    if s.status == Status::Healthy || shutting_down {
        info!(log, "actor health";
            "actor" => s.actor, "status" => s.status.as_str(), "restarts" => s.restarts,
            "last_ok_ms_ago" => s.last_ok_ms_ago, "processed" => s.processed,
            "failures" => s.failures, "deadline_exceeded" => s.deadline_exceeded);
    } else {
        warn!(log, "actor health";
            "actor" => s.actor, "status" => s.status.as_str(), "restarts" => s.restarts,
            "last_ok_ms_ago" => s.last_ok_ms_ago, "processed" => s.processed,
            "failures" => s.failures, "deadline_exceeded" => s.deadline_exceeded,
            "last_error" => last_error);
    }
}

impl Relay {
    /// Let the tick in flight finish (or roll back at its deadline), then
    /// stop the dispatch arbiter; every actor ends `stopped`.
    pub async fn stop(self, log: &Logger) {
        // An error means the sweep actor is already gone: nothing in flight.
        let _ = self.sweep.send(Stop).await;
        self.dispatch_arbiter.stop();
        self.reporter.abort();
        if let Some(l) = &self.listener {
            l.abort();
        }
        for h in self.health.iter() {
            h.set_stopped();
            log_health(log, h, true);
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
        assert_eq!(ms(log.decide(&p, "A", t0)), 500);
        assert_eq!(ms(log.decide(&p, "A", t0)), 1000);
        assert_eq!(ms(log.decide(&p, "B", t0)), 500, "backoff is per actor");
        assert_eq!(ms(log.decide(&p, "A", t0)), 2000);
        assert_eq!(ms(log.decide(&p, "A", t0)), 2000, "capped");
    }

    #[test]
    fn intensity_limit_counts_every_actor_within_the_window() {
        let mut log = RestartLog::default();
        let t0 = Instant::now();
        let p = policy();
        assert!(matches!(log.decide(&p, "A", t0), Decision::Restart { .. }));
        assert!(matches!(log.decide(&p, "B", t0), Decision::Restart { .. }));
        assert!(matches!(
            log.decide(&p, "A", t0 + Duration::from_secs(1)),
            Decision::Restart { .. }
        ));
        assert_eq!(
            log.decide(&p, "C", t0 + Duration::from_secs(2)),
            Decision::GiveUp { restarts_in_window: 3 }
        );
        // Once the window has moved past the old restarts, restarts are allowed again.
        assert!(matches!(
            log.decide(&p, "A", t0 + Duration::from_secs(62)),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn panics_become_errors() {
        assert_eq!(contain_sync(|| 7), Ok(7));
        let r: Result<(), String> = contain_sync(|| panic!("boom"));
        assert_eq!(r, Err("panic: boom".to_string()));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let r = rt.block_on(contain(async { panic!("async {}", 1) }));
        assert_eq!(r, Err::<(), _>("panic: async 1".to_string()));
    }
}
