//! `SweepActor`: owns the tick — claim due rows, dispatch them, settle them,
//! all in one Postgres transaction.
//!
//! Messages: [`Tick`] (carries its deadline; sent to itself), [`Wake`] (new
//! rows were committed: skip the rest of the idle wait), [`Stop`] (answered
//! once the tick in flight has finished or rolled back).
//! Owns: its Postgres pool (built in `started`, so a restart reconnects).
//!
//! `sweep.concurrency` lanes each run one tick at a time (spawned on the
//! actor's context, each with its own connection and claimed batch; SKIP
//! LOCKED keeps them apart). A lane schedules its next tick when the current
//! one ends: at once after a full batch (drain mode), after `sweep.interval`
//! otherwise. `Stop` waits for every tick in flight.
//! The I/O is [`run_tick`], a plain async function.
//!
//! Failure: any error rolls the transaction back (nothing half-applied;
//! the rows stay in the outbox for a later tick). A lost Postgres
//! connection, a panic, or `supervisor.error_budget` consecutive failed
//! ticks make the actor fail: the supervisor restarts it, after a backoff,
//! with a fresh pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{debug, error, info, warn, Logger};

use super::dead_letter::RowsDeadLettered;
use super::dispatch::DispatchBatch;
use super::lifecycle::{
    contain, fail, fail_dependency, fault_point, guarded, interval, later, wedge_point, Core, Lifecycle,
};
use super::supervisor::Supervision;
use crate::db::listen::{Heard, Role, Snapshot};
use crate::db::outbox::{self, ClaimCursor, ClaimOrder};
use crate::db::schema::{ClaimMode, Schema};
use crate::db::{self, is_connection_lost, is_statement_timeout, pg_error_text, CheckoutError, Pg};
use crate::deadline::{Deadline, Expired};
use crate::domain::{encode_rows, settle, ClaimLimit, EntryOutcome, RetryPolicy, RowOutcome};
use crate::redis::pipeline::DispatchError;
use crate::telemetry::health::ActorHealth;
use crate::telemetry::logging::Throttle;
use crate::telemetry::metrics::Metrics;

/// How long a commit may run past the deadline. The outcome of a commit cut
/// short is unknown, and both outcomes are safe (ZADD is idempotent), so a
/// short grace beats abandoning a commit that is about to succeed.
const COMMIT_GRACE: Duration = Duration::from_secs(1);

/// What a tick needs, fixed for the actor's life.
#[derive(Clone, Debug)]
pub struct SweepSettings {
    pub database_url: String,
    pub pool_size: u32,
    pub batch_size: u32,
    /// `sweep.max_batch_bytes`: what one tick may claim (see
    /// [`ClaimLimit`]).
    pub max_batch_bytes: u64,
    pub interval: Duration,
    /// `sweep.listen_poll_interval`: how often an idle lane claims while
    /// the listener hears new rows (they are announced; a poll only looks
    /// for what no notification announces).
    pub listen_poll: Duration,
    pub tick_timeout: Duration,
    pub key_prefix: String,
    /// Ticks run at once, each with its own claimed batch and connection.
    pub concurrency: u32,
    /// Drain ticks run at once while new rows keep arriving: fewer drain
    /// ticks leave CPU for the fresh lane (latency) at some cost to how
    /// fast a backlog drains meanwhile. A backlog with no new rows drains
    /// with all `concurrency` lanes.
    pub live_concurrency: u32,
    /// Consecutive failed ticks after which the actor is restarted.
    pub error_budget: u32,
    pub retry: RetryPolicy,
    /// The id column types, read from the catalog at start (UUID or TEXT:
    /// the Go sweeper's database mixes them).
    pub schema: Arc<Schema>,
    /// Set when `task_outbox` changed under the relay (a column added, a
    /// type changed, INSERT revoked, a foreign key added) or a put-back
    /// failed: every later tick claims by locking, until the process
    /// restarts and reads the catalog again. Shared by the lanes, kept
    /// across actor restarts.
    pub claim_fallback: Arc<ClaimFallback>,
}

/// Why delete claims stopped (see [`SweepSettings::claim_fallback`]).
#[derive(Debug, Default)]
pub struct ClaimFallback(std::sync::Mutex<Option<String>>);

impl ClaimFallback {
    /// Fall back for `why`; true only the first time (one warning line).
    pub fn set(&self, why: String) -> bool {
        match self.0.lock() {
            Ok(mut g) if g.is_none() => {
                *g = Some(why);
                true
            }
            _ => false,
        }
    }

    /// The claim mode in force given the one read at start.
    pub fn mode(&self, at_start: &ClaimMode) -> ClaimMode {
        match self.0.lock().ok().and_then(|g| g.clone()) {
            Some(why) => ClaimMode::Lock(why),
            None => at_start.clone(),
        }
    }
}

/// Counters shared with the process (progress line, later metrics); they
/// outlive actor restarts.
#[derive(Debug, Default)]
pub struct SweepStats {
    pub dispatched: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub ticks_ok: AtomicU64,
    pub ticks_error: AtomicU64,
    pub ticks_deadline: AtomicU64,
    pub restarts: AtomicU64,
}

/// Rows a fresh-lane tick claims at most.
pub const FRESH_BATCH: u32 = 20;

/// New rows were committed this recently: the relay is serving live
/// traffic, and while it does, at most `sweep.live_concurrency` drain
/// ticks run at once (see [`SweepSettings::live_concurrency`]).
const LIVE_WINDOW: Duration = Duration::from_secs(1);

/// How soon a drain lane held back by live traffic looks again.
const LIVE_RECHECK: Duration = Duration::from_millis(20);

/// Lanes resume their claim after the last key claimed, so they do not
/// re-walk the index entries of rows already delivered; at least this often
/// a claim starts from the beginning instead, so rows that appear behind the
/// cursor (a producer transaction that committed late with an old `now()`,
/// another relay's tick that rolled back) wait at most this long, while
/// such a claim is cheap.
pub const FULL_SCAN_EVERY: Duration = Duration::from_millis(250);

/// A claim from the beginning walks every index entry of the rows deleted
/// since vacuum last ran (with autovacuum off, or behind a snapshot held
/// open, that grows by the delivery rate: 1.2 million entries in two
/// minutes at 10,000 rows/s, tens of milliseconds a claim). So the next one
/// waits this many times as long as the last one took, between
/// [`FULL_SCAN_EVERY`] and [`FULL_SCAN_AT_MOST`]: at most 1 % of a lane's
/// time goes to them, and the other claims keep their time.
const FULL_SCAN_COST_FACTOR: u32 = 100;

/// The longest a row behind the cursor waits for a claim from the beginning.
pub const FULL_SCAN_AT_MOST: Duration = Duration::from_secs(10);

/// A tick still running this long past its deadline is wedged: every
/// stage of a tick ends at the deadline (a commit gets `COMMIT_GRACE`, a
/// cancel `CANCEL_WAIT`), so only a bug keeps one going. The watchdog sees
/// only the whole actor, which keeps showing work while another lane
/// drains; this catches the lane.
const LANE_WEDGE_GRACE: Duration = Duration::from_secs(5);

/// How often the sweep looks for a wedged lane.
const LANE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What a tick is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// One of the `sweep.concurrency` lanes: oldest rows first, full batches,
    /// reschedules itself.
    Drain,
    /// A one-off tick started by a wake-up while every lane is busy: the
    /// newest rows first, so a just-committed row does not wait behind a
    /// backlog.
    Fresh,
}

/// When the next claim from the beginning is due after one that took
/// `claim_us`: [`FULL_SCAN_COST_FACTOR`] times as long, within
/// [`FULL_SCAN_EVERY`]..=[`FULL_SCAN_AT_MOST`].
pub fn full_scan_every(claim_us: u64) -> Duration {
    Duration::from_micros(claim_us.saturating_mul(u64::from(FULL_SCAN_COST_FACTOR)))
        .clamp(FULL_SCAN_EVERY, FULL_SCAN_AT_MOST)
}

impl Lane {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Drain => "drain",
            Lane::Fresh => "fresh",
        }
    }
}

/// Run one sweep tick before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Tick {
    pub deadline: Deadline,
    pub lane: Lane,
}

/// New rows were committed (LISTEN/NOTIFY): tick now instead of waiting
/// out `sweep.interval`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wake;

/// Finish (or roll back) the tick in flight and schedule no more.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Stop;

/// What one successful tick did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TickReport {
    /// From checkout to the claim's answer (BEGIN, claim, shape check).
    pub claim_us: u64,
    /// A drain claim from the beginning (no cursor).
    pub full_scan: bool,
    pub claimed: usize,
    /// The most rows the claim could take ([`ClaimLimit`]): as many
    /// claimed is a full batch.
    pub limit: usize,
    /// The largest claimed row ([`crate::domain::OutboxRow::bytes`]).
    pub max_row_bytes: u64,
    pub delivered: usize,
    pub retried: usize,
    pub dead_lettered: usize,
    /// Rows of cancelled jobs, deleted unsent (the cancel fence stopped their ZADD).
    pub cancelled: usize,
    pub deferred: usize,
    /// Redis gave no usable reply: no row was charged an attempt.
    pub redis_unavailable: Option<String>,
    /// Writes are held back: Redis memory is at `redis.max_memory_ratio`.
    pub back_pressure: Option<String>,
    /// Redis reported a server-wide condition for some entries (OOM, READONLY, WAIT shortfall).
    pub deferred_reason: Option<String>,
    pub last_retry_error: Option<String>,
    pub last_dead_error: Option<String>,
    /// Rows bound for the dead table that it cannot hold, set aside in the
    /// outbox: (outbox id, why).
    pub set_aside: Vec<(i64, String)>,
    /// Per delivered row: seconds from `created_at`, and from `run_at`, to
    /// its ZADD acknowledged (observed once the tick has committed).
    pub delivery_lags: Vec<(f64, f64)>,
    /// Key of the last row claimed (oldest-first lanes resume after it).
    pub cursor: Option<ClaimCursor>,
    /// Something was paused when the tick claimed: the next claim skips
    /// paused jobs in SQL.
    pub pauses_seen: bool,
    /// Microseconds spent in each stage: claim (checkout, begin, claim),
    /// dispatch (encode and the ZADD round trip), settle, commit.
    pub stage_us: [u64; 4],
    /// The snapshot taken just before the claim (a listening relay's
    /// claims): every transaction it shows committed is seen by the claim.
    pub snapshot: Option<Snapshot>,
    /// How long until the next row not yet due at the claim comes due (by
    /// the database's clock).
    pub next_due_in: Option<Duration>,
    /// Some rows were left as they were, due now (Redis unavailable or
    /// held back, a write whose outcome is unknown).
    pub left_due: bool,
    /// How long until the first row this tick put back for later (a
    /// retry, a postponed write) comes due.
    pub put_back_in: Option<Duration>,
    /// Postgres refused a settle write (`stage`, `reason`): how many rows
    /// were kept in the outbox, and how.
    pub settle_refused: Option<(&'static str, String, usize, Kept)>,
}

/// Why a tick was abandoned. The transaction was rolled back in every case.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("{stage}: {reason}")]
    Db { stage: &'static str, reason: String },
    #[error("statement timeout during {stage}")]
    StatementTimeout { stage: &'static str },
    #[error(transparent)]
    Deadline(#[from] Expired),
    #[error("dispatch actor unreachable: {0}")]
    Mailbox(String),
    #[error("commit outcome unknown: {0}")]
    CommitUnknown(String),
    /// The rows could not be put back (a delete claim) or `task_outbox`
    /// changed since start: the tick rolled back, and the sweep claims by
    /// locking from now on. Not a failure of the tick's rows.
    #[error("{0}")]
    ClaimFallback(String),
    #[error("connection lost during {stage}: {reason}")]
    ConnectionLost { stage: &'static str, reason: String },
    /// Another transaction was in the way (a deadlock, a serialization
    /// failure, `lock_timeout`): the tick is tried again, nothing refused.
    #[error("{stage}: {reason} (contention; the rows are claimed again)")]
    Contention { stage: &'static str, reason: String },
    /// The session's server takes no writes (SQLSTATE 25006: a standby, a
    /// server set read-only behind the same address).
    #[error("postgres takes no writes (read-only server) during {stage}: {reason}")]
    ReadOnly { stage: &'static str, reason: String },
}

impl TickError {
    /// Whether the tick ran out of time (as opposed to failing).
    pub fn is_deadline(&self) -> bool {
        matches!(self, TickError::Deadline(_) | TickError::StatementTimeout { .. })
    }

    /// The Postgres connection died under the tick (server restart,
    /// `pg_terminate_backend`, network) or its server takes no writes (a
    /// failover's old primary, a standby): the pool is suspect, restart
    /// (its new connections are to a server that takes writes, see
    /// [`db::pool`]).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, TickError::ConnectionLost { .. } | TickError::ReadOnly { .. })
    }

    fn db(stage: &'static str) -> impl Fn(tokio_postgres::Error) -> TickError {
        move |e| {
            if is_statement_timeout(&e) {
                TickError::StatementTimeout { stage }
            } else if is_connection_lost(&e) {
                TickError::ConnectionLost {
                    stage,
                    reason: pg_error_text(&e),
                }
            } else if db::is_read_only(&e) {
                TickError::ReadOnly {
                    stage,
                    reason: pg_error_text(&e),
                }
            } else if is_contention(&e) {
                TickError::Contention {
                    stage,
                    reason: pg_error_text(&e),
                }
            } else {
                TickError::Db {
                    stage,
                    reason: pg_error_text(&e),
                }
            }
        }
    }
}

/// SQLSTATE class 40 (a deadlock, a serialization failure) or 55P03
/// (`lock_timeout`): another transaction was in the way, nothing refused.
fn is_contention(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("40") || c.code() == "55P03")
}

/// One tick: claim, encode, dispatch, settle, commit.
///
/// A tick that runs out of time may leave a statement running on the
/// server (one blocked behind a lock, say), holding the rows it claimed
/// until its own `statement_timeout`: the tick then cancels it through the
/// connection's cancel token, so the locks go at the deadline, and only
/// then hands the connection back to the pool (a cancel must not hit the
/// next tick's statement).
pub async fn run_tick(
    pg: &Pg,
    dispatch: &Recipient<DispatchBatch>,
    settings: &SweepSettings,
    lane: Lane,
    claim: ClaimPlan,
    deadline: Deadline,
) -> Result<TickReport, TickError> {
    let claim_started = std::time::Instant::now();
    let mut conn = pg.checkout(deadline).await.map_err(|e| match e {
        CheckoutError::Deadline(e) => TickError::Deadline(e),
        CheckoutError::Pool(why) => TickError::Pool(why),
    })?;
    let result = tick_on(&mut conn, dispatch, settings, lane, claim, deadline, claim_started).await;
    if matches!(result, Err(TickError::Deadline(_) | TickError::CommitUnknown(_))) {
        // The transaction was dropped (its ROLLBACK is queued behind the
        // statement); cancel the statement itself. Bounded: a server that
        // does not answer a cancel is not waited for. Its state is unknown
        // (a ROLLBACK queued, the cancel maybe landing later): the
        // connection never goes to the next tick.
        pg.cancel_statement(&mut conn).await;
    }
    result
}

async fn tick_on(
    conn: &mut tokio_postgres::Client,
    dispatch: &Recipient<DispatchBatch>,
    settings: &SweepSettings,
    lane: Lane,
    ClaimPlan {
        from,
        skip_paused,
        rows,
        horizon,
    }: ClaimPlan,
    deadline: Deadline,
    claim_started: std::time::Instant,
) -> Result<TickReport, TickError> {
    // The first tick since a (re)start sizes itself by the rows due.
    let (rows, probed) = if rows == 0 {
        let largest = deadline
            .run(
                "postgres size probe",
                outbox::largest_due_row(conn, i64::from(settings.batch_size)),
            )
            .await?
            .map_err(TickError::db("postgres size probe"))?;
        (
            ClaimLimit::first(settings.batch_size, settings.max_batch_bytes, largest),
            largest,
        )
    } else {
        (rows, 0)
    };
    let (limit, order) = match lane {
        Lane::Drain => (i64::from(rows), ClaimOrder::Oldest),
        Lane::Fresh => (i64::from(rows.min(FRESH_BATCH)), ClaimOrder::Newest),
    };
    let mode = &settings.claim_fallback.mode(&settings.schema.claim);
    let delete_claim = *mode == ClaimMode::Delete;
    // Only SET LOCAL: it ends with the transaction, so nothing leaks to the
    // next user of a pooled (or pgbouncer) server connection.
    // synchronous_commit = off is safe here: a tick's commit lost in a
    // Postgres crash only brings its rows back into the outbox, and they are
    // re-sent (ZADD is idempotent); nothing can be lost that way. It spares
    // every tick a WAL flush wait.
    let t = deadline.pg_timeout();
    // outbox_relay.put_back: rows put back are no new work, and migration
    // 5's trigger sends no NOTIFY for them.
    let set_sql = format!(
        "SET LOCAL statement_timeout = '{t}'; SET LOCAL idle_in_transaction_session_timeout = '{t}';
         SET LOCAL synchronous_commit = off{}",
        if delete_claim {
            "; SET LOCAL outbox_relay.put_back = on"
        } else {
            ""
        }
    );
    let mut skip_paused = skip_paused;
    let (tx, claimed, scopes, seen) = loop {
        let tx = deadline
            .run("postgres begin", conn.transaction())
            .await?
            .map_err(TickError::db("postgres begin"))?;
        let set = tx.batch_execute(&set_sql);
        // Before the claim: the pauses, and (the listen lead) what the
        // claim will see at least and when the next row not yet due comes due.
        let scopes = outbox::pauses_and_horizon(&tx, horizon);
        let claim = outbox::claim_due(&tx, mode, limit, order, from, skip_paused);
        // All go out together (pipelined); the server runs them in order.
        let (set, scopes, claim) = deadline
            .run("postgres claim", async { tokio::join!(set, scopes, claim) })
            .await?;
        set.map_err(TickError::db("postgres set timeouts"))?;
        let (scopes, seen) = scopes.map_err(TickError::db("read pauses"))?;
        let claimed = claim.map_err(TickError::db("postgres claim"))?;
        // The claim skips paused jobs only while the last tick saw a pause
        // (the filter costs every claim); one that took a row of a job
        // paused since is rolled back (the rows are untouched) and claimed
        // again with the filter.
        if !skip_paused && outbox::claimed_paused(&scopes, &claimed.rows) {
            deadline
                .run("postgres rollback", tx.rollback())
                .await?
                .map_err(TickError::db("postgres rollback"))?;
            skip_paused = true;
            continue;
        }
        break (tx, claimed, scopes, seen);
    };
    let claimed_at = std::time::Instant::now();
    let mut report = TickReport {
        claim_us: claimed_at.duration_since(claim_started).as_micros() as u64,
        full_scan: lane == Lane::Drain && from.is_none(),
        claimed: claimed.rows.len(),
        limit: limit as usize,
        max_row_bytes: claimed.max_row_bytes.max(probed),
        cursor: claimed.cursor,
        pauses_seen: !scopes.is_empty(),
        snapshot: seen.as_ref().and_then(|h| h.snapshot.clone()),
        next_due_in: seen.and_then(|h| h.next_due_in),
        ..TickReport::default()
    };
    if claimed.rows.is_empty() {
        deadline
            .run("postgres commit", tx.commit())
            .await?
            .map_err(TickError::db("postgres commit"))?;
        return Ok(report);
    }
    let rows = &claimed.rows;

    let mut clock = std::time::Instant::now();
    let mut lap = |slot: &mut u64| {
        let now = std::time::Instant::now();
        *slot = now.duration_since(clock).as_micros() as u64;
        clock = now;
    };
    let mut stage_us = [0u64; 4];
    stage_us[0] = claim_started.elapsed().as_micros() as u64;
    let (entries, entry_rows, mut outcomes) = encode_rows(rows, &settings.key_prefix);
    if !entries.is_empty() {
        let reply = deadline
            .run("redis dispatch", dispatch.send(DispatchBatch { entries, deadline }))
            .await?
            .map_err(|e| TickError::Mailbox(e.to_string()))?;
        match reply {
            Ok(per_entry) => {
                for (k, o) in per_entry.into_iter().enumerate() {
                    outcomes[entry_rows[k]] = match o {
                        EntryOutcome::Delivered => RowOutcome::Delivered,
                        EntryOutcome::Cancelled => RowOutcome::Cancelled,
                        EntryOutcome::Rejected(e) => RowOutcome::Failed(e),
                        EntryOutcome::Deferred(e) => {
                            report.deferred_reason = Some(e);
                            RowOutcome::Postponed
                        }
                        // Maybe written with the row's score: keep the row
                        // (and so the score) as it is for the re-send.
                        EntryOutcome::Unknown(e) => {
                            report.deferred_reason = Some(e);
                            RowOutcome::Deferred
                        }
                    };
                }
            }
            // The outcome of the ZADDs is unknown: settle nothing.
            Err(DispatchError::Deadline(e)) => return Err(TickError::Deadline(e)),
            // Not the rows' fault: they stay as they are (outcomes remain Deferred).
            Err(DispatchError::Unavailable(why)) => report.redis_unavailable = Some(why),
            // Held back on purpose (Redis nearly full): the rows wait as they are.
            Err(DispatchError::BackPressure(why)) => report.back_pressure = Some(why),
        }
    }

    lap(&mut stage_us[1]);
    // Acknowledged now: the ages at the claim (database clock) plus the
    // time since (this process's monotonic clock).
    let since_claim = claimed_at.elapsed().as_secs_f64();
    report.delivery_lags = rows
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, RowOutcome::Delivered))
        .map(|(r, _)| {
            let (created, due) = r.age_at_claim_ms;
            (
                created.max(0) as f64 / 1000.0 + since_claim,
                due.max(0) as f64 / 1000.0 + since_claim,
            )
        })
        .collect();
    let mut plan = settle(rows, outcomes, &settings.retry);
    let schema = &settings.schema;
    plan.set_aside(rows, |r| schema.dead_letter_refusal(&r.task_id, &r.job_id));
    report.set_aside = plan
        .aside_ids
        .iter()
        .copied()
        .zip(plan.aside_reasons.iter().cloned())
        .collect();
    report.delivered = plan.delete.len() - plan.cancelled;
    report.cancelled = plan.cancelled;
    report.retried = plan.retry_ids.len();
    report.dead_lettered = plan.dead_ids.len();
    report.deferred = plan.deferred;
    report.last_retry_error = plan.last_retry_error.clone();
    report.last_dead_error = plan.dead_errors.last().cloned();
    report.left_due = plan.deferred > plan.postpone_ids.len();
    report.put_back_in = plan.earliest_put_back();

    if delete_claim && plan.changes_nothing() {
        // Every row stays as it was (Redis unavailable, held back): a
        // rollback puts them all back, cheaper than re-inserting them.
        deadline
            .run("postgres rollback", tx.rollback())
            .await?
            .map_err(TickError::db("postgres rollback"))?;
        lap(&mut stage_us[2]);
        report.stage_us = stage_us;
        return Ok(report);
    }
    // A delete claim took the rows out already: the delivered ones are
    // done, and the ones that stay are put back (same id, same values)
    // before the writes after it update or move them.
    let (delete, restore): (&[i64], &[usize]) = if delete_claim {
        (&[], &plan.stays)
    } else {
        (&plan.delete, &[])
    };
    // A delete claim whose rows were all delivered has nothing to write.
    if plan.needs_writes(delete_claim) {
        // Statements pipelined on one connection, run by the server in
        // this order, each with the time left now as its statement_timeout
        // (not the tick's whole budget from when the claim started).
        let reset_timeout = format!("SET LOCAL statement_timeout = '{}'", deadline.pg_timeout());
        let settle_all = async {
            // `biased`: polled in the order the statements run, so when one
            // fails the error returned is its own, not the "transaction
            // aborted" of a later statement answered in the same read.
            tokio::try_join!(
                biased;
                async {
                    tx.batch_execute(&reset_timeout)
                        .await
                        .map_err(TickError::db("set statement timeout"))
                },
                // Putting rows back depends on the table's shape: read it
                // first in the same round trip (only in ticks that put rows
                // back; the claim's lock has kept ALTER TABLE out since).
                async {
                    if restore.is_empty() {
                        return Ok(None);
                    }
                    outbox::shape(&tx)
                        .await
                        .map(Some)
                        .map_err(TickError::db("read the outbox's shape"))
                },
                async {
                    // A lasting failure here (INSERT revoked, a trigger, a
                    // check added) would fail every such tick after its
                    // ZADDs: the sweep claims by locking from then on
                    // instead. A passing one (the connection, a timeout, a
                    // read-only server, a deadlock or lock timeout) is the
                    // tick's, tried again.
                    outbox::restore(&tx, schema, &claimed, restore).await.map_err(|e| {
                        if is_connection_lost(&e)
                            || is_statement_timeout(&e)
                            || db::is_read_only(&e)
                            || is_contention(&e)
                        {
                            TickError::db("restore claimed rows")(e)
                        } else {
                            TickError::ClaimFallback(format!("putting claimed rows back failed: {}", pg_error_text(&e)))
                        }
                    })
                },
                async {
                    outbox::delete(&tx, delete)
                        .await
                        .map_err(TickError::db("delete delivered"))
                },
                async {
                    outbox::reschedule(&tx, &plan.retry_ids, &plan.retry_delays_ms)
                        .await
                        .map_err(TickError::db("reschedule failed"))
                },
                async {
                    outbox::move_to_dead(&tx, schema, &plan.dead_ids, &plan.dead_errors)
                        .await
                        .map_err(TickError::db("move to dead letters"))
                },
                async {
                    outbox::set_aside(&tx, &plan.aside_ids)
                        .await
                        .map_err(TickError::db("set aside"))
                },
                async {
                    outbox::postpone(&tx, &plan.postpone_ids, plan.postpone_delay_ms)
                        .await
                        .map_err(TickError::db("postpone deferred"))
                },
            )
        };
        let (_, shape, restored, ..) = match deadline.run("postgres settle", settle_all).await? {
            Ok(done) => done,
            // A table refused one of the writes (a trigger that raises, a
            // check, a revoked privilege): left to itself the rollback
            // would return the whole batch and the next tick would send it
            // again, forever. Keep what Redis accepted and put off the rest.
            Err(TickError::Db { stage, reason }) => {
                deadline
                    .run("postgres rollback", tx.rollback())
                    .await?
                    .map_err(TickError::db("postgres rollback"))?;
                let put_off = plan.written_rows();
                let delay = settings.retry.base_backoff;
                let kept = settle_refused(conn, &plan.delete, &put_off, delay, deadline).await?;
                report.retried = 0;
                report.dead_lettered = 0;
                report.set_aside.clear();
                report.last_retry_error = None;
                report.last_dead_error = None;
                match kept {
                    Kept::PutOff => report.put_back_in = Some(delay),
                    // The put-off was refused too: those rows are due, and
                    // claimed again at the next tick.
                    Kept::Due => {
                        report.put_back_in = None;
                        report.left_due = true;
                    }
                    // Even the delete was refused: every row, delivered or
                    // not, waits `delay` and is sent again.
                    Kept::AllPutOff => {
                        report.delivered = 0;
                        report.cancelled = 0;
                        report.delivery_lags.clear();
                        report.put_back_in = Some(delay);
                    }
                }
                let rows = if kept == Kept::AllPutOff {
                    plan.delete.len() + put_off.len()
                } else {
                    put_off.len()
                };
                report.settle_refused = Some((stage, reason, rows, kept));
                lap(&mut stage_us[2]);
                report.stage_us = stage_us;
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        if restored < restore.len() as u64 {
            // A trigger or rule on task_outbox dropped rows it was given
            // back (a producer's de-duplication, say): committing would
            // lose them. Undo the tick; every claimed row returns.
            deadline
                .run("postgres rollback", tx.rollback())
                .await?
                .map_err(TickError::db("postgres rollback"))?;
            return Err(TickError::ClaimFallback(format!(
                "putting claimed rows back wrote {restored} of {} rows: a trigger or rule on task_outbox dropped the others, which would have been lost",
                restore.len()
            )));
        }
        if let Some(now) = shape.filter(|now| *now != settings.schema.outbox_shape) {
            // What was put back may hold a DEFAULT for a new column: undo
            // it all (the rows return to the outbox as they were claimed;
            // the delivered ones are sent once more, idempotently).
            deadline
                .run("postgres rollback", tx.rollback())
                .await?
                .map_err(TickError::db("postgres rollback"))?;
            return Err(TickError::ClaimFallback(format!(
                "task_outbox changed while the relay runs (at start: {}; now: {now})",
                settings.schema.outbox_shape
            )));
        }
    }
    lap(&mut stage_us[2]);
    deadline.check("postgres commit")?;
    tokio::time::timeout_at(deadline.instant() + COMMIT_GRACE, tx.commit())
        .await
        .map_err(|_| TickError::CommitUnknown("no answer from Postgres".into()))?
        // A connection lost during COMMIT leaves the outcome unknown too;
        // both outcomes are safe, and the lost connection must restart the actor.
        .map_err(TickError::db("postgres commit"))?;
    lap(&mut stage_us[3]);
    report.stage_us = stage_us;
    Ok(report)
}

/// How the rows of a tick whose settle Postgres refused were kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The delivered rows deleted, the others put off by `base_backoff`.
    PutOff,
    /// The delivered rows deleted; the others could not be put off (an
    /// UPDATE refused too) and are due: claimed again at the next tick.
    Due,
    /// Nothing could be deleted: every row, delivered or not, put off and
    /// sent again after `base_backoff`.
    AllPutOff,
}

impl Kept {
    pub fn as_str(self) -> &'static str {
        match self {
            Kept::PutOff => "delivered rows deleted, the others put off by base_backoff",
            Kept::Due => {
                "delivered rows deleted (if any); the others could not be put off: left due, and this relay holds its claims for a growing backoff (at most 30 s)"
            }
            Kept::AllPutOff => "nothing could be deleted: every row put off by base_backoff and sent again",
        }
    }
}

/// After Postgres refused a write of a tick's settle (and the tick rolled
/// back): in a transaction of its own, delete the rows Redis accepted and
/// put the others off by `delay`, so nothing is re-sent every tick. A step
/// refused again is dropped from the next try: the delete alone, then the
/// put-off alone (then at least the batch waits `delay` before it is sent
/// again). With nothing delivered and every write refused, the rows are
/// left as they were, due ([`Kept::Due`]; the sweep then holds its claims).
/// Errors that are not refusals (a lost connection, a timeout) end the
/// tick as usual.
async fn settle_refused(
    conn: &mut tokio_postgres::Client,
    delete: &[i64],
    put_off: &[i64],
    delay: Duration,
    deadline: Deadline,
) -> Result<Kept, TickError> {
    const STAGE: &str = "settle after a refused write";
    let delay_ms = delay.as_millis().min(i64::MAX as u128) as i64;
    let every: Vec<i64> = delete.iter().chain(put_off).copied().collect();
    // With nothing delivered, a settle that could write nothing leaves the
    // rows as they were before the claim: due, as `Kept::Due`.
    let nothing_delivered = delete.is_empty();
    let tries: [(&[i64], &[i64], Kept); 3] = [
        (delete, put_off, Kept::PutOff),
        (delete, &[], Kept::Due),
        (&[], &every, Kept::AllPutOff),
    ];
    let mut last = String::new();
    for (delete, put_off, kept) in tries {
        if delete.is_empty() && put_off.is_empty() {
            continue;
        }
        let tx = deadline
            .run("postgres begin", conn.transaction())
            .await?
            .map_err(TickError::db("postgres begin"))?;
        let t = deadline.pg_timeout();
        let set = format!(
            "SET LOCAL statement_timeout = '{t}'; SET LOCAL idle_in_transaction_session_timeout = '{t}';
             SET LOCAL synchronous_commit = off"
        );
        let writes = async {
            tx.batch_execute(&set).await?;
            outbox::delete(&tx, delete).await?;
            outbox::postpone(&tx, put_off, delay_ms).await?;
            Ok::<_, tokio_postgres::Error>(())
        };
        match deadline.run(STAGE, writes).await?.map_err(TickError::db(STAGE)) {
            Ok(()) => {
                tokio::time::timeout_at(deadline.instant() + COMMIT_GRACE, tx.commit())
                    .await
                    .map_err(|_| TickError::CommitUnknown("no answer from Postgres".into()))?
                    .map_err(TickError::db("postgres commit"))?;
                return Ok(kept);
            }
            Err(TickError::Db { reason, .. }) => {
                last = reason;
                deadline
                    .run("postgres rollback", tx.rollback())
                    .await?
                    .map_err(TickError::db("postgres rollback"))?;
            }
            Err(e) => return Err(e),
        }
    }
    if nothing_delivered {
        return Ok(Kept::Due);
    }
    Err(TickError::Db {
        stage: STAGE,
        reason: format!("every write refused: {last}"),
    })
}

/// What a tick claims.
#[derive(Debug, Clone, Copy)]
pub struct ClaimPlan {
    /// Oldest-first from here (a drain lane's cursor).
    pub from: Option<ClaimCursor>,
    /// Leave paused jobs' rows (something was paused at the last claim).
    pub skip_paused: bool,
    /// The row limit (0: size the first claim by the rows due).
    pub rows: u32,
    /// Also read the claim's snapshot and when the next row comes due
    /// ([`outbox::pauses_and_horizon`]): for the listen lead.
    pub horizon: bool,
}

/// When the next tick starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// The last tick claimed a full batch: more is probably due, go on at once.
    Drain,
    /// Wait `sweep.interval`: something may be due now (a tick failed,
    /// Redis was unavailable or held back, rows were left due).
    Idle,
    /// Every claimed row was settled: while the listener hears new rows,
    /// wait `sweep.listen_poll_interval` (new rows are announced; rows put
    /// back and rows not yet due have timers of their own); otherwise as
    /// `Idle`.
    Quiet,
}

/// The longest a relay whose batches Redis refused holds its claims: well
/// inside the 2 m rate window of `OutboxRelayRedisRefusingWrites`, so a
/// lasting refusal keeps the alert's expression true, and a Redis that
/// takes writes again is written to within this.
pub const REFUSAL_HOLD_MAX: Duration = Duration::from_secs(30);

pub struct SweepActor {
    settings: SweepSettings,
    core: Core,
    dispatch: Recipient<DispatchBatch>,
    dead_letter: Recipient<RowsDeadLettered>,
    stats: Arc<SweepStats>,
    metrics: Metrics,
    pool: Option<Pg>,
    stopping: bool,
    /// Ticks running now (at most `sweep.concurrency`), published so that
    /// `Stop` can wait for all of them.
    in_flight: tokio::sync::watch::Sender<usize>,
    /// Rows the next claim may take (`sweep.batch_size`, fewer for large
    /// rows); starts slow after every (re)start.
    claim_limit: ClaimLimit,
    /// Pending `sweep.interval` waits, one per idle lane; a [`Wake`] cancels one.
    idle_timers: Vec<SpawnHandle>,
    /// A [`Wake`] arrived while every lane was busy.
    woken: bool,
    /// Ticks in a row whose every claimed row Redis refused (a node turned
    /// replica, NOPERM, MISCONF, a WAIT shortfall), and until when no lane
    /// claims because of them: the backoff of that many failures. A relay
    /// that cannot deliver would otherwise claim the rows again the moment
    /// they come due, ahead of the relays that can.
    refused_streak: i32,
    refusal_hold: Option<tokio::time::Instant>,
    /// Where the next oldest-first claim resumes while draining.
    cursor: Option<ClaimCursor>,
    /// When a claim last started from the beginning of the index.
    last_full_scan: std::time::Instant,
    /// How long after `last_full_scan` the next one runs (adapted to what
    /// the last one cost: [`FULL_SCAN_COST_FACTOR`]).
    full_scan_every: Duration,
    /// The last tick found something paused: claims skip paused jobs.
    pauses_seen: bool,
    /// Ticks running now: (number, lane, deadline), for the lane check.
    running: Vec<(u64, Lane, Deadline)>,
    /// Number of the next tick.
    next_tick: u64,
    /// When the lane check last ran.
    last_lane_check: tokio::time::Instant,
    /// The overdue tick the lane check is watching, and since when.
    lane_suspect: Option<(u64, tokio::time::Instant)>,
    /// A fresh-lane tick is queued or running (at most one at a time).
    fresh_in_flight: bool,
    /// Drain-lane ticks running now.
    drain_in_flight: u32,
    /// A [`Wake`] is in the mailbox (shared with the [`Waker`]).
    wake_pending: Arc<AtomicBool>,
    /// When the last wake-up (new rows committed) arrived.
    last_wake: Option<std::time::Instant>,
    /// Another wake-up came while it ran: run one more after it.
    fresh_again: bool,
    /// What the listener heard (shared with it): this relay's role, and
    /// the transactions announced since the sweep last looked.
    heard: Arc<Heard>,
    /// The snapshot of the last fresh claim that took every due row it
    /// could see: an announced transaction visible in it needs no claim.
    fresh_seen: Option<Snapshot>,
    /// When a drain tick is due for rows coming due (put back, or not yet
    /// due at a claim), and its timer.
    due_timer: Option<(tokio::time::Instant, SpawnHandle)>,
    /// When this relay (the listen lead) last told the others a backlog is
    /// arriving.
    last_backlog_notice: Option<std::time::Instant>,
    /// Per-tick warnings (Redis unavailable / refusing / row retries), at
    /// most one line per [`WARN_EVERY`] each.
    warn_throttles: [Throttle; 5],
}

/// How often a warning that every tick could repeat is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl SweepActor {
    pub fn new(
        settings: SweepSettings,
        (dispatch, dead_letter): (Recipient<DispatchBatch>, Recipient<RowsDeadLettered>),
        stats: Arc<SweepStats>,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        (metrics, wake_pending, heard): (Metrics, Arc<AtomicBool>, Arc<Heard>),
        log: &Logger,
    ) -> Self {
        SweepActor {
            wake_pending,
            heard,
            fresh_seen: None,
            due_timer: None,
            last_backlog_notice: None,
            claim_limit: ClaimLimit::new(settings.batch_size, settings.max_batch_bytes),
            core: Core::new(health, supervision, settings.error_budget, log),
            settings,
            dispatch,
            dead_letter,
            stats,
            metrics,
            pool: None,
            stopping: false,
            in_flight: tokio::sync::watch::channel(0).0,
            idle_timers: Vec::new(),
            woken: false,
            refused_streak: 0,
            refusal_hold: None,
            cursor: None,
            last_full_scan: std::time::Instant::now(),
            full_scan_every: FULL_SCAN_EVERY,
            pauses_seen: false,
            running: Vec::new(),
            next_tick: 0,
            last_lane_check: tokio::time::Instant::now(),
            lane_suspect: None,
            fresh_in_flight: false,
            drain_in_flight: 0,
            last_wake: None,
            fresh_again: false,
            warn_throttles: std::array::from_fn(|_| Throttle::new(WARN_EVERY)),
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>, pace: Pace) {
        if self.stopping {
            return;
        }
        // A wake-up that came in while this tick ran may announce rows the
        // tick's claim did not see yet: go on at once.
        let pace = if std::mem::take(&mut self.woken) {
            Pace::Drain
        } else {
            pace
        };
        match pace {
            Pace::Drain if self.held_back_by_live_traffic() => {
                // Let the fresh lane have the CPU: look again shortly.
                later(ctx, LIVE_RECHECK, |act, ctx| act.schedule(ctx, Pace::Drain));
            }
            Pace::Drain => ctx.notify(Tick {
                deadline: Deadline::after(self.settings.tick_timeout),
                lane: Lane::Drain,
            }),
            Pace::Idle => self.wait(ctx, None),
            Pace::Quiet => self.wait(ctx, Some(std::time::Instant::now())),
        }
    }

    /// An idle lane waits `sweep.interval`, and then, when `quiet_since` is
    /// given and the listener still hears new rows, again, until
    /// `sweep.listen_poll_interval` has passed since then: a listener that
    /// goes deaf brings polling back within one `sweep.interval`.
    fn wait(&mut self, ctx: &mut Context<Self>, quiet_since: Option<std::time::Instant>) {
        let slot = std::rc::Rc::new(std::cell::Cell::new(None::<SpawnHandle>));
        let me = slot.clone();
        let timer = later(ctx, self.settings.interval, move |act, ctx| {
            if let Some(h) = me.get() {
                act.idle_timers.retain(|t| *t != h);
            }
            let quiet = quiet_since.filter(|since| {
                act.heard.role() != Role::Deaf && since.elapsed() + act.settings.interval <= act.settings.listen_poll
            });
            if quiet.is_some() && !act.stopping {
                // On its cadence with nothing to claim: not stale.
                act.core.health.alive();
                return act.wait(ctx, quiet);
            }
            ctx.notify(Tick {
                deadline: Deadline::after(act.settings.tick_timeout),
                lane: Lane::Drain,
            })
        });
        slot.set(Some(timer));
        self.idle_timers.push(timer);
    }

    /// Run a drain tick at `at` (rows come due then), unless one is already
    /// set for earlier: an idle lane's wait is cut short, or, with every
    /// lane busy, one ticks again at once after its tick. Only while the
    /// listener hears (a polling relay finds them within `sweep.interval`).
    fn due_at(&mut self, ctx: &mut Context<Self>, at: tokio::time::Instant) {
        if self.stopping || self.heard.role() == Role::Deaf {
            return;
        }
        if let Some((when, timer)) = self.due_timer {
            if when <= at {
                return;
            }
            ctx.cancel_future(timer);
        }
        let timer = later(
            ctx,
            at.saturating_duration_since(tokio::time::Instant::now()),
            |act, ctx| {
                act.due_timer = None;
                act.take_idle_lane(ctx);
            },
        );
        self.due_timer = Some((at, timer));
    }

    /// Start an idle lane now (its wait is cancelled); with none idle, a
    /// busy lane goes on at once after its tick.
    fn take_idle_lane(&mut self, ctx: &mut Context<Self>) {
        if !self.stopping && !self.start_idle_lane(ctx) {
            self.woken = true;
        }
    }

    /// Cut an idle lane's wait short and tick it now; false when every lane
    /// is busy.
    fn start_idle_lane(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(timer) = self.idle_timers.pop() else {
            return false;
        };
        ctx.cancel_future(timer);
        ctx.notify(Tick {
            deadline: Deadline::after(self.settings.tick_timeout),
            lane: Lane::Drain,
        });
        true
    }

    /// Whether the fresh lane must claim for what the listener announced
    /// (a wake-up that needs none is counted `seen`).
    fn fresh_claim_needed(&self) -> bool {
        let announced = self.heard.take();
        let needed = announced.needs_claim(self.fresh_seen.as_ref());
        if !needed && !announced.xids.is_empty() {
            self.metrics.wakeups.with_label_values(&["seen"]).inc();
        }
        needed
    }

    /// As the listen lead, tell the other relays a backlog is arriving (at
    /// most once per `sweep.interval`): their drain lanes start now rather
    /// than at their next poll.
    fn announce_backlog(&mut self, ctx: &mut Context<Self>) {
        if self.heard.role() != Role::Lead
            || self
                .last_backlog_notice
                .is_some_and(|t| t.elapsed() < self.settings.interval)
        {
            return;
        }
        let Some(pool) = self.pool.clone() else {
            return;
        };
        self.last_backlog_notice = Some(std::time::Instant::now());
        let deadline = Deadline::after(self.settings.tick_timeout);
        let log = self.core.log.clone();
        ctx.spawn(
            async move {
                if let Err(e) = db::listen::notify_backlog(&pool, deadline).await {
                    debug!(log, "could not tell the other relays about a backlog"; "error" => e);
                }
            }
            .into_actor(self),
        );
    }

    /// New rows keep arriving and enough drain ticks already run: on two
    /// cores, every drain tick in flight adds Postgres and Redis work that
    /// a new row's claim and ZADD queue behind (measured: backlog latency
    /// p99 ~12 ms with one drain tick in flight, ~20 ms with two).
    fn held_back_by_live_traffic(&self) -> bool {
        self.drain_in_flight >= self.settings.live_concurrency.max(1)
            && self.last_wake.is_some_and(|t| t.elapsed() < LIVE_WINDOW)
    }

    /// Fail (an own fault: restart with fresh state) when a tick has run
    /// [`LANE_WEDGE_GRACE`] past its deadline and then kept running for
    /// another [`LANE_WEDGE_GRACE`] of checks on time (so a process that was
    /// paused, whose ticks all look overdue at once, gives them time to end).
    fn check_lanes(&mut self, ctx: &mut Context<Self>) {
        let now = tokio::time::Instant::now();
        // Late by much: the whole process was paused (SIGSTOP, a frozen
        // container); start over.
        let late = now - self.last_lane_check > LANE_CHECK_EVERY * 3;
        self.last_lane_check = now;
        if late {
            self.lane_suspect = None;
            return;
        }
        let overdue = self
            .running
            .iter()
            .find(|(_, _, d)| now > d.instant() + LANE_WEDGE_GRACE)
            .map(|(n, lane, d)| (*n, *lane, now - d.instant()));
        let Some((number, lane, over)) = overdue else {
            self.lane_suspect = None;
            return;
        };
        match self.lane_suspect {
            Some((n, since)) if n == number && now - since >= LANE_WEDGE_GRACE => fail(
                self,
                ctx,
                format!(
                    "wedged lane: a {lane:?} tick is still running {}ms past its deadline",
                    over.as_millis()
                ),
            ),
            Some((n, _)) if n == number => {}
            _ => self.lane_suspect = Some((number, now)),
        }
    }

    fn finish_tick(
        &mut self,
        (number, lane): (u64, Lane),
        started: std::time::Instant,
        result: Result<Result<TickReport, TickError>, String>,
        ctx: &mut Context<Self>,
    ) {
        self.running.retain(|(n, _, _)| *n != number);
        self.in_flight.send_modify(|n| *n = n.saturating_sub(1));
        if lane == Lane::Drain {
            self.drain_in_flight = self.drain_in_flight.saturating_sub(1);
        }
        self.metrics.sweep_duration.observe(started.elapsed().as_secs_f64());
        if let Some(pg) = &self.pool {
            self.metrics.observe_pool("postgres", pg.pool.state());
        }
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                self.metrics.sweep_ticks.with_label_values(&["error"]).inc();
                return fail(self, ctx, format!("tick {panic}"));
            }
        };
        let mut fresh_full = false;
        let pace = match result {
            Ok(report) => {
                fresh_full = lane == Lane::Fresh && report.claimed >= report.limit;
                let settled = report.redis_unavailable.is_none() && report.back_pressure.is_none() && !report.left_due;
                if lane == Lane::Fresh {
                    // Complete: it took every due row its snapshot showed
                    // (but those other ticks held).
                    self.fresh_seen = report.snapshot.clone().filter(|_| settled && !fresh_full);
                }
                let now = tokio::time::Instant::now();
                let refused = report.deferred_reason.is_some()
                    && report.redis_unavailable.is_none()
                    && report.back_pressure.is_none();
                // Rows left due by a settle Postgres refused twice over
                // (the put-off refused too) would be claimed and sent
                // again at every tick: when they were all the tick had,
                // held off the same way (with rows delivered beside them
                // the relay is making progress, and keeps it).
                let stuck = matches!(report.settle_refused, Some((_, _, _, Kept::Due))) && report.delivered == 0;
                if stuck || (refused && report.claimed > 0 && report.deferred >= report.claimed) {
                    let hold = self.settings.retry.backoff(self.refused_streak).min(REFUSAL_HOLD_MAX);
                    self.refused_streak = self.refused_streak.saturating_add(1);
                    self.refusal_hold = Some(now + hold);
                    let why = if stuck {
                        "postgres refused the settle and the put-off of rows that stay"
                    } else {
                        "redis refused every row of the batch"
                    };
                    warn!(self.core.log, "{}; this relay claims nothing until the hold ends, so relays that can deliver take the rows", why;
                        "rows" => report.claimed, "hold_ms" => hold.as_millis() as u64, "refused_batches_in_a_row" => self.refused_streak);
                } else if report.deferred < report.claimed {
                    self.refused_streak = 0;
                    self.refusal_hold = None;
                }
                if let Some(after) = report.put_back_in {
                    self.due_at(ctx, now + after);
                }
                if let (Some(after), Role::Lead) = (report.next_due_in, self.heard.role()) {
                    self.due_at(ctx, now + after);
                }
                if report.claimed >= report.limit {
                    self.announce_backlog(ctx);
                }
                self.claim_limit
                    .observe(report.claimed as u32, report.limit as u32, report.max_row_bytes);
                self.core.health.ok();
                self.stats.ticks_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.sweep_ticks.with_label_values(&["ok"]).inc();
                self.metrics
                    .claim_duration
                    .with_label_values(&[lane.label(), if report.claimed > 0 { "rows" } else { "none" }])
                    .observe(report.claim_us as f64 / 1e6);
                self.record(lane, &report);
                if report.full_scan {
                    self.full_scan_every = full_scan_every(report.claim_us);
                }
                if self.pauses_seen && !report.pauses_seen {
                    // Every pause was lifted: the rows held back sit behind
                    // the cursor; the next drain claim starts from the
                    // beginning.
                    self.full_scan_every = Duration::ZERO;
                }
                self.pauses_seen = report.pauses_seen;
                if lane == Lane::Drain {
                    // Resume after this batch next time (a claim from the
                    // start that found an older backlog moves the cursor
                    // back to it); a claim from the start runs at least
                    // every FULL_SCAN_EVERY anyway.
                    self.cursor = report.cursor.or(self.cursor);
                }
                if report.claimed >= report.limit
                    && report.redis_unavailable.is_none()
                    && report.back_pressure.is_none()
                    // Rows Redis refused are postponed; keep draining as
                    // long as some of the batch could be settled.
                    && report.deferred < report.claimed
                {
                    Pace::Drain
                } else if settled {
                    Pace::Quiet
                } else {
                    Pace::Idle
                }
            }
            Err(TickError::ClaimFallback(why)) => {
                // The rows are as they were (the tick rolled back; a re-send
                // of its ZADDs is harmless): claim them again, by locking.
                if self.settings.claim_fallback.set(why.clone()) {
                    warn!(self.core.log, "task_outbox changed under the relay; claiming by locking from now on (restart the relay to check again)";
                        "reason" => why);
                }
                Pace::Drain
            }
            Err(e) => {
                let streak = self.core.failed(&e.to_string(), e.is_deadline());
                if e.is_deadline() {
                    self.stats.ticks_deadline.fetch_add(1, Ordering::Relaxed);
                    self.metrics.sweep_ticks.with_label_values(&["deadline"]).inc();
                } else {
                    self.stats.ticks_error.fetch_add(1, Ordering::Relaxed);
                    self.metrics.sweep_ticks.with_label_values(&["error"]).inc();
                }
                warn!(self.core.log, "sweep tick failed and was rolled back; its rows stay in the outbox";
                    "error" => %e, "deadline" => e.is_deadline(), "consecutive_failures" => streak);
                if e.is_connection_lost() {
                    return fail_dependency(self, ctx, e.to_string());
                }
                if self.core.budget_spent(streak) {
                    return fail_dependency(self, ctx, format!("{streak} consecutive failed ticks, last: {e}"));
                }
                Pace::Idle
            }
        };
        match lane {
            Lane::Drain => self.schedule(ctx, pace),
            // The fresh lane does not reschedule itself; it runs again only
            // for a wake-up that came while it ran.
            Lane::Fresh => {
                // More new rows than one fresh batch: an idle lane takes over now.
                if fresh_full && !self.stopping {
                    self.start_idle_lane(ctx);
                }
                if std::mem::take(&mut self.fresh_again) && !self.stopping && self.fresh_claim_needed() {
                    ctx.notify(Tick {
                        deadline: Deadline::after(self.settings.tick_timeout),
                        lane: Lane::Fresh,
                    });
                } else {
                    self.fresh_in_flight = false;
                }
            }
        }
    }

    fn record(&mut self, lane: Lane, r: &TickReport) {
        let rows = &self.metrics.sweep_rows;
        rows.with_label_values(&["dispatched"]).inc_by(r.delivered as u64);
        rows.with_label_values(&["retried"]).inc_by(r.retried as u64);
        rows.with_label_values(&["dead_lettered"])
            .inc_by(r.dead_lettered as u64);
        rows.with_label_values(&["cancelled"]).inc_by(r.cancelled as u64);
        rows.with_label_values(&["set_aside"]).inc_by(r.set_aside.len() as u64);
        let (from_created, from_due) = (
            self.metrics.delivery_lag.with_label_values(&["created"]),
            self.metrics.delivery_lag.with_label_values(&["due"]),
        );
        for (created, due) in &r.delivery_lags {
            from_created.observe(*created);
            from_due.observe(*due);
        }
        for (id, why) in &r.set_aside {
            // One line per row: rare, and each needs an operator's hand.
            error!(self.core.log, "row cannot be dead-lettered and is set aside in the outbox (run_at = infinity); fix or delete it";
                "outbox_id" => id, "reason" => why);
        }
        self.stats.dispatched.fetch_add(r.delivered as u64, Ordering::Relaxed);
        self.stats.retried.fetch_add(r.retried as u64, Ordering::Relaxed);
        self.stats
            .dead_lettered
            .fetch_add(r.dead_lettered as u64, Ordering::Relaxed);
        if r.claimed > 0 {
            debug!(self.core.log, "sweep tick settled"; "lane" => ?lane,
                "claimed" => r.claimed, "delivered" => r.delivered, "retried" => r.retried,
                "dead_lettered" => r.dead_lettered, "deferred" => r.deferred,
                "claim_us" => r.stage_us[0], "dispatch_us" => r.stage_us[1],
                "settle_us" => r.stage_us[2], "commit_us" => r.stage_us[3]);
        }
        // `rows` is this tick's; `suppressed` counts the ticks since the
        // last line that had the same news.
        let now = std::time::Instant::now();
        if let Some(why) = &r.redis_unavailable {
            self.metrics.redis_unavailable_ticks.inc();
            if let Some(held) = self.warn_throttles[0].pass(now) {
                warn!(self.core.log, "redis unavailable; rows left in the outbox without counting an attempt";
                    "rows" => r.deferred, "error" => why, "suppressed" => held);
            }
        } else if let Some(why) = &r.deferred_reason {
            if let Some(held) = self.warn_throttles[1].pass(now) {
                warn!(self.core.log, "redis refused writes for a reason that is not the rows'; rows will be re-sent after base_backoff without counting an attempt";
                    "rows" => r.deferred, "error" => why, "suppressed" => held);
            }
        }
        if let Some((stage, why, rows, kept)) = &r.settle_refused {
            self.metrics
                .settle_refused_rows
                .with_label_values(&[stage])
                .inc_by(*rows as u64);
            if let Some(held) = self.warn_throttles[4].pass(now) {
                warn!(self.core.log, "postgres refused a write of the tick's settle; the rows stay in the outbox";
                    "write" => *stage, "error" => why, "rows_kept" => rows, "kept" => kept.as_str(),
                    "delivered" => r.delivered, "suppressed" => held);
            }
        }
        if r.cancelled > 0 {
            if let Some(held) = self.warn_throttles[3].pass(now) {
                info!(self.core.log, "rows of cancelled jobs deleted without being scheduled (their cancel fence is set)";
                    "rows" => r.cancelled, "suppressed" => held);
            }
        }
        if let Some(err) = &r.last_retry_error {
            if let Some(held) = self.warn_throttles[2].pass(now) {
                warn!(self.core.log, "rows failed in redis and will be retried with backoff";
                    "count" => r.retried, "last_error" => err, "suppressed" => held);
            }
        }
        if r.dead_lettered > 0 {
            self.dead_letter.do_send(RowsDeadLettered {
                count: r.dead_lettered,
                last_error: r.last_dead_error.clone().unwrap_or_default(),
            });
        }
    }

    /// The synchronous part of the Tick handler (panics here are contained
    /// by the caller).
    fn start_tick(&mut self, msg: Tick, ctx: &mut Context<Self>) {
        fault_point("sweep.tick");
        if msg.lane == Lane::Drain {
            // This tick's claim sees every row committed before now.
            self.woken = false;
        }
        if self.core.expired(msg.deadline, "tick") {
            self.stats.ticks_deadline.fetch_add(1, Ordering::Relaxed);
            self.metrics.sweep_ticks.with_label_values(&["deadline"]).inc();
            match msg.lane {
                Lane::Drain => self.schedule(ctx, Pace::Idle),
                Lane::Fresh => self.fresh_in_flight = false,
            }
            return;
        }
        if let Some(until) = self.refusal_hold.filter(|u| *u > tokio::time::Instant::now()) {
            // On its cadence, holding on purpose: alive, not wedged (the
            // watchdog restarts a sweep silent for five cadences).
            self.core.health.alive();
            match msg.lane {
                Lane::Drain => {
                    let wait = until
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(self.settings.interval);
                    later(ctx, wait, |act, ctx| act.schedule(ctx, Pace::Drain));
                }
                Lane::Fresh => self.fresh_in_flight = false,
            }
            return;
        }
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let dispatch = self.dispatch.clone();
        let settings = self.settings.clone();
        let started = std::time::Instant::now();
        self.in_flight.send_modify(|n| *n += 1);
        if msg.lane == Lane::Drain {
            self.drain_in_flight += 1;
        }
        let lane = msg.lane;
        let number = self.next_tick;
        self.next_tick += 1;
        self.running.push((number, lane, msg.deadline));
        let skip_paused = self.pauses_seen;
        let rows = self.claim_limit.rows();
        // Only the lead's claims for new rows: their snapshot decides which
        // notifications need a claim, and rows announced but not yet due
        // are found there (rows put back have timers of their own).
        let horizon = lane == Lane::Fresh && self.heard.role() == Role::Lead;
        let from = match (lane, self.cursor) {
            (Lane::Fresh, _) => None,
            (Lane::Drain, Some(c)) if self.last_full_scan.elapsed() < self.full_scan_every => Some(c),
            (Lane::Drain, _) => {
                self.last_full_scan = std::time::Instant::now();
                None
            }
        };
        let tick = async move {
            if wedge_point("sweep.tick") {
                // A tick that never ends (test-only): the watchdog's case.
                std::future::pending::<()>().await;
            }
            run_tick(
                &pool,
                &dispatch,
                &settings,
                lane,
                ClaimPlan {
                    from,
                    skip_paused,
                    rows,
                    horizon,
                },
                msg.deadline,
            )
            .await
        };
        // Spawned, not awaited: other lanes, wake-ups and Stop are handled
        // while this tick runs.
        // Not `run_contained`: the lane's bookkeeping in `finish_tick` must
        // run even when the tick panicked (Stop waits for it).
        ctx.spawn(contain(tick).into_actor(self).map(move |result, act, ctx| {
            guarded(act, ctx, "tick callback", |act, ctx| {
                fault_point("sweep.settled");
                act.finish_tick((number, lane), started, result, ctx)
            });
        }));
    }
}

impl Lifecycle for SweepActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    /// Build the pool and start one lane per concurrent tick; each lane
    /// reschedules itself.
    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        // Half the tick for a checkout: an unreachable Postgres is then
        // reported with its cause instead of as a bare deadline.
        let checkout = (self.settings.tick_timeout / 2).max(Duration::from_millis(5));
        let pool = db::pool(&self.settings.database_url, self.settings.pool_size, checkout)
            .map_err(|e| format!("cannot build the Postgres pool: {e}"))?;
        self.pool = Some(pool);
        for _ in 0..self.settings.concurrency.max(1) {
            self.schedule(ctx, Pace::Drain);
        }
        self.last_lane_check = tokio::time::Instant::now();
        interval(ctx, LANE_CHECK_EVERY, |act, ctx| act.check_lanes(ctx));
        Ok(())
    }

    fn reset(&mut self) {
        // Fresh state: the old pool (and its connections) is dropped; the
        // tick that was in flight was dropped with its transaction, which
        // rolls it back.
        self.pool = None;
        self.claim_limit = ClaimLimit::new(self.settings.batch_size, self.settings.max_batch_bytes);
        self.idle_timers.clear();
        self.woken = false;
        self.fresh_in_flight = false;
        self.drain_in_flight = 0;
        self.fresh_again = false;
        self.fresh_seen = None;
        self.due_timer = None;
        self.cursor = None;
        self.full_scan_every = FULL_SCAN_EVERY;
        self.refused_streak = 0;
        self.refusal_hold = None;
        self.running.clear();
        self.lane_suspect = None;
        // A wake-up lost with the failed actor must not block the next ones.
        self.wake_pending.store(false, Ordering::Release);
        self.in_flight.send_replace(0);
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
    }

    fn shutting_down(&self) -> bool {
        self.stopping
    }
}

crate::supervised_actor!(SweepActor);

impl Handler<Tick> for SweepActor {
    type Result = ();

    fn handle(&mut self, msg: Tick, ctx: &mut Self::Context) {
        if self.stopping {
            return;
        }
        guarded(self, ctx, "tick handler", |act, ctx| act.start_tick(msg, ctx));
    }
}

/// Sends [`Wake`] to the sweep, at most one at a time: while one is in
/// the mailbox, further wake-ups are folded into it (counted as
/// `coalesced`). A storm of notifications therefore costs an atomic swap
/// each, and the mailbox never holds more than one wake-up.
#[derive(Clone)]
pub struct Waker {
    sweep: Recipient<Wake>,
    pending: Arc<AtomicBool>,
    metrics: Metrics,
}

impl Waker {
    pub fn new(sweep: Recipient<Wake>, pending: Arc<AtomicBool>, metrics: Metrics) -> Self {
        Waker {
            sweep,
            pending,
            metrics,
        }
    }

    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            self.metrics.wakeups.with_label_values(&["coalesced"]).inc();
        } else {
            self.metrics.wakeups.with_label_values(&["sent"]).inc();
            self.sweep.do_send(Wake);
        }
    }
}

impl Handler<Wake> for SweepActor {
    type Result = ();

    fn handle(&mut self, _msg: Wake, ctx: &mut Self::Context) {
        // Taken: the next wake-up is sent again. Cleared before the work,
        // so rows committed from now on wake the sweep once more.
        self.wake_pending.store(false, Ordering::Release);
        guarded(self, ctx, "wake handler", |act, ctx| {
            if act.stopping || act.pool.is_none() {
                return;
            }
            act.last_wake = Some(std::time::Instant::now());
            if act.idle_timers.is_empty() {
                // Every lane is busy (draining a backlog, say): make sure a lane
                // ticks again after its current tick.
                act.woken = true;
            }
            // The new rows go out now on the fresh lane, newest first: they wait
            // neither behind a backlog nor behind a drain lane's claim from the
            // start of the index (which, after a big drain and until vacuum,
            // walks every dead entry the drain left). Idle lanes keep their
            // cadence; a fresh tick that finds a full batch wakes one of them.
            if act.fresh_in_flight {
                act.fresh_again = true;
            } else if act.fresh_claim_needed() {
                act.fresh_in_flight = true;
                ctx.notify(Tick {
                    deadline: Deadline::after(act.settings.tick_timeout),
                    lane: Lane::Fresh,
                });
            }
        });
    }
}

impl Handler<Stop> for SweepActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        // No new ticks; answer once the ones in flight have committed or
        // rolled back (each is bounded by its deadline).
        self.stopping = true;
        for t in self.idle_timers.drain(..) {
            ctx.cancel_future(t);
        }
        if let Some((_, t)) = self.due_timer.take() {
            ctx.cancel_future(t);
        }
        let mut in_flight = self.in_flight.subscribe();
        Box::pin(async move {
            let _ = in_flight.wait_for(|n| *n == 0).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsConfig;

    #[test]
    fn claims_from_the_beginning_space_out_as_they_grow_dear() {
        // A cheap one (a 2 ms claim of a full batch): every 250 ms.
        assert_eq!(full_scan_every(2_000), FULL_SCAN_EVERY);
        // Walking a million dead index entries (8 ms): every 800 ms.
        assert_eq!(full_scan_every(8_000), Duration::from_millis(800));
        // Behind a held snapshot (50 ms): every 5 s; never rarer than 10 s.
        assert_eq!(full_scan_every(50_000), Duration::from_secs(5));
        assert_eq!(full_scan_every(3_000_000), FULL_SCAN_AT_MOST);
        assert_eq!(full_scan_every(u64::MAX), FULL_SCAN_AT_MOST);
    }

    /// Stands in for the sweep: counts the wake-ups that reach its mailbox
    /// and takes them the way the sweep does.
    struct Sink {
        pending: Arc<AtomicBool>,
        seen: Arc<AtomicU64>,
    }

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<Wake> for Sink {
        type Result = ();
        fn handle(&mut self, _: Wake, _: &mut Context<Self>) {
            self.pending.store(false, Ordering::Release);
            self.seen.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[actix_rt::test]
    async fn a_notification_storm_queues_one_wake_up_at_a_time() {
        let pending = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let sink = Sink {
            pending: pending.clone(),
            seen: seen.clone(),
        }
        .start();
        let metrics = Metrics::new(&MetricsConfig::default()).expect("metrics");
        let waker = Waker::new(sink.recipient(), pending, metrics.clone());
        // The actor cannot run between these calls (same thread): without
        // coalescing, each would be one more message in its mailbox.
        for _ in 0..100_000 {
            waker.wake();
        }
        let wakeups = |r: &str| metrics.wakeups.with_label_values(&[r]).get();
        assert_eq!((wakeups("sent"), wakeups("coalesced")), (1, 99_999));
        // Taken: the next notification wakes the sweep again.
        for _ in 0..1000 {
            if seen.load(Ordering::Relaxed) == 1 {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seen.load(Ordering::Relaxed), 1);
        waker.wake();
        assert_eq!(wakeups("sent"), 2);
    }
}
