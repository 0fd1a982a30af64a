//! `JournalActor`: watches the Redis node the relay writes to for lost
//! data, writes lost entries again from the delivery journal, and keeps the
//! journal to `journal.keep`.
//!
//! Messages: [`Watch`] (sent to itself every `journal.watch_interval`,
//! carrying its deadline). Owns: a one-connection Postgres pool and a
//! one-connection Redis pool, built in `started`.
//!
//! Each round looks at the node ([`crate::redis::node::observe`]: run id,
//! replication ids and offsets, the marker key) and compares it with the
//! look before ([`Loss::between`]). A loss is one warning line naming the
//! node and the cause, `outbox_relay_redis_data_loss_total{cause}`, and,
//! with the journal on, a reconcile of the loss window that runs beside
//! the rounds until it has gone through (a failed one is tried again at
//! the next round; reconcile is idempotent). Then retention empties the
//! slot two slices ahead. In a Redis Cluster the watch does not run (a
//! batch spans nodes; `outbox-relay reconcile` still works).
//!
//! Failure: a Redis or Postgres that does not answer makes the actor
//! `degraded` and the next round tries again; a panic fails it (restart).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use slog::{debug, info, warn, Logger};

use super::reconcile::{reconcile, Plan, ReconcileError, Report};
use crate::actors::lifecycle::{every, fault_point, guarded, run_contained, Core, Lifecycle, Mode};
use crate::actors::supervisor::Supervision;
use crate::config::RedisConfig;
use crate::db::journal::{self, Selection};
use crate::db::schema::IdType;
use crate::db::{CheckoutError, Pg};
use crate::deadline::Deadline;
use crate::domain::{Loss, Observation, Window};
use crate::redis::pipeline::checkout;
use crate::redis::{self as rds, Redis};
use crate::telemetry::health::ActorHealth;
use crate::telemetry::metrics::Metrics;

/// One round of the watch, before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Watch {
    pub deadline: Deadline,
}

#[derive(Debug, Clone)]
pub struct JournalSettings {
    pub database_url: String,
    pub redis: RedisConfig,
    /// `journal.keep`; zero: no journal (the watch still tells of losses).
    pub keep: Duration,
    pub still_pending: String,
    pub watch_interval: Duration,
    pub reconcile_rate: u32,
    pub jobs_id: IdType,
    pub round_timeout: Duration,
    pub error_budget: u32,
}

impl JournalSettings {
    fn on(&self) -> bool {
        !self.keep.is_zero()
    }

    fn selection(&self, window: Window) -> Selection {
        Selection {
            window,
            keep_secs: self.keep.as_secs() as i64,
            job: None,
            key_prefix: self.redis.key_prefix.clone(),
            until_secs_ago: 0,
            at_epoch: None,
        }
    }
}

/// What one round found.
struct Round {
    /// The look (`None` in a Redis Cluster, where the watch does not run).
    look: Result<Option<Observation>, String>,
    /// A loss noticed, and whether the journal holds anything of its window.
    loss: Option<(Loss, bool)>,
    /// Retention: the slots emptied, or why it could not run.
    retention: Result<Vec<u64>, String>,
}

pub struct JournalActor {
    settings: JournalSettings,
    core: Core,
    pools: Option<(Pg, Redis)>,
    metrics: Metrics,
    /// The last look at the node, and when.
    last: Option<(Observation, Instant)>,
    /// Losses not yet reconciled (oldest first), each with when it was
    /// noticed (what the node acknowledged after that is not written again).
    pending: Vec<(Loss, Instant)>,
    /// The noticed time of the loss a running reconcile works on.
    reconciling_since: Option<Instant>,
    reconciling: bool,
    /// No reconcile starts before this (after one that a pause held back:
    /// a pause lasts, and each try reads the whole window again).
    retry_at: Option<Instant>,
    /// Reconciles that failed in a row, and the last one's error: each
    /// waits longer ([`crate::domain::journal::retry_after`]), and only the first of a
    /// kind is a warning.
    failures: u32,
    last_failure: Option<String>,
    /// The last round's look failed, or its retention did (one warning
    /// line when that starts, one when it ends).
    look_failing: bool,
    retention_failing: bool,
}

impl JournalActor {
    pub fn new(
        settings: JournalSettings,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        metrics: Metrics,
        log: &Logger,
    ) -> Self {
        JournalActor {
            core: Core::new(health, supervision, settings.error_budget, log),
            settings,
            pools: None,
            metrics,
            last: None,
            pending: Vec::new(),
            reconciling_since: None,
            reconciling: false,
            retry_at: None,
            failures: 0,
            last_failure: None,
            look_failing: false,
            retention_failing: false,
        }
    }

    /// A round that could not look at Redis or keep the journal says so
    /// (once, and once when it works again) but stays healthy: the watch
    /// is an extra, and a Redis that refuses `INFO` or `SET` (an ACL from
    /// before the journal, a proxy) or a revoked TRUNCATE must not make a
    /// relay that delivers look down. Only a round that does not finish
    /// (the watchdog, the stale cadence) makes the actor unhealthy.
    fn finish(&mut self, round: Round, ctx: &mut Context<Self>) {
        self.core.health.ok();
        match round.look {
            Ok(look) => {
                if self.look_failing {
                    info!(self.core.log, "the journal watch looks at redis again");
                    self.look_failing = false;
                }
                if let Some(look) = look {
                    self.last = Some((look.after_marking(), Instant::now()));
                }
            }
            Err(e) => {
                if !self.look_failing {
                    warn!(self.core.log, "the journal watch cannot look at redis; a loss of data is not noticed meanwhile (grant +info +exists +set, docs/redis.md)";
                        "error" => %e);
                    self.look_failing = true;
                }
            }
        }
        match round.retention {
            Ok(emptied) => {
                if self.retention_failing {
                    info!(self.core.log, "journal retention runs again");
                    self.retention_failing = false;
                }
                for slot in emptied {
                    debug!(self.core.log, "journal slot emptied"; "slot" => slot);
                }
            }
            Err(e) => {
                if !self.retention_failing {
                    warn!(self.core.log, "journal retention failed; the journal grows until it runs again";
                        "error" => %e);
                    self.retention_failing = true;
                }
            }
        }
        if let Some((loss, something)) = round.loss {
            self.noticed(loss, something);
        }
        self.reconcile_pending(ctx);
    }

    /// Tell of a loss, count it, and queue its reconcile.
    fn noticed(&mut self, loss: Loss, something: bool) {
        let node = rds::Redis::describe(&self.settings.redis);
        if loss.cause == "failover" && !something {
            info!(self.core.log, "redis failed over; the promoted replica has every journaled write";
                "node" => node, "detail" => &loss.detail);
            return;
        }
        self.metrics.redis_data_loss.with_label_values(&[loss.cause]).inc();
        if self.settings.on() {
            warn!(self.core.log, "redis lost data; writing the lost schedule entries again from the journal";
                "node" => node, "cause" => loss.cause, "detail" => &loss.detail,
                "window" => describe(&loss.window));
            // A loss of everything covers the ones before it.
            if loss.window == Window::All {
                self.pending.clear();
            }
            self.pending.push((loss, Instant::now()));
        } else {
            warn!(self.core.log, "redis lost data; schedule entries delivered before may be gone, and without journal.keep the relay cannot write them again (docs/journal.md)";
                "node" => node, "cause" => loss.cause, "detail" => &loss.detail);
        }
    }

    /// Run the oldest pending reconcile, beside the rounds.
    fn reconcile_pending(&mut self, ctx: &mut Context<Self>) {
        if self.reconciling || self.pending.is_empty() || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let Some((pg, redis)) = self.pools.clone() else {
            return;
        };
        self.reconciling = true;
        let (loss, noticed) = self.pending[0].clone();
        self.reconciling_since = Some(noticed);
        let mut selection = self.settings.selection(loss.window.clone());
        // Up to when it was noticed, and a tick's deadline more: a tick that
        // wrote to the old node just before may journal a little later.
        let slack = self.settings.round_timeout + Duration::from_secs(1);
        selection.until_secs_ago = noticed.elapsed().saturating_sub(slack).as_secs() as i64;
        let plan = Plan {
            selection,
            still_pending: self.settings.still_pending.clone(),
            jobs_id: self.settings.jobs_id,
            wait_replicas: self.settings.redis.wait_replicas,
            rate: self.settings.reconcile_rate,
            dry_run: false,
        };
        let log = self.core.log.clone();
        let cause = loss.cause;
        let restored = self.metrics.journal_restored.clone();
        let work = async move {
            let deadline = Deadline::after(Duration::from_secs(30));
            let mut conn = pg.checkout(deadline).await.map_err(|e| match e {
                CheckoutError::Deadline(e) => e.to_string(),
                CheckoutError::Pool(why) => why,
            })?;
            let mut last_line = Instant::now();
            let mut written = 0;
            let report = reconcile(&conn, &redis, &plan, |r: &Report| {
                restored.inc_by(r.written - written);
                written = r.written;
                if last_line.elapsed() >= PROGRESS_EVERY {
                    last_line = Instant::now();
                    info!(log, "reconciling the journal"; "examined" => r.examined, "missing" => r.missing,
                        "written" => r.written, "entries_per_second" => (r.examined as f64 / r.seconds.max(0.001)) as u64);
                }
            })
            .await;
            if let Err(ReconcileError::Stalled(_)) = &report {
                // Its statement may still run: cancel it, and never hand
                // the connection to the next round.
                pg.cancel_statement(&mut conn).await;
            }
            report.map_err(|e| e.to_string())
        };
        run_contained(
            self,
            ctx,
            "journal reconcile",
            Mode::Spawn,
            work,
            move |act, result, _| {
                act.reconciling = false;
                let since = act.reconciling_since.take();
                match result {
                    Ok(r) if r.refused > 0 => {
                        let why = r.refusal.as_deref().unwrap_or("no reason given");
                        act.failed(format!("redis refused lost entries: {why}"), r.refused, r.written);
                    }
                    Ok(r) if r.paused > 0 => {
                        act.retry_at = Some(Instant::now() + PAUSED_RETRY);
                        info!(act.core.log, "journal reconcile: entries of paused jobs wait for the resume; it starts again in a minute";
                        "paused" => r.paused, "written" => r.written);
                    }
                    Ok(r) => {
                        act.failures = 0;
                        act.last_failure = None;
                        // The loss it worked on, unless a larger one replaced it.
                        if let Some(i) = act.pending.iter().position(|(_, at)| Some(*at) == since) {
                            act.pending.remove(i);
                        }
                        info!(act.core.log, "journal reconciled: lost schedule entries written again";
                        "cause" => cause, "examined" => r.examined, "present" => r.present,
                        "missing" => r.missing, "written" => r.written, "cancelled" => r.cancelled,
                        "not_pending" => r.not_pending, "refused" => r.refused,
                        "seconds" => format!("{:.1}", r.seconds));
                    }
                    Err(e) => act.failed(e, 0, 0),
                }
            },
        );
    }

    /// A reconcile that failed (or that Redis refused entries of) tries
    /// again later, each time later, up to a minute apart: the loss stays
    /// pending. The first failure, and one with a new error, is a
    /// warning; a repeat is an info line, so a refusal that lasts an hour
    /// is one warning and a line a minute, not one every round.
    fn failed(&mut self, error: String, refused: u64, written: u64) {
        self.failures = self.failures.saturating_add(1);
        let wait = crate::domain::journal::retry_after(self.settings.watch_interval, self.failures);
        self.retry_at = Some(Instant::now() + wait);
        let retry_in_s = wait.as_secs();
        let tries = self.failures;
        let msg = "journal reconcile failed; the lost entries stay pending and it tries again";
        if self.last_failure.as_deref() == Some(error.as_str()) {
            info!(self.core.log, "{}", msg; "error" => &error, "refused" => refused, "written" => written, "tries" => tries, "retry_in_s" => retry_in_s);
        } else {
            warn!(self.core.log, "{}", msg; "error" => &error, "refused" => refused, "written" => written, "tries" => tries, "retry_in_s" => retry_in_s);
        }
        self.last_failure = Some(error);
    }
}

/// How long a reconcile that a pause held back waits before it tries again.
const PAUSED_RETRY: Duration = Duration::from_secs(60);

/// How often a running reconcile logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The loss window, for the log line.
fn describe(w: &Window) -> String {
    match w {
        Window::All => "every journaled entry".into(),
        Window::After { replid, offset } => {
            format!("entries acknowledged under replication {replid} at offset {offset} or later")
        }
        Window::Recent { secs } => format!("entries journaled in the last {secs}s"),
    }
}

/// The round's Postgres connection, checked out the first time it is needed.
async fn pg_conn<'a, 'p>(
    pg: &'p Pg,
    conn: &'a mut Option<bb8::PooledConnection<'p, crate::db::PgManager>>,
    deadline: Deadline,
) -> Result<&'a mut bb8::PooledConnection<'p, crate::db::PgManager>, String> {
    if conn.is_none() {
        *conn = Some(pg.checkout(deadline).await.map_err(|e| match e {
            CheckoutError::Deadline(e) => e.to_string(),
            CheckoutError::Pool(why) => why,
        })?);
    }
    conn.as_mut().ok_or_else(|| "no connection".to_string())
}

/// One round: look at the node, compare with the look before, and keep
/// the journal to `keep`. Each step is bounded by the round's deadline
/// and fails on its own: a look that fails does not stop retention, and a
/// Postgres that cannot tell whether the journal holds anything of a loss
/// counts as "it does" (a reconcile of nothing costs little; a loss not
/// repaired costs tasks).
async fn round(
    pg: Pg,
    redis: Redis,
    settings: JournalSettings,
    last: Option<(Observation, Instant)>,
    retention: bool,
    deadline: Deadline,
) -> Round {
    let look = look(&redis, &settings.redis.key_prefix, deadline).await;
    let mut conn = None;
    let mut loss = None;
    if let Ok(Some(now)) = &look {
        let before = last.as_ref().map(|(o, _)| o);
        let since = last.as_ref().map_or(Duration::ZERO, |(_, at)| at.elapsed());
        let journaled = settings.on()
            && before.is_none()
            && !now.marker
            && journal_holds(&pg, &mut conn, &settings.selection(Window::All), deadline).await;
        if let Some(l) = Loss::between(before, now, since, journaled) {
            let something =
                !settings.on() || journal_holds(&pg, &mut conn, &settings.selection(l.window.clone()), deadline).await;
            loss = Some((l, something));
        }
    }
    let retention = if retention {
        let width = crate::domain::journal::slot_width(settings.keep) as i64;
        async {
            let c = pg_conn(&pg, &mut conn, deadline).await?;
            deadline
                .run("journal retention", journal::empty_ahead(c, width))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.text())
        }
        .await
    } else {
        Ok(Vec::new())
    };
    if retention.is_err() {
        if let Some(mut c) = conn.take() {
            // A statement cut short may still hold a partition's lock.
            pg.cancel_statement(&mut c).await;
        }
    }
    Round { look, loss, retention }
}

/// One look at the node (`None` in a Redis Cluster). A connection that
/// reached a replica is dropped, so the next look asks again.
async fn look(redis: &Redis, prefix: &str, deadline: Deadline) -> Result<Option<Observation>, String> {
    let mut conn = checkout(redis, deadline).await.map_err(|e| e.to_string())?;
    if conn.cluster().is_some() {
        return Ok(None);
    }
    conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
    let seen = deadline.run("redis watch", rds::node::observe(&mut conn, prefix)).await;
    match seen {
        Ok(Ok(o)) => Ok(Some(o)),
        Ok(Err(e)) => {
            // A replica: ask again (Sentinel, DNS). A refusal (an ACL
            // without +info or +set) keeps its connection: a new one
            // would be refused the same, every round; a broken one the
            // pool drops by itself.
            if matches!(e, rds::node::ObserveError::Replica) {
                conn.discard();
            }
            Err(e.to_string())
        }
        Err(e) => {
            conn.discard();
            Err(e.to_string())
        }
    }
}

/// Whether the journal holds anything `sel` selects; `true` when
/// Postgres cannot say in time.
async fn journal_holds<'p>(
    pg: &'p Pg,
    conn: &mut Option<bb8::PooledConnection<'p, crate::db::PgManager>>,
    sel: &Selection,
    deadline: Deadline,
) -> bool {
    let Ok(c) = pg_conn(pg, conn, deadline).await else {
        return true;
    };
    match deadline.run("journal check", journal::any(&***c, sel)).await {
        Ok(Ok(holds)) => holds,
        Ok(Err(_)) => true,
        Err(_) => {
            // Still running on the server: never reused.
            if let Some(mut c) = conn.take() {
                pg.cancel_statement(&mut c).await;
            }
            true
        }
    }
}

impl Lifecycle for JournalActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let s = &self.settings;
        // Two Postgres connections: a reconcile holds one while the rounds
        // go on with the other.
        let pg = crate::db::pool(&s.database_url, 2, s.round_timeout)
            .map_err(|e| format!("cannot build the Postgres pool: {e}"))?;
        let redis = crate::config::RedisConfig {
            pool_size: 2,
            ..s.redis.clone()
        };
        let redis = rds::pool(&redis, s.round_timeout).map_err(|e| format!("cannot build the Redis pool: {e}"))?;
        self.pools = Some((pg, redis));
        every(self, ctx, self.settings.watch_interval, true, |act| Watch {
            deadline: Deadline::after(act.settings.round_timeout),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.pools = None;
        self.reconciling = false;
    }
}

crate::supervised_actor!(JournalActor);

impl Handler<Watch> for JournalActor {
    type Result = ();

    fn handle(&mut self, msg: Watch, ctx: &mut Self::Context) {
        guarded(self, ctx, "journal watch handler", |act, ctx| {
            fault_point("journal.watch");
            if act.core.expired(msg.deadline, "journal watch") {
                return;
            }
            let Some((pg, redis)) = act.pools.clone() else {
                return;
            };
            // A reconcile holds one of the two connections; retention
            // takes the other (a TRUNCATE behind its read waits at most
            // its lock_timeout).
            let retention = act.settings.on();
            let work = round(
                pg,
                redis,
                act.settings.clone(),
                act.last.clone(),
                retention,
                msg.deadline,
            );
            run_contained(act, ctx, "journal watch", Mode::Wait, work, Self::finish);
        });
    }
}
