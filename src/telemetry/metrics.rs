//! The Prometheus registry and every metric the relay exports.
//!
//! One [`Metrics`] per process, shared (`Arc`) by the actors that move its
//! counters and owned for probing by the `MetricsActor`. The registry adds
//! the constant labels `app` and `environment` to every metric at scrape
//! time, `process_*` included (adding them again per metric would make the
//! scrape invalid). Names and meanings are listed in docs/metrics.md.
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

use super::catalogue::{find, Kind, CATALOGUE};

/// The causes of `outbox_relay_redis_data_loss_total`
/// (`domain::journal::CAUSES`, checked equal there).
pub const LOSS_CAUSES: [&str; 3] = ["restart", "failover", "vanished"];
use super::health::{ActorHealth, Status};
use crate::config::MetricsConfig;

/// Tick durations from 1 ms to 10 s.
/// Delivery lag buckets, 1 ms to 10 min: the SLO is written on these.
pub const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The `result` label values of `outbox_relay_outbox_probe_duration_seconds`.
pub const PROBE_RESULTS: [&str; 3] = ["ok", "cut_off", "failed"];

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
    /// Redis data losses noticed, by cause (`domain::journal::CAUSES`).
    pub redis_data_loss: IntCounterVec,
    /// Entries the relay wrote again from the journal.
    pub journal_restored: IntCounter,
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
        let r = Reg(&registry);
        let m = Metrics {
            sweep_rows: r.counter_vec("outbox_relay_sweep_rows_total")?,
            sweep_ticks: r.counter_vec("outbox_relay_sweep_ticks_total")?,
            sweep_duration: r.histogram("outbox_relay_sweep_duration_seconds", DURATION_BUCKETS)?,
            claim_duration: r.histogram_vec("outbox_relay_claim_duration_seconds", CLAIM_BUCKETS)?,
            outbox_probe_duration: r.histogram_vec("outbox_relay_outbox_probe_duration_seconds", CLAIM_BUCKETS)?,
            delivery_lag: r.histogram_vec("outbox_relay_delivery_lag_seconds", LAG_BUCKETS)?,
            backlog_rows: r.probe_gauge("outbox_relay_backlog_rows")?,
            oldest_age_seconds: r.probe_gauge("outbox_relay_oldest_age_seconds")?,
            dead_letter_rows: r.probe_gauge("outbox_relay_dead_letter_rows")?,
            set_aside_rows: r.probe_gauge("outbox_relay_set_aside_rows")?,
            paused: r.int_gauge("outbox_relay_paused")?,
            paused_jobs: r.int_gauge("outbox_relay_paused_jobs")?,
            redis_backpressure: r.int_gauge("outbox_relay_redis_backpressure")?,
            redis_memory_ratio: r.gauge("outbox_relay_redis_memory_ratio")?,
            listen_active: r.int_gauge("outbox_relay_listen_active")?,
            listen_leader: r.int_gauge("outbox_relay_listen_leader")?,
            redis_up: r.int_gauge("outbox_relay_redis_up")?,
            postgres_up: r.int_gauge("outbox_relay_postgres_up")?,
            connections_opened: r.counter_vec("outbox_relay_connections_opened_total")?,
            redis_master_switches: r.counter("outbox_relay_redis_master_switches_total")?,
            redis_ping_seconds: r.probe_gauge("outbox_relay_redis_ping_seconds")?,
            running_tasks_skew: r.histogram("outbox_relay_running_tasks_skew", SKEW_BUCKETS)?,
            actor_restarts: r.counter_vec("outbox_relay_actor_restarts_total")?,
            actor_healthy: r.gauge_vec("outbox_relay_actor_healthy")?,
            deadline_exceeded: r.counter_vec("outbox_relay_deadline_exceeded_total")?,
            pool_connections: r.gauge_vec("outbox_relay_pool_connections")?,
            pool_idle_connections: r.gauge_vec("outbox_relay_pool_idle_connections")?,
            pool_gets_waited: r.counter_vec("outbox_relay_pool_gets_waited_total")?,
            pool_gets_timed_out: r.counter_vec("outbox_relay_pool_gets_timed_out_total")?,
            redis_wait_shortfall: r.counter("outbox_relay_redis_wait_shortfall_total")?,
            redis_data_loss: r.counter_vec("outbox_relay_redis_data_loss_total")?,
            journal_restored: r.counter("outbox_relay_journal_restored_entries_total")?,
            redis_unreachable_entries: r.counter("outbox_relay_redis_unreachable_entries_total")?,
            redis_refused_entries: r.counter_vec("outbox_relay_redis_refused_entries_total")?,
            redis_unavailable_ticks: r.counter("outbox_relay_redis_unavailable_ticks_total")?,
            settle_refused_rows: r.counter_vec("outbox_relay_settle_refused_rows_total")?,
            wakeups: r.counter_vec("outbox_relay_wakeups_total")?,
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
        for cause in LOSS_CAUSES {
            m.redis_data_loss.with_label_values(&[cause]);
        }
        for service in crate::pool::SERVICES {
            m.connections_opened.with_label_values(&[service]);
        }
        // OutboxRelayBacklogUncounted counts cut-offs with increase(): from
        // 0, the first one counts too.
        for result in PROBE_RESULTS {
            m.outbox_probe_duration.with_label_values(&[result]);
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

/// Creates the relay's metrics, each with the help text and labels of its
/// [`CATALOGUE`] entry, and registers them.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    /// The catalogue's entry of `name`, which must be a metric of `kind`.
    fn def(name: &str, kind: Kind) -> Result<(Opts, &'static [&'static str]), MetricsError> {
        let d = find(CATALOGUE, name)
            .ok_or_else(|| prometheus::Error::Msg(format!("{name} is not in the metrics catalogue")))?;
        if d.kind != kind {
            let (listed, created) = (d.kind.as_str(), kind.as_str());
            return Err(prometheus::Error::Msg(format!(
                "{name} is a {listed} in the catalogue, created as a {created}"
            ))
            .into());
        }
        Ok((Opts::new(d.name, d.help), d.labels))
    }

    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> Result<C, MetricsError> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counter_vec(&self, name: &str) -> Result<IntCounterVec, MetricsError> {
        let (opts, labels) = Self::def(name, Kind::Counter)?;
        self.add(IntCounterVec::new(opts, labels)?)
    }

    fn gauge_vec(&self, name: &str) -> Result<IntGaugeVec, MetricsError> {
        let (opts, labels) = Self::def(name, Kind::Gauge)?;
        self.add(IntGaugeVec::new(opts, labels)?)
    }

    fn counter(&self, name: &str) -> Result<IntCounter, MetricsError> {
        self.add(IntCounter::with_opts(Self::def(name, Kind::Counter)?.0)?)
    }

    fn int_gauge(&self, name: &str) -> Result<IntGauge, MetricsError> {
        self.add(IntGauge::with_opts(Self::def(name, Kind::Gauge)?.0)?)
    }

    fn gauge(&self, name: &str) -> Result<Gauge, MetricsError> {
        self.add(Gauge::with_opts(Self::def(name, Kind::Gauge)?.0)?)
    }

    fn histogram(&self, name: &str, buckets: &[f64]) -> Result<Histogram, MetricsError> {
        let opts = HistogramOpts::from(Self::def(name, Kind::Histogram)?.0).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts)?)
    }

    fn histogram_vec(&self, name: &str, buckets: &[f64]) -> Result<HistogramVec, MetricsError> {
        let (opts, labels) = Self::def(name, Kind::Histogram)?;
        self.add(HistogramVec::new(
            HistogramOpts::from(opts).buckets(buckets.to_vec()),
            labels,
        )?)
    }

    fn probe_gauge(&self, name: &str) -> Result<ProbeGauge, MetricsError> {
        let d = Self::def(name, Kind::Gauge)?.0;
        ProbeGauge::new(self.0, &d.name, &d.help)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_result_is_exported_at_zero_from_the_start() {
        let m = Metrics::new(&MetricsConfig::default()).expect("metrics");
        let text = m.render();
        for result in PROBE_RESULTS {
            let exported = text.lines().any(|l| {
                l.starts_with("outbox_relay_outbox_probe_duration_seconds_count{")
                    && l.contains(&format!("result=\"{result}\""))
                    && l.ends_with("} 0")
            });
            assert!(exported, "no {result} count at 0:\n{text}");
        }
    }

    #[test]
    fn the_catalogue_lists_each_metric_the_relay_creates_once() {
        let source = include_str!("metrics.rs");
        let created: Vec<&str> = source
            .split("r.")
            .skip(1)
            .filter_map(|s| s.split_once("(\"outbox_relay_"))
            .filter(|(method, _)| method.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .filter_map(|(_, rest)| rest.split('"').next())
            .collect();
        let mut listed: Vec<&str> = CATALOGUE
            .iter()
            .map(|d| d.name.trim_start_matches("outbox_relay_"))
            .collect();
        let mut created_sorted = created.clone();
        created_sorted.sort_unstable();
        listed.sort_unstable();
        assert_eq!(created_sorted, listed, "CATALOGUE and Metrics::new differ");
        let mut unique = listed.clone();
        unique.dedup();
        assert_eq!(unique.len(), listed.len(), "a metric listed twice");
    }

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
