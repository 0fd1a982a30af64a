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
use slog::{info, warn, Logger};

use super::reconcile::{reconcile, Plan, Report};
use crate::actors::lifecycle::{every, fault_point, guarded, run_contained, Core, Lifecycle, Mode};
use crate::actors::small_pools;
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
        }
    }
}

/// What one round found.
struct Round {
    look: Option<Observation>,
    /// A loss noticed, and whether the journal holds anything of its window.
    loss: Option<(Loss, bool)>,
    emptied: Option<u64>,
}

pub struct JournalActor {
    settings: JournalSettings,
    core: Core,
    pools: Option<(Pg, Redis)>,
    metrics: Metrics,
    /// The last look at the node, and when.
    last: Option<(Observation, Instant)>,
    /// Losses not yet reconciled (oldest first).
    pending: Vec<Loss>,
    reconciling: bool,
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
            reconciling: false,
        }
    }

    fn finish(&mut self, result: Result<Round, String>, ctx: &mut Context<Self>) {
        let round = match result {
            Ok(r) => r,
            Err(e) => {
                let streak = self.core.failed(&e, false);
                warn!(self.core.log, "journal watch round failed; it runs again next interval";
                    "error" => %e, "consecutive_failures" => streak);
                return;
            }
        };
        self.core.health.ok();
        if let Some(slot) = round.emptied {
            info!(self.core.log, "journal slot emptied"; "slot" => slot);
        }
        if let Some(look) = round.look {
            self.last = Some((look, Instant::now()));
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
            self.pending.push(loss);
        } else {
            warn!(self.core.log, "redis lost data; schedule entries delivered before may be gone, and without journal.keep the relay cannot write them again (docs/journal.md)";
                "node" => node, "cause" => loss.cause, "detail" => &loss.detail);
        }
    }

    /// Run the oldest pending reconcile, beside the rounds.
    fn reconcile_pending(&mut self, ctx: &mut Context<Self>) {
        if self.reconciling || self.pending.is_empty() {
            return;
        }
        let Some((pg, redis)) = self.pools.clone() else {
            return;
        };
        self.reconciling = true;
        let loss = self.pending[0].clone();
        let plan = Plan {
            selection: self.settings.selection(loss.window.clone()),
            still_pending: self.settings.still_pending.clone(),
            jobs_id: self.settings.jobs_id,
            wait_replicas: self.settings.redis.wait_replicas,
            rate: self.settings.reconcile_rate,
            dry_run: false,
        };
        let log = self.core.log.clone();
        let restored = self.metrics.journal_restored.clone();
        let work = async move {
            let deadline = Deadline::after(Duration::from_secs(30));
            let conn = pg.checkout(deadline).await.map_err(|e| match e {
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
            .await
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(report)
        };
        run_contained(self, ctx, "journal reconcile", Mode::Spawn, work, |act, result, _| {
            act.reconciling = false;
            match result {
                Ok(r) => {
                    let loss = act.pending.remove(0);
                    info!(act.core.log, "journal reconciled: lost schedule entries written again";
                        "cause" => loss.cause, "examined" => r.examined, "present" => r.present,
                        "missing" => r.missing, "written" => r.written, "cancelled" => r.cancelled,
                        "not_pending" => r.not_pending, "refused" => r.refused,
                        "seconds" => format!("{:.1}", r.seconds));
                }
                Err(e) => {
                    warn!(act.core.log, "journal reconcile failed; it starts again at the next round"; "error" => e);
                }
            }
        });
    }
}

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

/// One round: look, compare, and empty the next slot.
async fn round(
    pg: Pg,
    redis: Redis,
    settings: JournalSettings,
    last: Option<(Observation, Instant)>,
    retention: bool,
    deadline: Deadline,
) -> Result<Round, String> {
    let mut out = Round {
        look: None,
        loss: None,
        emptied: None,
    };
    let look = {
        let mut conn = checkout(&redis, deadline).await.map_err(|e| e.to_string())?;
        if conn.cluster().is_some() {
            None
        } else {
            conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
            let prefix = settings.redis.key_prefix.clone();
            Some(
                deadline
                    .run("redis watch", rds::node::observe(&mut conn, &prefix))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    // Postgres only when the round needs it: a running reconcile holds
    // the one connection.
    let mut conn = None;
    if let Some(look) = look {
        let before = last.as_ref().map(|(o, _)| o);
        let since = last.as_ref().map_or(Duration::ZERO, |(_, at)| at.elapsed());
        let journaled = if settings.on() && before.is_none() && !look.marker {
            let c = pg_conn(&pg, &mut conn, deadline).await?;
            journal::any(&***c, &settings.selection(Window::All))
                .await
                .map_err(|e| e.text())?
        } else {
            false
        };
        if let Some(loss) = Loss::between(before, &look, since, journaled) {
            let something = if settings.on() {
                let c = pg_conn(&pg, &mut conn, deadline).await?;
                journal::any(&***c, &settings.selection(loss.window.clone()))
                    .await
                    .map_err(|e| e.text())?
            } else {
                true
            };
            out.loss = Some((loss, something));
        }
        out.look = Some(look);
    }
    if retention {
        let c = pg_conn(&pg, &mut conn, deadline).await?;
        let width = crate::domain::journal::slot_width(settings.keep) as i64;
        // A reader in the way (a long reconcile) makes TRUNCATE give up
        // after its lock_timeout: tried again next round.
        match journal::empty_next_slot(c, width).await {
            Ok(emptied) => out.emptied = emptied,
            Err(e) => return Err(format!("journal retention: {}", e.text())),
        }
    }
    Ok(out)
}

impl Lifecycle for JournalActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let s = &self.settings;
        self.pools = Some(small_pools(&s.database_url, &s.redis, s.round_timeout)?);
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
            // The one Postgres connection is the reconcile's while it runs.
            let retention = act.settings.on() && !act.reconciling;
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
