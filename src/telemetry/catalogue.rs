//! Every metric the relay exports: its name, kind, labels and help text,
//! in one table. [`super::metrics::Metrics`] creates each from its entry
//! (a metric missing here, or created as another kind, fails at start);
//! the console's counters, registered only where a console is served, are
//! [`CONSOLE_CATALOGUE`]'s. docs/metrics.md's table is generated from both
//! (`tests/reference_cli.rs`).

/// What kind of Prometheus metric one is (its `# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The name Prometheus gives it (`counter`, `gauge`, `histogram`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric of the relay.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    /// Label names (besides the constant `app` and `environment`).
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

/// The relay's metrics, in the order `Metrics::new` creates them.
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef {
        name: "outbox_relay_sweep_rows_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Outbox rows settled, by outcome (dispatched, retried, dead_lettered, cancelled: a cancelled job's row deleted unsent, set_aside: bound for the dead table but its ids do not fit that table's columns).",
    },
    MetricDef {
        name: "outbox_relay_sweep_ticks_total",
        kind: Kind::Counter,
        labels: &["result"],
        help: "Sweep ticks, by result (ok, error, deadline).",
    },
    MetricDef {
        name: "outbox_relay_sweep_duration_seconds",
        kind: Kind::Histogram,
        labels: &[],
        help: "Duration of sweep ticks that ran (claim to commit or rollback).",
    },
    MetricDef {
        name: "outbox_relay_claim_duration_seconds",
        kind: Kind::Histogram,
        labels: &["lane", "found"],
        help: "Time a tick's claim took (connection checkout, BEGIN, the claiming statement), by lane (drain, fresh) and whether it found rows (rows, none): a claim that grows while the backlog does not is walking dead index entries (a long transaction holding back vacuum).",
    },
    MetricDef {
        name: "outbox_relay_outbox_probe_duration_seconds",
        kind: Kind::Histogram,
        labels: &["result"],
        help: "Time the outbox probe took (it counts task_outbox by walking the table), by result: ok, cut_off (Postgres cancelled the count at its statement timeout: a lock on the table, or more rows than it counts in a round), failed (no answer, or an error). After a probe that took d the next waits at least 20 d (at most 60 s), so rate(_sum) stays under 0.05 per relay.",
    },
    MetricDef {
        name: "outbox_relay_delivery_lag_seconds",
        kind: Kind::Histogram,
        labels: &["from"],
        help: "Time from a delivered row's created_at (from=\"created\") or run_at (from=\"due\") to its ZADD acknowledged.",
    },
    MetricDef {
        name: "outbox_relay_backlog_rows",
        kind: Kind::Gauge,
        labels: &[],
        help: "Outbox rows due now (probe).",
    },
    MetricDef {
        name: "outbox_relay_oldest_age_seconds",
        kind: Kind::Gauge,
        labels: &[],
        help: "Age of the oldest due outbox row by created_at (probe; 0 when nothing is due).",
    },
    MetricDef {
        name: "outbox_relay_dead_letter_rows",
        kind: Kind::Gauge,
        labels: &[],
        help: "Rows in task_outbox_dead (probe).",
    },
    MetricDef {
        name: "outbox_relay_set_aside_rows",
        kind: Kind::Gauge,
        labels: &[],
        help: "Outbox rows set aside (run_at = infinity): bound for the dead table, whose id columns cannot hold them (probe).",
    },
    MetricDef {
        name: "outbox_relay_paused",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while delivery is paused for every job (outbox-relay pause), else 0 (probe).",
    },
    MetricDef {
        name: "outbox_relay_paused_jobs",
        kind: Kind::Gauge,
        labels: &[],
        help: "Jobs whose delivery is paused one by one (outbox-relay pause --job) (probe).",
    },
    MetricDef {
        name: "outbox_relay_redis_backpressure",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while writes are held back because Redis used_memory reached redis.max_memory_ratio of maxmemory, else 0.",
    },
    MetricDef {
        name: "outbox_relay_redis_memory_ratio",
        kind: Kind::Gauge,
        labels: &[],
        help: "Redis used_memory / maxmemory at the last reading (0 when Redis has no maxmemory or it was not read).",
    },
    MetricDef {
        name: "outbox_relay_listen_active",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while new rows wake the sweep (the LISTEN connection is up and heard the relay's own NOTIFY sent through database.url), else 0: polling every sweep.interval only (database.listen_url = \"off\", a listener behind pgbouncer in transaction pooling, or a lost connection).",
    },
    MetricDef {
        name: "outbox_relay_listen_leader",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while this relay answers new-row notifications (it holds the listen lead, a session advisory lock on its LISTEN connection), else 0: another relay answers, this one polls every sweep.interval and drains.",
    },
    MetricDef {
        name: "outbox_relay_redis_up",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 when the last Redis ping answered, else 0.",
    },
    MetricDef {
        name: "outbox_relay_postgres_up",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 when the last probe read the outbox on a Postgres server that takes writes, else 0: Postgres down, frozen, or no server of database.url takes writes (a failover under way; the relay's pools connect to no other).",
    },
    MetricDef {
        name: "outbox_relay_connections_opened_total",
        kind: Kind::Counter,
        labels: &["service"],
        help: "Connections the relay's pools opened, by service (postgres, redis): a step means a dependency restarted or failed over and every pool reconnected.",
    },
    MetricDef {
        name: "outbox_relay_redis_master_switches_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Sentinel mode: times the sentinels named a master other than the one before (a failover seen by this relay).",
    },
    MetricDef {
        name: "outbox_relay_redis_ping_seconds",
        kind: Kind::Gauge,
        labels: &[],
        help: "Round trip of the last Redis ping (absent while Redis does not answer).",
    },
    MetricDef {
        name: "outbox_relay_running_tasks_skew",
        kind: Kind::Histogram,
        labels: &[],
        help: "Per job and sync, |running count in Redis - previous jobs.running_tasks|.",
    },
    MetricDef {
        name: "outbox_relay_actor_restarts_total",
        kind: Kind::Counter,
        labels: &["actor"],
        help: "Actor restarts by the supervisor.",
    },
    MetricDef {
        name: "outbox_relay_actor_healthy",
        kind: Kind::Gauge,
        labels: &["actor"],
        help: "1 when the actor is healthy, else 0.",
    },
    MetricDef {
        name: "outbox_relay_deadline_exceeded_total",
        kind: Kind::Counter,
        labels: &["actor"],
        help: "Work abandoned or dropped because its deadline passed.",
    },
    MetricDef {
        name: "outbox_relay_pool_connections",
        kind: Kind::Gauge,
        labels: &["pool"],
        help: "Open connections of each pool.",
    },
    MetricDef {
        name: "outbox_relay_pool_idle_connections",
        kind: Kind::Gauge,
        labels: &["pool"],
        help: "Idle connections of each pool.",
    },
    MetricDef {
        name: "outbox_relay_pool_gets_waited_total",
        kind: Kind::Counter,
        labels: &["pool"],
        help: "Checkouts that had to wait for a connection.",
    },
    MetricDef {
        name: "outbox_relay_pool_gets_timed_out_total",
        kind: Kind::Counter,
        labels: &["pool"],
        help: "Checkouts that timed out.",
    },
    MetricDef {
        name: "outbox_relay_redis_wait_shortfall_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Pipelines whose WAIT saw fewer replicas than redis.wait_replicas (their rows were kept and re-sent).",
    },
    MetricDef {
        name: "outbox_relay_redis_data_loss_total",
        kind: Kind::Counter,
        labels: &["cause"],
        help: "Redis data losses the relay noticed, by cause (restart: a new run id; failover: a promoted replica that lacked journaled writes; vanished: the marker key gone from an unchanged node, as after FLUSHALL). With journal.keep set, the lost entries are written again.",
    },
    MetricDef {
        name: "outbox_relay_journal_restored_entries_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Schedule entries written again from the delivery journal after a loss (by the relay itself; `outbox-relay reconcile` reports its own).",
    },
    MetricDef {
        name: "outbox_relay_redis_unreachable_entries_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Cluster: entries re-sent later because the node owning their slot did not answer.",
    },
    MetricDef {
        name: "outbox_relay_redis_refused_entries_total",
        kind: Kind::Counter,
        labels: &["code"],
        help: "Entries Redis refused for a reason that is not the entry's (server state, unknown or renamed command, ACL, a proxy's error), by error code; re-sent later without counting an attempt.",
    },
    MetricDef {
        name: "outbox_relay_redis_unavailable_ticks_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Ticks whose rows found Redis unavailable as a whole (refused, pool timeout, broken connection): left in the outbox, no attempt counted.",
    },
    MetricDef {
        name: "outbox_relay_settle_refused_rows_total",
        kind: Kind::Counter,
        labels: &["stage"],
        help: "Rows kept in the outbox because Postgres refused a write of their tick's settle (a trigger, a check, a revoked privilege on task_outbox or task_outbox_dead), by the refused write; the rows Redis accepted in that tick were deleted where Postgres allowed it.",
    },
    MetricDef {
        name: "outbox_relay_wakeups_total",
        kind: Kind::Counter,
        labels: &["result"],
        help: "LISTEN notifications of new outbox rows: sent (woke the sweep), coalesced (a wake-up was already pending) or seen (every transaction announced was visible to the last claim for new rows: no claim needed).",
    },
];

/// The console's counters (`console::state::ConsoleMetrics`),
/// exported by a relay that serves the console and by `outbox-relay
/// console`.
pub const CONSOLE_CATALOGUE: &[MetricDef] = &[
    MetricDef {
        name: "outbox_relay_console_actions_total",
        kind: Kind::Counter,
        labels: &["action", "result"],
        help: "Console actions (pause, resume, cancel, requeue, purge, requeue_set_aside), by result: ok, error (failed, or ended, while acting), forbidden (refused for the role, read_only, CSRF or origin).",
    },
    MetricDef {
        name: "outbox_relay_console_logins_total",
        kind: Kind::Counter,
        labels: &["result"],
        help: "Console sign-ins by result: ok, failed (wrong name or password), limited (refused by the failed-login limit of the client's address), busy (no password check could start within 10 s).",
    },
    MetricDef {
        name: "outbox_relay_console_login_delays_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Console sign-ins held back (up to 4 s) because their user name had many recent failures; they are also counted by result.",
    },
];

/// The entry of `name` in `catalogue`, if it is one of its metrics.
pub fn find(catalogue: &'static [MetricDef], name: &str) -> Option<&'static MetricDef> {
    catalogue.iter().find(|d| d.name == name)
}
