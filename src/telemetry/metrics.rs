//! The Prometheus registry and every metric the relay exports.
//!
//! One [`Metrics`] per process, shared (`Arc`) by the actors that move its
//! counters and owned for probing by the `MetricsActor`. The registry adds
//! the constant labels `app` and `environment` to every metric at scrape
//! time, `process_*` included (adding them again per metric would make the
//! scrape invalid). Names and meanings are listed in the README.
//!
//! Probe gauges ([`ProbeGauge`]) are registered only while their probe
//! succeeds: a failed probe leaves a gap in the series instead of a fake 0.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::health::{ActorHealth, Status};
use crate::config::MetricsConfig;

/// Tick durations from 1 ms to 10 s.
/// Delivery lag buckets, 1 ms to 10 min: the SLO is written on these.
pub const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The longest wait between two outbox probes, however long the last took
/// (`actors::metrics::probe_spacing`); the console accepts a relay's probe
/// this much older than its heartbeat limit.
pub const PROBE_SPACING_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Claim durations, 100 µs to 10 s: a healthy claim takes under a millisecond.
pub const CLAIM_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counter skew, in tasks.
pub const SKEW_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0];

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// A gauge that is only exported while its probe works.
#[derive(Clone)]
pub struct ProbeGauge {
    gauge: Gauge,
    registered: Arc<AtomicBool>,
    registry: Registry,
}

impl ProbeGauge {
    fn new(registry: &Registry, name: &str, help: &str) -> Result<Self, MetricsError> {
        Ok(ProbeGauge {
            gauge: Gauge::with_opts(Opts::new(name, help))?,
            registered: Arc::new(AtomicBool::new(false)),
            registry: registry.clone(),
        })
    }

    /// The probe answered: export `v`.
    pub fn set(&self, v: f64) {
        self.gauge.set(v);
        if !self.registered.swap(true, Ordering::SeqCst) {
            let _ = self.registry.register(Box::new(self.gauge.clone()));
        }
    }

    /// The probe failed: stop exporting until it answers again.
    pub fn clear(&self) {
        if self.registered.swap(false, Ordering::SeqCst) {
            let _ = self.registry.unregister(Box::new(self.gauge.clone()));
        }
    }
}

/// Every metric of the relay.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub sweep_rows: IntCounterVec,
    pub sweep_ticks: IntCounterVec,
    pub sweep_duration: Histogram,
    pub claim_duration: HistogramVec,
    /// Time the outbox probe took, by result (ok, cut_off, failed).
    pub outbox_probe_duration: HistogramVec,
    pub delivery_lag: HistogramVec,
    pub backlog_rows: ProbeGauge,
    pub oldest_age_seconds: ProbeGauge,
    pub dead_letter_rows: ProbeGauge,
    pub set_aside_rows: ProbeGauge,
    /// 1 while everything is paused (`outbox-relay pause`), by the last probe.
    pub paused: IntGauge,
    /// Jobs paused one by one, by the last probe.
    pub paused_jobs: IntGauge,
    pub redis_up: IntGauge,
    /// 1 when the last probe ran on a Postgres server that takes writes.
    pub postgres_up: IntGauge,
    /// Connections the relay's pools opened, by service (`pool::opened`).
    pub connections_opened: IntCounterVec,
    /// Sentinel mode: times the sentinels named a different master.
    pub redis_master_switches: IntCounter,
    /// 1 while the LISTEN connection is up and was heard end to end.
    pub listen_active: IntGauge,
    /// 1 while this relay holds the listen lead (answers notifications).
    pub listen_leader: IntGauge,
    /// 1 while Redis memory back-pressure holds writes back.
    pub redis_backpressure: IntGauge,
    /// used_memory / maxmemory at the last reading (absent without a limit).
    pub redis_memory_ratio: Gauge,
    pub redis_ping_seconds: ProbeGauge,
    pub running_tasks_skew: Histogram,
    pub actor_restarts: IntCounterVec,
    pub actor_healthy: IntGaugeVec,
    pub deadline_exceeded: IntCounterVec,
    pub pool_connections: IntGaugeVec,
    pub pool_idle_connections: IntGaugeVec,
    pub pool_gets_waited: IntCounterVec,
    pub pool_gets_timed_out: IntCounterVec,
    pub redis_wait_shortfall: IntCounter,
    pub redis_unreachable_entries: IntCounter,
    pub redis_refused_entries: IntCounterVec,
    pub wakeups: IntCounterVec,
    pub redis_unavailable_ticks: IntCounter,
    /// Rows a tick put off because Postgres refused one of its settle
    /// writes (a trigger, a check, a revoked privilege), by the write.
    pub settle_refused_rows: IntCounterVec,
    /// Last values folded into the counters above (health and pool
    /// statistics are cumulative; counters move by the difference).
    seen: Arc<Mutex<HashMap<String, u64>>>,
}

impl Metrics {
    /// What is paused, by the last probe: `no`, `all`, or `jobs` (some
    /// jobs). For the health lines and `/readyz`.
    pub fn paused_state(&self) -> &'static str {
        if self.paused.get() > 0 {
            "all"
        } else if self.paused_jobs.get() > 0 {
            "jobs"
        } else {
            "no"
        }
    }

    pub fn new(cfg: &MetricsConfig) -> Result<Self, MetricsError> {
        let labels = HashMap::from([
            ("app".to_string(), cfg.app.clone()),
            ("environment".to_string(), cfg.environment.clone()),
        ]);
        let registry = Registry::new_custom(None, Some(labels))?;
        let counter_vec = |name: &str, help: &str, label: &str| -> Result<IntCounterVec, MetricsError> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge_vec = |name: &str, help: &str, label: &str| -> Result<IntGaugeVec, MetricsError> {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let int_gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, MetricsError> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let m = Metrics {
            sweep_rows: counter_vec(
                "outbox_relay_sweep_rows_total",
                "Outbox rows settled, by outcome (dispatched, retried, dead_lettered, cancelled: a cancelled job's row deleted unsent, set_aside: bound for the dead table but its ids do not fit that table's columns).",
                "outcome",
            )?,
            sweep_ticks: counter_vec(
                "outbox_relay_sweep_ticks_total",
                "Sweep ticks, by result (ok, error, deadline).",
                "result",
            )?,
            sweep_duration: histogram(
                "outbox_relay_sweep_duration_seconds",
                "Duration of sweep ticks that ran (claim to commit or rollback).",
                DURATION_BUCKETS,
            )?,
            claim_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "outbox_relay_claim_duration_seconds",
                        "Time a tick's claim took (connection checkout, BEGIN, the claiming statement), by lane (drain, fresh) and whether it found rows (rows, none): a claim that grows while the backlog does not is walking dead index entries (a long transaction holding back vacuum).",
                    )
                    .buckets(CLAIM_BUCKETS.to_vec()),
                    &["lane", "found"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            outbox_probe_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "outbox_relay_outbox_probe_duration_seconds",
                        "Time the outbox probe took (it counts task_outbox by walking the table), by result: ok, cut_off (Postgres cancelled the count at its statement timeout: a lock on the table, or more rows than it counts in a round), failed (no answer, or an error). After a probe that took d the next waits at least 20 d (at most 60 s), so rate(_sum) stays under 0.05 per relay.",
                    )
                    .buckets(CLAIM_BUCKETS.to_vec()),
                    &["result"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            delivery_lag: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "outbox_relay_delivery_lag_seconds",
                        "Time from a delivered row's created_at (from=\"created\") or run_at (from=\"due\") to its ZADD acknowledged.",
                    )
                    .buckets(LAG_BUCKETS.to_vec()),
                    &["from"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            backlog_rows: ProbeGauge::new(&registry, "outbox_relay_backlog_rows", "Outbox rows due now (probe).")?,
            oldest_age_seconds: ProbeGauge::new(
                &registry,
                "outbox_relay_oldest_age_seconds",
                "Age of the oldest due outbox row by created_at (probe; 0 when nothing is due).",
            )?,
            dead_letter_rows: ProbeGauge::new(
                &registry,
                "outbox_relay_dead_letter_rows",
                "Rows in task_outbox_dead (probe).",
            )?,
            set_aside_rows: ProbeGauge::new(
                &registry,
                "outbox_relay_set_aside_rows",
                "Outbox rows set aside (run_at = infinity): bound for the dead table, whose id columns cannot hold them (probe).",
            )?,
            paused: int_gauge(
                "outbox_relay_paused",
                "1 while delivery is paused for every job (outbox-relay pause), else 0 (probe).",
            )?,
            paused_jobs: int_gauge(
                "outbox_relay_paused_jobs",
                "Jobs whose delivery is paused one by one (outbox-relay pause --job) (probe).",
            )?,
            redis_backpressure: int_gauge(
                "outbox_relay_redis_backpressure",
                "1 while writes are held back because Redis used_memory reached redis.max_memory_ratio of maxmemory, else 0.",
            )?,
            redis_memory_ratio: {
                let g = Gauge::new(
                    "outbox_relay_redis_memory_ratio",
                    "Redis used_memory / maxmemory at the last reading (0 when Redis has no maxmemory or it was not read).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            listen_active: int_gauge(
                "outbox_relay_listen_active",
                "1 while new rows wake the sweep (the LISTEN connection is up and heard the relay's own NOTIFY sent through database.url), else 0: polling every sweep.interval only (database.listen_url = \"off\", a listener behind pgbouncer in transaction pooling, or a lost connection).",
            )?,
            listen_leader: int_gauge(
                "outbox_relay_listen_leader",
                "1 while this relay answers new-row notifications (it holds the listen lead, a session advisory lock on its LISTEN connection), else 0: another relay answers, this one polls every sweep.interval and drains.",
            )?,
            redis_up: int_gauge(
                "outbox_relay_redis_up",
                "1 when the last Redis ping answered, else 0.",
            )?,
            postgres_up: int_gauge(
                "outbox_relay_postgres_up",
                "1 when the last probe read the outbox on a Postgres server that takes writes, else 0: Postgres down, frozen, or no server of database.url takes writes (a failover under way; the relay's pools connect to no other).",
            )?,
            connections_opened: counter_vec(
                "outbox_relay_connections_opened_total",
                "Connections the relay's pools opened, by service (postgres, redis): a step means a dependency restarted or failed over and every pool reconnected.",
                "service",
            )?,
            redis_master_switches: counter(
                "outbox_relay_redis_master_switches_total",
                "Sentinel mode: times the sentinels named a master other than the one before (a failover seen by this relay).",
            )?,
            redis_ping_seconds: ProbeGauge::new(
                &registry,
                "outbox_relay_redis_ping_seconds",
                "Round trip of the last Redis ping (absent while Redis does not answer).",
            )?,
            running_tasks_skew: histogram(
                "outbox_relay_running_tasks_skew",
                "Per job and sync, |running count in Redis - previous jobs.running_tasks|.",
                SKEW_BUCKETS,
            )?,
            actor_restarts: counter_vec(
                "outbox_relay_actor_restarts_total",
                "Actor restarts by the supervisor.",
                "actor",
            )?,
            actor_healthy: gauge_vec(
                "outbox_relay_actor_healthy",
                "1 when the actor is healthy, else 0.",
                "actor",
            )?,
            deadline_exceeded: counter_vec(
                "outbox_relay_deadline_exceeded_total",
                "Work abandoned or dropped because its deadline passed.",
                "actor",
            )?,
            pool_connections: gauge_vec(
                "outbox_relay_pool_connections",
                "Open connections of each pool.",
                "pool",
            )?,
            pool_idle_connections: gauge_vec(
                "outbox_relay_pool_idle_connections",
                "Idle connections of each pool.",
                "pool",
            )?,
            pool_gets_waited: counter_vec(
                "outbox_relay_pool_gets_waited_total",
                "Checkouts that had to wait for a connection.",
                "pool",
            )?,
            pool_gets_timed_out: counter_vec(
                "outbox_relay_pool_gets_timed_out_total",
                "Checkouts that timed out.",
                "pool",
            )?,
            redis_wait_shortfall: counter(
                "outbox_relay_redis_wait_shortfall_total",
                "Pipelines whose WAIT saw fewer replicas than redis.wait_replicas (their rows were kept and re-sent).",
            )?,
            redis_unreachable_entries: counter(
                "outbox_relay_redis_unreachable_entries_total",
                "Cluster: entries re-sent later because the node owning their slot did not answer.",
            )?,
            redis_refused_entries: counter_vec(
                "outbox_relay_redis_refused_entries_total",
                "Entries Redis refused for a reason that is not the entry's (server state, unknown or renamed command, ACL, a proxy's error), by error code; re-sent later without counting an attempt.",
                "code",
            )?,
            redis_unavailable_ticks: counter(
                "outbox_relay_redis_unavailable_ticks_total",
                "Ticks whose rows found Redis unavailable as a whole (refused, pool timeout, broken connection): left in the outbox, no attempt counted.",
            )?,
            settle_refused_rows: counter_vec(
                "outbox_relay_settle_refused_rows_total",
                "Rows kept in the outbox because Postgres refused a write of their tick's settle (a trigger, a check, a revoked privilege on task_outbox or task_outbox_dead), by the refused write; the rows Redis accepted in that tick were deleted where Postgres allowed it.",
                "stage",
            )?,
            wakeups: counter_vec(
                "outbox_relay_wakeups_total",
                "LISTEN notifications of new outbox rows: sent (woke the sweep), coalesced (a wake-up was already pending) or seen (every transaction announced was visible to the last claim for new rows: no claim needed).",
                "result",
            )?,
            seen: Arc::new(Mutex::new(HashMap::new())),
            registry,
        };
        // Every label value exists from the start at 0, so the first event
        // after a (re)start is an increase that rate() and alerts can see.
        for outcome in ["dispatched", "retried", "dead_lettered", "cancelled", "set_aside"] {
            m.sweep_rows.with_label_values(&[outcome]);
        }
        for from in ["created", "due"] {
            m.delivery_lag.with_label_values(&[from]);
        }
        for result in ["ok", "error", "deadline"] {
            m.sweep_ticks.with_label_values(&[result]);
        }
        for result in ["sent", "coalesced", "seen"] {
            m.wakeups.with_label_values(&[result]);
        }
        for service in crate::pool::SERVICES {
            m.connections_opened.with_label_values(&[service]);
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }

    /// Move `counter` by how much `total` grew since it was last seen under `key`.
    fn advance(&self, key: String, total: u64, counter: &prometheus::IntCounter) {
        if let Ok(mut seen) = self.seen.lock() {
            let last = seen.entry(key).or_insert(0);
            if total > *last {
                counter.inc_by(total - *last);
            }
            *last = total;
        }
    }

    /// Fold the actors' health into the health gauges and counters.
    pub fn observe_health(&self, healths: &[Arc<ActorHealth>]) {
        for h in healths {
            let s = h.snapshot();
            self.actor_healthy
                .with_label_values(&[s.actor])
                .set(i64::from(s.status == Status::Healthy));
            self.advance(
                format!("restarts/{}", s.actor),
                s.restarts,
                &self.actor_restarts.with_label_values(&[s.actor]),
            );
            self.advance(
                format!("deadline/{}", s.actor),
                s.deadline_exceeded,
                &self.deadline_exceeded.with_label_values(&[s.actor]),
            );
        }
    }

    /// Publish a bb8 pool's size and wait statistics under `pool`.
    pub fn observe_pool(&self, name: &str, state: bb8::State) {
        self.pool_connections
            .with_label_values(&[name])
            .set(i64::from(state.connections));
        self.pool_idle_connections
            .with_label_values(&[name])
            .set(i64::from(state.idle_connections));
        let stats = state.statistics;
        self.advance(
            format!("waited/{name}"),
            stats.get_waited,
            &self.pool_gets_waited.with_label_values(&[name]),
        );
        self.advance(
            format!("timed_out/{name}"),
            stats.get_timed_out,
            &self.pool_gets_timed_out.with_label_values(&[name]),
        );
    }

    /// The text exposition format of everything registered.
    /// The registry, for counters of other parts (the console's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(&MetricsConfig::default()).expect("metrics")
    }

    #[test]
    fn every_metric_carries_app_and_environment() {
        let m = metrics();
        m.sweep_rows.with_label_values(&["dispatched"]).inc_by(3);
        m.backlog_rows.set(5.0);
        let text = m.render();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.contains("app=\"outbox-relay\""), "{line}");
            assert!(line.contains("environment=\"development\""), "{line}");
        }
        let dispatched = text
            .lines()
            .find(|l| l.starts_with("outbox_relay_sweep_rows_total{") && l.contains("outcome=\"dispatched\""))
            .expect("dispatched series");
        assert!(dispatched.ends_with(" 3"), "{dispatched}");
    }

    #[test]
    fn failed_probes_leave_a_gap() {
        let m = metrics();
        assert!(!m.render().contains("outbox_relay_backlog_rows"));
        m.backlog_rows.set(7.0);
        assert!(m.render().contains("outbox_relay_backlog_rows{"));
        m.backlog_rows.clear();
        assert!(!m.render().contains("outbox_relay_backlog_rows"));
        m.backlog_rows.set(0.0);
        assert!(m.render().contains("outbox_relay_backlog_rows{"));
    }

    #[test]
    fn cumulative_health_counters_advance_by_difference() {
        let m = metrics();
        let h = ActorHealth::new("SweepActor", std::time::Duration::from_secs(60), true);
        h.set_restarting();
        h.deadline_exceeded();
        m.observe_health(std::slice::from_ref(&h));
        m.observe_health(std::slice::from_ref(&h));
        h.set_restarting();
        m.observe_health(std::slice::from_ref(&h));
        assert_eq!(m.actor_restarts.with_label_values(&["SweepActor"]).get(), 2);
        assert_eq!(m.deadline_exceeded.with_label_values(&["SweepActor"]).get(), 1);
        assert_eq!(m.actor_healthy.with_label_values(&["SweepActor"]).get(), 0);
    }
}
