//! The supervision tree (one level, one-for-one): starts every actor under
//! actix's `Supervisor` with its settings from the config, wires their
//! addresses, and runs the health reporter. [`Relay`] is the handle the
//! run loop keeps; [`Relay::stop`] ends it in order.
//!
//! - `DispatchActor` on its own arbiter (thread): the Redis pool and
//!   pipeline, so pipeline I/O overlaps with the sweep's Postgres work;
//! - `DeadLetterActor`: dead-letter reporting and retention;
//! - `SweepActor`: the tick, talking to the two others only through messages;
//! - `CounterSyncActor`: running-task counters, Redis hash → `jobs`;
//! - `MetricsActor`: probes behind the Prometheus gauges;
//! - `JournalActor`: watches Redis for lost data, writes lost entries again
//!   from the delivery journal, and keeps the journal to `journal.keep`;
//! - the LISTEN task (unless `database.listen_url` is `"off"`), which wakes the sweep.
//!
//! Adding an actor: its file implements [`super::lifecycle::Lifecycle`];
//! give it an [`ActorHealth`] in [`Healths`] and start it in [`start`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{info, warn, Logger};
use tokio::sync::mpsc;

use super::counter_sync::{CounterSyncActor, CounterSyncSettings};
use super::dead_letter::{DeadLetterActor, DeadLetterSettings};
use super::dispatch::{DispatchActor, DispatchSettings};
use super::journal::{JournalActor, JournalSettings};
use super::metrics::{MetricsActor, MetricsSettings};
use super::supervisor::{GiveUp, RestartPolicy, Supervision};
use super::sweep::{Stop, SweepActor, SweepSettings, SweepStats, Waker};
use super::watchdog::{self, Watched};
use crate::config::Config;
use crate::db::schema::Schema;
use crate::domain::RetryPolicy;
use crate::telemetry::health::{ActorHealth, Status};
use crate::telemetry::metrics::Metrics;

/// Handles on the running actors.
pub struct Relay {
    pub sweep: Addr<SweepActor>,
    pub dispatch: Addr<DispatchActor>,
    pub dead_letter: Addr<DeadLetterActor>,
    pub counter_sync: Addr<CounterSyncActor>,
    pub metrics: Addr<MetricsActor>,
    pub journal: Addr<JournalActor>,
    pub stats: Arc<SweepStats>,
    pub dead_lettered_total: Arc<AtomicU64>,
    /// Every actor's health, in a fixed order (see [`Healths::all`]).
    pub health: Arc<Vec<Arc<ActorHealth>>>,
    dispatch_arbiter: Arbiter,
    reporter: actix_rt::task::JoinHandle<()>,
    /// The LISTEN task, unless `database.listen_url` is `"off"`.
    listener: Option<actix_rt::task::JoinHandle<()>>,
    /// Set once shutdown begins: the watchdog stops (stopping actors go quiet).
    stopping: Arc<AtomicBool>,
    /// The metrics (what is paused, for the last health lines).
    telemetry: Metrics,
}

/// The health record of every actor.
#[derive(Clone)]
pub struct Healths {
    pub sweep: Arc<ActorHealth>,
    pub dispatch: Arc<ActorHealth>,
    pub dead_letter: Arc<ActorHealth>,
    pub counter_sync: Arc<ActorHealth>,
    pub metrics: Arc<ActorHealth>,
    pub journal: Arc<ActorHealth>,
}

impl Healths {
    /// Created before the actors so the HTTP endpoint can be bound (and
    /// fail) before any work starts. Each cadence is how often the actor
    /// must succeed to stay `healthy` (see `health::STALE_CADENCES`).
    pub fn new(cfg: &Config) -> Self {
        let tick = cfg.sweep.tick_timeout.0;
        Healths {
            sweep: ActorHealth::new("SweepActor", cfg.sweep.interval.0 + tick, true),
            // A ping at least every health.interval when idle; a batch may
            // take up to a tick's deadline.
            dispatch: ActorHealth::new(
                "DispatchActor",
                cfg.health.interval.0.max(cfg.sweep.interval.0) + tick,
                true,
            ),
            // Event-driven unless retention runs (then it must purge every
            // interval); without retention its heartbeat is the cadence.
            dead_letter: ActorHealth::new(
                "DeadLetterActor",
                match cfg.dead_letter.retention.0 {
                    Some(_) => cfg.dead_letter.purge_interval.0 + tick,
                    None => cfg.health.interval.0,
                },
                cfg.dead_letter.retention.0.is_some(),
            ),
            counter_sync: ActorHealth::new("CounterSyncActor", cfg.counter_sync.interval.0 + tick, true),
            metrics: ActorHealth::new("MetricsActor", cfg.metrics.probe_interval.0 + tick, false),
            // The watch is an extra: a Redis it cannot look at does not
            // make the relay unready (its rounds say so in the log).
            journal: ActorHealth::new("JournalActor", cfg.journal.watch_interval.0 + tick, false),
        }
    }

    /// All of them, in a fixed order (sweep, dispatch, dead letter, counter
    /// sync, metrics, journal).
    pub fn all(&self) -> Arc<Vec<Arc<ActorHealth>>> {
        Arc::new(vec![
            self.sweep.clone(),
            self.dispatch.clone(),
            self.dead_letter.clone(),
            self.counter_sync.clone(),
            self.metrics.clone(),
            self.journal.clone(),
        ])
    }
}

/// What every actor's start takes from the tree.
struct Shared<'a> {
    cfg: &'a Config,
    supervision: Supervision,
    metrics: &'a Metrics,
    log: &'a Logger,
}

/// Start all actors and the health reporter. Must be called inside a
/// running actix `System`. The receiver yields when the process must exit.
/// `schema` is the shape of the tables, read at start ([`crate::db::schema`]).
pub fn start(
    cfg: &Config,
    schema: &Schema,
    healths: &Healths,
    metrics: &Metrics,
    log: &Logger,
) -> (Relay, mpsc::UnboundedReceiver<GiveUp>) {
    let (supervision, fatal) = Supervision::new(RestartPolicy::from(&cfg.supervisor), log);
    let at = Shared {
        cfg,
        supervision,
        metrics,
        log,
    };
    let health = healths.all();
    let (dispatch_arbiter, dispatch) = start_dispatch(&at, healths);
    let dead_lettered_total = Arc::new(AtomicU64::new(0));
    let dead_letter = start_dead_letter(&at, healths, dead_lettered_total.clone());
    let stats = Arc::new(SweepStats::default());
    let wake_pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heard = Arc::new(crate::db::listen::Heard::default());
    let sweep = {
        let (d, dl, st, sh, ss, sm, slog_) = (
            dispatch.clone().recipient(),
            dead_letter.clone().recipient(),
            stats.clone(),
            healths.sweep.clone(),
            at.supervision.clone(),
            metrics.clone(),
            log.clone(),
        );
        let (settings, wp, sweep_heard) = (sweep_settings(cfg, schema), wake_pending.clone(), heard.clone());
        Supervisor::start(move |_| SweepActor::new(settings, (d, dl), st, sh, ss, (sm, wp, sweep_heard), &slog_))
    };
    let counter_sync = start_counter_sync(&at, schema, healths);
    let metrics_actor = start_metrics(&at, schema, healths);
    let journal = start_journal(&at, schema, healths);

    metrics.listen_active.set(0);
    metrics.listen_leader.set(0);
    let listener = start_listener(&at, healths, &sweep, wake_pending, heard);
    let reporter = actix_rt::spawn(report_health(
        health.clone(),
        metrics.clone(),
        cfg.health.interval.0,
        log.clone(),
    ));
    let stopping = Arc::new(AtomicBool::new(false));
    let watched = vec![
        Watched {
            health: healths.sweep.clone(),
            wedged: sweep.clone().recipient(),
        },
        Watched {
            health: healths.dispatch.clone(),
            wedged: dispatch.clone().recipient(),
        },
        Watched {
            health: healths.dead_letter.clone(),
            wedged: dead_letter.clone().recipient(),
        },
        Watched {
            health: healths.counter_sync.clone(),
            wedged: counter_sync.clone().recipient(),
        },
        Watched {
            health: healths.metrics.clone(),
            wedged: metrics_actor.clone().recipient(),
        },
        Watched {
            health: healths.journal.clone(),
            wedged: journal.clone().recipient(),
        },
    ];
    if let Err(e) = watchdog::spawn(watched, stopping.clone(), log.clone()) {
        warn!(log, "cannot start the watchdog thread; wedged actors will only show in health"; "error" => %e);
    }
    (
        Relay {
            sweep,
            dispatch,
            dead_letter,
            counter_sync,
            metrics: metrics_actor,
            journal,
            stats,
            dead_lettered_total,
            health,
            dispatch_arbiter,
            reporter,
            listener,
            stopping,
            telemetry: metrics.clone(),
        },
        fatal,
    )
}

/// The dispatch actor, on an arbiter (thread) of its own.
fn start_dispatch(at: &Shared<'_>, healths: &Healths) -> (Arbiter, Addr<DispatchActor>) {
    let cfg = at.cfg;
    let health_interval = cfg.health.interval.0;
    let dispatch_arbiter = Arbiter::new();
    let dispatch_settings = DispatchSettings {
        redis: cfg.redis.clone(),
        ping_interval: health_interval,
        checkout_timeout: cfg.sweep.tick_timeout.0.max(health_interval),
        error_budget: cfg.supervisor.error_budget,
    };
    let (dh, ds, dm, dlog) = (
        healths.dispatch.clone(),
        at.supervision.clone(),
        at.metrics.clone(),
        at.log.clone(),
    );
    let dispatch = Supervisor::start_in_arbiter(&dispatch_arbiter.handle(), move |_| {
        DispatchActor::new(dispatch_settings, dh, ds, dm, &dlog)
    });
    (dispatch_arbiter, dispatch)
}

fn start_dead_letter(at: &Shared<'_>, healths: &Healths, moved: Arc<AtomicU64>) -> Addr<DeadLetterActor> {
    let cfg = at.cfg;
    let (dlh, dls, dl_log) = (healths.dead_letter.clone(), at.supervision.clone(), at.log.clone());
    let dl_settings = DeadLetterSettings {
        database_url: cfg.database.url.clone(),
        retention: cfg.dead_letter.retention.0,
        purge_interval: cfg.dead_letter.purge_interval.0,
        heartbeat: cfg.health.interval.0,
        round_timeout: cfg.sweep.tick_timeout.0,
        error_budget: cfg.supervisor.error_budget,
    };
    Supervisor::start(move |_| DeadLetterActor::new(dl_settings, moved, dlh, dls, &dl_log))
}

/// What the sweep needs from the configuration and the tables' shape.
fn sweep_settings(cfg: &Config, schema: &Schema) -> SweepSettings {
    SweepSettings {
        database_url: cfg.database.url.clone(),
        pool_size: cfg.database.pool_size,
        batch_size: cfg.sweep.batch_size,
        max_batch_bytes: cfg.sweep.max_batch_bytes,
        interval: cfg.sweep.interval.0,
        listen_poll: cfg.sweep.listen_poll_interval.0,
        tick_timeout: cfg.sweep.tick_timeout.0,
        key_prefix: cfg.redis.key_prefix.clone(),
        concurrency: cfg.sweep.concurrency,
        live_concurrency: cfg.sweep.live_concurrency(),
        error_budget: cfg.supervisor.error_budget,
        retry: RetryPolicy {
            base_backoff: cfg.sweep.base_backoff.0,
            max_backoff: cfg.sweep.max_backoff.0,
            max_attempts: cfg.sweep.max_attempts,
        },
        schema: Arc::new(schema.clone()),
        claim_fallback: Arc::default(),
        journal_width: cfg
            .journal
            .on()
            .then(|| crate::domain::journal::slot_width(cfg.journal.keep.0) as i64),
    }
}

fn start_counter_sync(at: &Shared<'_>, schema: &Schema, healths: &Healths) -> Addr<CounterSyncActor> {
    let cfg = at.cfg;
    let cs_settings = CounterSyncSettings {
        database_url: cfg.database.url.clone(),
        redis: cfg.redis.clone(),
        interval: cfg.counter_sync.interval.0,
        jobs_id: schema.jobs_id,
        round_timeout: cfg.sweep.tick_timeout.0,
        error_budget: cfg.supervisor.error_budget,
    };
    let (csh, css, cs_log) = (healths.counter_sync.clone(), at.supervision.clone(), at.log.clone());
    let skew = at.metrics.running_tasks_skew.clone();
    let on_skew: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |v| skew.observe(v as f64));
    Supervisor::start(move |_| CounterSyncActor::new(cs_settings, csh, css, Some(on_skew.clone()), &cs_log))
}

fn start_journal(at: &Shared<'_>, schema: &Schema, healths: &Healths) -> Addr<JournalActor> {
    let cfg = at.cfg;
    let settings = JournalSettings {
        database_url: cfg.database.url.clone(),
        redis: cfg.redis.clone(),
        keep: cfg.journal.keep.0,
        still_pending: cfg.journal.still_pending.clone(),
        watch_interval: cfg.journal.watch_interval.0,
        reconcile_rate: cfg.journal.reconcile_rate,
        jobs_id: schema.jobs_id,
        round_timeout: cfg.sweep.tick_timeout.0,
        error_budget: cfg.supervisor.error_budget,
    };
    let (h, sup, m, log) = (
        healths.journal.clone(),
        at.supervision.clone(),
        at.metrics.clone(),
        at.log.clone(),
    );
    Supervisor::start(move |_| JournalActor::new(settings.clone(), h.clone(), sup.clone(), m.clone(), &log))
}

fn start_metrics(at: &Shared<'_>, schema: &Schema, healths: &Healths) -> Addr<MetricsActor> {
    let cfg = at.cfg;
    let m_settings = MetricsSettings {
        database_url: cfg.database.url.clone(),
        redis: cfg.redis.clone(),
        probe_interval: cfg.metrics.probe_interval.0,
        round_timeout: cfg.sweep.tick_timeout.0,
        heartbeat: Some((instance(cfg, schema), cfg.health.interval.0)),
    };
    let (mm, mall, mh, ms, m_log) = (
        at.metrics.clone(),
        healths.all(),
        healths.metrics.clone(),
        at.supervision.clone(),
        at.log.clone(),
    );
    Supervisor::start(move |_| MetricsActor::new(m_settings, mm.clone(), mall.clone(), mh.clone(), ms.clone(), &m_log))
}

/// The LISTEN session (when the database URL allows one): it wakes the
/// sweep, and holds the listen lead only while this relay can deliver.
fn start_listener(
    at: &Shared<'_>,
    healths: &Healths,
    sweep: &Addr<SweepActor>,
    wake_pending: Arc<AtomicBool>,
    heard: Arc<crate::db::listen::Heard>,
) -> Option<actix_rt::task::JoinHandle<()>> {
    let (cfg, metrics, log) = (at.cfg, at.metrics, at.log);
    crate::db::listen::ListenTarget::new(cfg.database.listen_target(), &cfg.database.url).map(|target| {
        let waker = Waker::new(sweep.clone().recipient(), wake_pending, metrics.clone());
        let delivering = (healths.sweep.clone(), healths.dispatch.clone(), heard.clone());
        actix_rt::spawn(crate::db::listen::listen(
            target,
            (
                crate::db::listen::ListenGauges {
                    active: metrics.listen_active.clone(),
                    leader: metrics.listen_leader.clone(),
                },
                heard,
            ),
            (
                move || waker.wake(),
                move || {
                    !delivering.2.holding()
                        && [&delivering.0, &delivering.1]
                            .iter()
                            .all(|h| h.snapshot().status == crate::telemetry::health::Status::Healthy)
                },
            ),
            log.new(slog::o!("actor" => "SweepActor")),
        ))
    })
}

/// Who this relay is, for the fleet's heartbeat (`db::fleet`).
fn instance(cfg: &Config, schema: &crate::db::schema::Schema) -> crate::db::fleet::Instance {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map_or_else(|| "unknown".to_string(), |h| h.trim().to_string());
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let settings = serde_json::json!({
        "batch_size": cfg.sweep.batch_size,
        "concurrency": cfg.sweep.concurrency,
        "key_prefix": cfg.redis.key_prefix,
        "claim": match &schema.claim {
            crate::db::schema::ClaimMode::Delete => "delete".to_string(),
            crate::db::schema::ClaimMode::Lock(why) => format!("lock ({why})"),
        },
        "listen": cfg.database.listen_target().is_some(),
        "redis_mode": format!("{:?}", cfg.redis.mode).to_lowercase(),
    });
    crate::db::fleet::Instance {
        id: uuid::Uuid::new_v4().to_string(),
        host,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at,
        settings: settings.to_string(),
    }
}

/// One `actor health` line per actor every `interval`.
/// Each line also says what is paused (`outbox-relay pause`): a paused
/// relay is healthy, and says why it delivers nothing.
async fn report_health(health: Arc<Vec<Arc<ActorHealth>>>, metrics: Metrics, interval: Duration, log: Logger) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for h in health.iter() {
            log_health(&log, h, metrics.paused_state(), false);
        }
    }
}

/// One health line; unhealthy states are warnings unless the process is
/// shutting down on purpose.
fn log_health(log: &Logger, h: &ActorHealth, paused: &'static str, shutting_down: bool) {
    let s = h.snapshot();
    let last_error = s.last_error.unwrap_or_default();
    if s.status == Status::Healthy || shutting_down {
        info!(log, "actor health";
            "actor" => s.actor, "status" => s.status.as_str(), "restarts" => s.restarts,
            "last_ok_ms_ago" => s.last_ok_ms_ago, "processed" => s.processed,
            "failures" => s.failures, "deadline_exceeded" => s.deadline_exceeded, "paused" => paused);
    } else {
        warn!(log, "actor health";
            "actor" => s.actor, "status" => s.status.as_str(), "restarts" => s.restarts,
            "last_ok_ms_ago" => s.last_ok_ms_ago, "processed" => s.processed,
            "failures" => s.failures, "deadline_exceeded" => s.deadline_exceeded, "paused" => paused,
            "last_error" => last_error);
    }
}

impl Relay {
    /// Let the tick in flight finish (or roll back at its deadline), then
    /// stop the dispatch arbiter; every actor ends `stopped`.
    pub async fn stop(self, log: &Logger) {
        self.stopping.store(true, Ordering::Relaxed);
        // An error means the sweep actor is already gone: nothing in flight.
        let _ = self.sweep.send(Stop).await;
        self.dispatch_arbiter.stop();
        self.reporter.abort();
        if let Some(l) = &self.listener {
            l.abort();
        }
        for h in self.health.iter() {
            h.set_stopped();
            log_health(log, h, self.telemetry.paused_state(), true);
        }
    }
}
