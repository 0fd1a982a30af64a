//! `MetricsActor`: owns the periodic probes behind the Prometheus gauges.
//!
//! Messages: [`Probe`] (sent to itself every `metrics.probe_interval`,
//! carrying its deadline). Owns: a one-connection Postgres pool and a
//! one-connection Redis pool for probing, and the probe side of the shared
//! [`Metrics`] (the counters are moved by the actors where things happen).
//!
//! Each round: backlog and oldest due age from `task_outbox` (due rows
//! only, so future-dated retries never inflate the age), dead-letter count,
//! Redis ping latency and up/down, and the actors' health gauges. A failed
//! probe is logged and leaves a gap in its gauge (no fake 0). Probing a
//! dependency that is down is the probe's finding, not the actor's failure:
//! only a panic fails this actor.
//!
//! The outbox probe counts by walking the whole table (about 1 s of a
//! server core for 5,000,000 rows), so it keeps to a duty cycle: after a
//! probe that took `d`, the next waits [`probe_spacing`] (at least 20 `d`,
//! at most a minute). A count that Postgres cuts off at its statement
//! timeout (a lock on the table, or more rows than it can count in the
//! round) leaves the gauges empty with a warning that says so, but keeps
//! `postgres_up` at 1: the server answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use slog::{debug, info, warn, Logger};

use super::lifecycle::{every, fault_point, guarded, run_contained, Core, Lifecycle, Mode};
use super::small_pools;
use super::supervisor::Supervision;
use crate::config::RedisConfig;
use crate::db::{fleet, Pg};
use crate::deadline::Deadline;
use crate::redis::Redis;
use crate::telemetry::health::ActorHealth;
use crate::telemetry::metrics::{Metrics, PROBE_RESULTS};

mod probe;

use probe::probe_json;
pub use probe::{probe, probe_spacing, OutboxProbe, OutboxProbeError, ProbeReport};

/// Run the probes before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Probe {
    pub deadline: Deadline,
}

/// Write this relay's heartbeat (`db::fleet`) before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Heartbeat {
    pub deadline: Deadline,
}

#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub database_url: String,
    pub redis: RedisConfig,
    pub probe_interval: Duration,
    pub round_timeout: Duration,
    /// Who this relay is, and how often it writes its heartbeat
    /// (`health.interval`); None writes none (tests of the actor alone).
    pub heartbeat: Option<(fleet::Instance, Duration)>,
}

/// Cumulative totals already written to the fleet's minutes.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    delivered: u64,
    retried: u64,
    dead_lettered: u64,
    lag: Vec<u64>,
}

pub struct MetricsActor {
    settings: MetricsSettings,
    metrics: Metrics,
    /// Every actor's health, folded into the health gauges each round.
    healths: Arc<Vec<Arc<ActorHealth>>>,
    core: Core,
    pools: Option<(Pg, Redis)>,
    /// What the heartbeats written so far have counted.
    sent: Totals,
    /// The last heartbeat failed (logged once per episode).
    beat_failing: bool,
    /// The last outbox probe that succeeded, and when: the heartbeat
    /// carries it, so the console reads the backlog from here instead of
    /// walking the claim index itself (None after a failed probe).
    last_probe: Option<(OutboxProbe, Instant)>,
    /// No outbox probe before this ([`probe_spacing`]); None: the next
    /// round probes.
    probe_rest_until: Option<Instant>,
    /// The last round found Postgres taking no writes (logged once).
    writes_refused: bool,
}

impl MetricsActor {
    pub fn new(
        settings: MetricsSettings,
        metrics: Metrics,
        healths: Arc<Vec<Arc<ActorHealth>>>,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        log: &Logger,
    ) -> Self {
        MetricsActor {
            settings,
            // Probing a dependency that is down is the probe's finding: only
            // a panic fails this actor, so it has no error budget.
            core: Core::new(health, supervision, u32::MAX, log),
            metrics,
            healths,
            pools: None,
            sent: Totals::default(),
            beat_failing: false,
            last_probe: None,
            probe_rest_until: None,
            writes_refused: false,
        }
    }

    /// The totals now, from the counters the sweep moves.
    fn totals(&self) -> Totals {
        let rows = |o: &str| self.metrics.sweep_rows.with_label_values(&[o]).get();
        let lag = self.metrics.delivery_lag.with_label_values(&["created"]);
        let mut per_bucket = Vec::with_capacity(crate::telemetry::metrics::LAG_BUCKETS.len() + 1);
        let proto = prometheus::core::Metric::metric(&lag);
        let h = proto.get_histogram();
        let mut below = 0;
        for b in h.get_bucket() {
            per_bucket.push(b.cumulative_count().saturating_sub(below));
            below = b.cumulative_count();
        }
        per_bucket.push(h.get_sample_count().saturating_sub(below));
        Totals {
            delivered: rows("dispatched"),
            retried: rows("retried"),
            dead_lettered: rows("dead_lettered"),
            lag: per_bucket,
        }
    }

    /// The heartbeat's body: state now, and what changed since `self.sent`.
    fn beat(&self, now: &Totals) -> fleet::Beat {
        let d = |a: u64, b: u64| i64::try_from(a.saturating_sub(b)).unwrap_or(i64::MAX);
        let health: serde_json::Map<String, serde_json::Value> = self
            .healths
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    serde_json::Value::from(h.snapshot().status.as_str()),
                )
            })
            .collect();
        let counters = serde_json::json!({
            "delivered": now.delivered,
            "retried": now.retried,
            "dead_lettered": now.dead_lettered,
            "paused": self.metrics.paused_state(),
            "held_back": self.metrics.redis_backpressure.get() > 0,
            "listen_leader": self.metrics.listen_leader.get() > 0,
            "outbox": self.last_probe.as_ref().map(|(p, at)| probe_json(p, at.elapsed())),
        });
        fleet::Beat {
            counters: counters.to_string(),
            health: serde_json::Value::Object(health).to_string(),
            delivered: d(now.delivered, self.sent.delivered),
            retried: d(now.retried, self.sent.retried),
            dead_lettered: d(now.dead_lettered, self.sent.dead_lettered),
            lag_buckets: now
                .lag
                .iter()
                .enumerate()
                .map(|(i, v)| d(*v, self.sent.lag.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// A round must end before the next one is due.
    fn round_timeout(&self) -> Duration {
        self.settings.round_timeout.min(self.settings.probe_interval)
    }

    fn apply(&mut self, report: ProbeReport) {
        let m = &self.metrics;
        let took = report.outbox_took;
        let [ok, cut_off, failed] = PROBE_RESULTS;
        let result = match &report.outbox {
            None => None,
            Some(Ok(_)) => Some(ok),
            Some(Err(OutboxProbeError::CutOff(_))) => Some(cut_off),
            Some(Err(OutboxProbeError::Failed(_))) => Some(failed),
        };
        if let Some(result) = result {
            m.outbox_probe_duration
                .with_label_values(&[result])
                .observe(took.as_secs_f64());
            // A count the server finished or cut off cost it `took`: rest
            // in proportion. A probe that got no answer cost the server
            // nothing, and the next round must see it come back.
            let interval = self.settings.probe_interval;
            let spacing = probe_spacing(took, interval);
            self.probe_rest_until =
                (result != failed && spacing > interval).then(|| Instant::now() + spacing.saturating_sub(took));
        }
        // Up: it answers and takes writes. A count the server cut off is
        // an answer (a lock, or a table too big to count in the round),
        // and a read-only check that found no time left after it does not
        // undo that.
        let answered = matches!(report.outbox, Some(Ok(_) | Err(OutboxProbeError::CutOff(_))));
        let up = match report.postgres_writes {
            Ok(writes) => writes && !matches!(report.outbox, Some(Err(OutboxProbeError::Failed(_)))),
            Err(_) => answered,
        };
        m.postgres_up.set(i64::from(up));
        match (&report.postgres_writes, self.writes_refused) {
            (Ok(false), false) => {
                warn!(self.core.log, "postgres answers but takes no writes (transaction_read_only = on: a standby, or a server set read-only); outbox_relay_postgres_up is 0");
                self.writes_refused = true;
            }
            (Ok(true), true) => {
                info!(self.core.log, "postgres takes writes again");
                self.writes_refused = false;
            }
            _ => {}
        }
        match report.outbox {
            None => {}
            Some(Ok(p)) => {
                self.last_probe = Some((p, Instant::now()));
                // The backlog last: a scrape between two of these sets
                // (they are not one step) that sees this round's backlog
                // sees its age and the rest too (a CI run read 250 rows
                // due with the age of the round before, 0).
                m.oldest_age_seconds.set(p.oldest_age);
                m.dead_letter_rows.set(p.dead_letters as f64);
                m.set_aside_rows.set(p.set_aside as f64);
                m.paused.set(i64::from(p.paused_all));
                m.paused_jobs.set(p.paused_jobs);
                m.backlog_rows.set(p.backlog as f64);
            }
            Some(Err(e)) => {
                self.last_probe = None;
                m.backlog_rows.clear();
                m.oldest_age_seconds.clear();
                m.dead_letter_rows.clear();
                m.set_aside_rows.clear();
                warn!(self.core.log, "outbox probe failed; its gauges are left empty";
                      "error" => e.to_string(), "took_ms" => took.as_millis() as u64);
            }
        }
        match report.redis_ping {
            Ok(rtt) => {
                m.redis_up.set(1);
                m.redis_ping_seconds.set(rtt.as_secs_f64());
            }
            Err(e) => {
                m.redis_up.set(0);
                m.redis_ping_seconds.clear();
                debug!(self.core.log, "redis ping probe failed"; "error" => e);
            }
        }
        // Process-wide counts kept by the pools, brought up to date.
        for (i, total) in crate::pool::opened().into_iter().enumerate() {
            let c = m.connections_opened.with_label_values(&[crate::pool::SERVICES[i]]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        let switches = crate::redis::sentinel::master_switches();
        m.redis_master_switches
            .inc_by(switches.saturating_sub(m.redis_master_switches.get()));
        if let Some((pg, redis)) = &self.pools {
            m.observe_pool("metrics_postgres", pg.pool.state());
            m.observe_pool("metrics_redis", redis.pool.state());
        }
        m.observe_health(&self.healths);
    }
}

impl Lifecycle for MetricsActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let s = &self.settings;
        self.pools = Some(small_pools(&s.database_url, &s.redis, s.round_timeout)?);
        every(self, ctx, self.settings.probe_interval, true, |act| Probe {
            deadline: Deadline::after(act.round_timeout()),
        });
        if let Some((_, interval)) = &self.settings.heartbeat {
            every(self, ctx, *interval, true, |act| Heartbeat {
                deadline: Deadline::after(act.settings.round_timeout),
            });
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.pools = None;
    }
}

crate::supervised_actor!(MetricsActor);

impl Handler<Probe> for MetricsActor {
    type Result = ();

    fn handle(&mut self, msg: Probe, ctx: &mut Self::Context) {
        guarded(self, ctx, "probe handler", |act, ctx| {
            if act.core.expired(msg.deadline, "probe") {
                return;
            }
            let Some((pg, redis)) = act.pools.clone() else { return };
            // A round in the outbox probe's rest pings Redis only; the
            // timer ticks every interval, so a rest that ends within a
            // quarter of one counts as over.
            let quarter = act.settings.probe_interval / 4;
            let count_outbox = act
                .probe_rest_until
                .is_none_or(|until| Instant::now() + quarter >= until);
            let round = async move { probe(&pg, &redis, msg.deadline, count_outbox).await };
            run_contained(act, ctx, "probe", Mode::Wait, round, |act, report, _| {
                // In the callback, not the handler: proves callbacks are covered.
                fault_point("metrics.probe");
                act.apply(report);
                act.core.health.ok();
            });
        });
    }
}

impl Handler<Heartbeat> for MetricsActor {
    type Result = ();

    fn handle(&mut self, msg: Heartbeat, ctx: &mut Self::Context) {
        guarded(self, ctx, "heartbeat handler", |act, ctx| {
            if act.core.expired(msg.deadline, "heartbeat") {
                return;
            }
            let (Some((pg, _)), Some((me, _))) = (act.pools.clone(), act.settings.heartbeat.clone()) else {
                return;
            };
            let now = act.totals();
            let beat = act.beat(&now);
            let deadline = msg.deadline;
            let write = async move {
                let mut conn = pg.checkout(deadline).await.map_err(|e| e.to_string())?;
                match deadline
                    .run("postgres heartbeat", fleet::beat(&**conn, &me, &beat))
                    .await
                {
                    Ok(done) => done.map_err(|e| e.text()),
                    Err(expired) => {
                        pg.cancel_statement(&mut conn).await;
                        Err(expired.to_string())
                    }
                }
            };
            run_contained(
                act,
                ctx,
                "heartbeat",
                Mode::Wait,
                write,
                move |act, outcome, _| match outcome {
                    Ok(()) => {
                        act.sent = now;
                        if act.beat_failing {
                            info!(act.core.log, "fleet heartbeat written again");
                        }
                        act.beat_failing = false;
                    }
                    Err(e) => {
                        if !act.beat_failing {
                            warn!(act.core.log, "fleet heartbeat failed; the console shows this relay as stale until it succeeds (migration 7 applied? outbox_relay_instances granted?)";
                            "error" => e);
                        }
                        act.beat_failing = true;
                    }
                },
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::PROBE_SPACING_MAX;

    #[test]
    fn a_quick_probe_keeps_the_interval() {
        let interval = Duration::from_secs(5);
        assert_eq!(probe_spacing(Duration::ZERO, interval), interval);
        assert_eq!(probe_spacing(Duration::from_millis(40), interval), interval);
        // 250 ms × 20 is the interval itself.
        assert_eq!(probe_spacing(Duration::from_millis(250), interval), interval);
    }

    #[test]
    fn a_slow_probe_waits_twenty_times_as_long_up_to_a_minute() {
        let interval = Duration::from_secs(5);
        assert_eq!(probe_spacing(Duration::from_secs(1), interval), Duration::from_secs(20));
        assert_eq!(
            probe_spacing(Duration::from_millis(2500), interval),
            Duration::from_secs(50)
        );
        assert_eq!(probe_spacing(Duration::from_secs(4), interval), PROBE_SPACING_MAX);
        assert_eq!(probe_spacing(Duration::MAX, interval), PROBE_SPACING_MAX);
        // A configured interval longer than the cap is kept.
        let hourly = Duration::from_secs(3600);
        assert_eq!(probe_spacing(Duration::from_secs(4), hourly), hourly);
    }

    #[test]
    fn a_cut_off_count_is_told_apart_from_a_failure() {
        let cut = OutboxProbeError::CutOff("canceling statement due to statement timeout".into()).to_string();
        assert!(cut.contains("a lock on task_outbox"), "{cut}");
        assert_eq!(
            OutboxProbeError::Failed("connection refused".into()).to_string(),
            "connection refused"
        );
    }
}
