//! `DeadLetterActor`: owns the dead-letter concern.
//!
//! Messages: [`RowsDeadLettered`] (a committed tick moved rows; log the
//! operator-facing warning, keep the count) and [`Purge`] (retention; sent to
//! itself every `dead_letter.purge_interval` when `dead_letter.retention` is
//! set, carrying its deadline). Owns: a one-connection Postgres pool, built
//! only when retention is on.
//!
//! The move itself happens inside the sweep's tick transaction
//! ([`crate::db::outbox::move_to_dead`]), because only that transaction
//! holds the claimed rows' locks: doing it anywhere else would either wait
//! on those locks or let another relay claim the rows in between.
//! Triage (list / requeue / purge on demand) is the `dead-letter` command,
//! on the same queries ([`crate::db::dead_letter`]).
//!
//! Failure: a panic, or `supervisor.error_budget` failed purges in a row,
//! fail the actor (restart by the supervisor with a fresh pool). A purge cut
//! short by its deadline keeps what it deleted (each batch commits) and
//! continues at the next round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{info, warn, Logger};

use super::lifecycle::{every, fail_dependency, fault_point, guarded, interval, run_contained, Core, Lifecycle, Mode};
use super::supervisor::Supervision;
use crate::db::dead_letter::{cutoff_ms, purge_batch};
use crate::db::{self, pg_error_text, CheckoutError, Pg};
use crate::deadline::{Deadline, Expired};
use crate::telemetry::health::ActorHealth;

/// Rows deleted per statement by the retention purge.
pub const RETENTION_BATCH: i64 = 1000;

/// Rows were moved to `task_outbox_dead` by a committed tick.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RowsDeadLettered {
    pub count: usize,
    pub last_error: String,
}

/// Delete dead letters older than the retention, before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Purge {
    pub deadline: Deadline,
}

#[derive(Debug, Clone)]
pub struct DeadLetterSettings {
    pub database_url: String,
    pub retention: Option<Duration>,
    pub purge_interval: Duration,
    /// Without retention: how often the actor proves it is alive
    /// (`health.interval`).
    pub heartbeat: Duration,
    /// Deadline of one purge round.
    pub round_timeout: Duration,
    pub error_budget: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("purge: {0}")]
    Query(String),
    #[error(transparent)]
    Deadline(#[from] Expired),
}

/// One retention round: delete batches of rows older than `retention`
/// until none are left or the deadline comes near. Each batch is its own
/// short transaction with a statement timeout from the time left.
pub async fn purge_expired(pg: &Pg, retention: Duration, deadline: Deadline) -> Result<u64, PurgeError> {
    let mut conn = pg.checkout(deadline).await.map_err(|e| match e {
        CheckoutError::Deadline(e) => PurgeError::Deadline(e),
        CheckoutError::Pool(why) => PurgeError::Pool(why),
    })?;
    let result = purge_on(&mut conn, retention, deadline).await;
    if matches!(result, Err(PurgeError::Deadline(_))) {
        // Stop the statement on the server too, not just our wait for it.
        pg.cancel_statement(&mut conn).await;
    }
    result
}

async fn purge_on(
    conn: &mut tokio_postgres::Client,
    retention: Duration,
    deadline: Deadline,
) -> Result<u64, PurgeError> {
    let q = |e: tokio_postgres::Error| PurgeError::Query(pg_error_text(&e));
    let cutoff = deadline
        .run("postgres purge cut-off", cutoff_ms(&*conn, retention))
        .await?
        .map_err(|e| PurgeError::Query(e.to_string()))?;
    let mut total = 0u64;
    while !deadline.expired() {
        let tx = deadline.run("postgres begin", conn.transaction()).await?.map_err(q)?;
        let t = deadline.pg_timeout();
        deadline
            .run(
                "postgres set timeout",
                tx.batch_execute(&format!("SET LOCAL statement_timeout = '{t}'")),
            )
            .await?
            .map_err(q)?;
        let n = deadline
            .run("postgres purge batch", purge_batch(&tx, cutoff, RETENTION_BATCH))
            .await?
            .map_err(|e| PurgeError::Query(e.to_string()))?;
        deadline.run("postgres commit", tx.commit()).await?.map_err(q)?;
        total += n;
        if n < RETENTION_BATCH as u64 {
            break;
        }
    }
    Ok(total)
}

pub struct DeadLetterActor {
    settings: DeadLetterSettings,
    core: Core,
    /// Rows moved since the process started (survives actor restarts).
    pub moved: Arc<AtomicU64>,
    pool: Option<Pg>,
}

impl DeadLetterActor {
    pub fn new(
        settings: DeadLetterSettings,
        moved: Arc<AtomicU64>,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        log: &Logger,
    ) -> Self {
        DeadLetterActor {
            core: Core::new(health, supervision, settings.error_budget, log),
            settings,
            moved,
            pool: None,
        }
    }

    fn finish_purge(&mut self, result: Result<u64, PurgeError>, ctx: &mut Context<Self>) {
        match result {
            Ok(n) => {
                self.core.health.ok();
                if n > 0 {
                    info!(self.core.log, "dead letters purged by retention"; "count" => n,
                        "older_than_ms" => self.settings.retention.map_or(0, |d| d.as_millis() as u64));
                }
            }
            Err(e) => {
                let streak = self.core.failed(&e.to_string(), matches!(e, PurgeError::Deadline(_)));
                warn!(self.core.log, "dead-letter retention purge failed; it runs again next interval";
                    "error" => %e, "consecutive_failures" => streak);
                if self.core.budget_spent(streak) {
                    fail_dependency(self, ctx, format!("{streak} consecutive failed purges, last: {e}"));
                }
            }
        }
    }
}

impl Lifecycle for DeadLetterActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    /// Event-driven without retention (plus a heartbeat); with it, a purge
    /// every interval.
    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        if self.settings.retention.is_none() {
            // Nothing on a cadence but this: a heartbeat through the
            // actor's own timers, so a dead or wedged actor goes stale.
            interval(ctx, self.settings.heartbeat, |act, _| act.core.health.alive());
            return Ok(());
        }
        let pool = db::pool(&self.settings.database_url, 1, self.settings.round_timeout)
            .map_err(|e| format!("cannot build the Postgres pool: {e}"))?;
        self.pool = Some(pool);
        every(self, ctx, self.settings.purge_interval, false, |act| Purge {
            deadline: Deadline::after(act.settings.round_timeout),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.pool = None;
    }
}

crate::supervised_actor!(DeadLetterActor);

impl Handler<RowsDeadLettered> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: RowsDeadLettered, ctx: &mut Self::Context) {
        // A panic here loses only the report: the rows are already safe in
        // task_outbox_dead.
        let reported = guarded(self, ctx, "dead-letter report", |act, _| {
            fault_point("dead_letter.report");
            let total = act.moved.fetch_add(msg.count as u64, Ordering::Relaxed) + msg.count as u64;
            warn!(act.core.log, "rows moved to the dead-letter table";
                "count" => msg.count, "last_error" => &msg.last_error, "total_since_start" => total);
        });
        if reported.is_some() && self.settings.retention.is_none() {
            self.core.health.ok();
        }
    }
}

impl Handler<Purge> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: Purge, ctx: &mut Self::Context) {
        guarded(self, ctx, "purge handler", |act, ctx| {
            if act.core.expired(msg.deadline, "purge") {
                return;
            }
            let (Some(pg), Some(retention)) = (act.pool.clone(), act.settings.retention) else {
                return;
            };
            let round = async move { purge_expired(&pg, retention, msg.deadline).await };
            run_contained(act, ctx, "purge", Mode::Wait, round, Self::finish_purge);
        });
    }
}
