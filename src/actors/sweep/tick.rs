//! One tick's I/O, a plain async function ([`run_tick`]): claim, encode,
//! dispatch, settle, commit, in one Postgres transaction. `tick_on` reads
//! as that sequence; each stage is a function of its own below it.

use std::time::Instant;

use actix::Recipient;
use tokio_postgres::{Client, Transaction};

use super::dispatched::{delivery_lags, dispatch_rows, Journal};
use super::refused::settle_refused;
use super::report::{is_contention, ClaimPlan, Kept, TickError, TickReport};
use super::settings::{Lane, SweepSettings, COMMIT_GRACE, FRESH_BATCH};
use crate::actors::dispatch::DispatchBatch;
use crate::db::journal;
use crate::db::outbox::{self, ClaimOrder, Claimed, Horizon};
use crate::db::schema::ClaimMode;
use crate::db::{self, is_connection_lost, is_statement_timeout, pg_error_text, CheckoutError, Pg};
use crate::deadline::Deadline;
use crate::domain::{settle, ClaimLimit, RowOutcome, Settlement};

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
    let claim_started = Instant::now();
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
    conn: &mut Client,
    dispatch: &Recipient<DispatchBatch>,
    settings: &SweepSettings,
    lane: Lane,
    plan: ClaimPlan,
    deadline: Deadline,
    claim_started: Instant,
) -> Result<TickReport, TickError> {
    let (rows, probed) = claim_size(conn, settings, plan.rows, deadline).await?;
    let (limit, order) = match lane {
        Lane::Drain => (i64::from(rows), ClaimOrder::Oldest),
        Lane::Fresh => (i64::from(rows.min(FRESH_BATCH)), ClaimOrder::Newest),
    };
    let mode = &settings.claim_fallback.mode(&settings.schema.claim);
    let delete_claim = *mode == ClaimMode::Delete;
    let set_sql = session_settings(delete_claim, deadline);
    let mut skip_paused = plan.skip_paused;
    let (tx, claimed, scopes, seen) = loop {
        let tx = deadline
            .run("postgres begin", conn.transaction())
            .await?
            .map_err(TickError::db("postgres begin"))?;
        let claim = ClaimQuery {
            mode,
            limit,
            order,
            from: plan.from,
            skip_paused,
            horizon: plan.horizon,
        };
        match claim_in(&tx, &set_sql, claim, deadline).await? {
            Some((claimed, scopes, seen)) => break (tx, claimed, scopes, seen),
            // It took a row of a job paused since the last tick: rolled
            // back (the rows are untouched) and claimed again, skipping
            // paused jobs.
            None => {
                rollback(tx, deadline).await?;
                skip_paused = true;
            }
        }
    };
    let claimed_at = Instant::now();
    let mut report = TickReport {
        claim_us: claimed_at.duration_since(claim_started).as_micros() as u64,
        full_scan: lane == Lane::Drain && plan.from.is_none(),
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
    let mut laps = Laps::new(claim_started);
    let sent = dispatch_rows(dispatch, rows, settings, deadline, &mut report).await?;
    laps.lap(1);
    report.delivery_lags = delivery_lags(rows, &sent.outcomes, claimed_at);
    let journal = Journal::of(rows, &sent.entries, &sent.outcomes, sent.node.as_ref());
    let plan = settle_plan(rows, sent.outcomes, settings, &mut report);

    if delete_claim && plan.changes_nothing() {
        // Every row stays as it was (Redis unavailable, held back): a
        // rollback puts them all back, cheaper than re-inserting them.
        rollback(tx, deadline).await?;
        laps.lap(2);
        report.stage_us = laps.us;
        return Ok(report);
    }
    // A delete claim whose rows were all delivered has nothing to write
    // but the journal.
    if plan.needs_writes(delete_claim) || !journal.rows.is_empty() {
        match settle_writes(&tx, settings, (&claimed, &journal), &plan, delete_claim, deadline).await {
            Ok(written) => {
                if let Some(e) = put_back_lost(&written, settings) {
                    rollback(tx, deadline).await?;
                    return Err(e);
                }
                report.journal_refused = written.journal_refused;
            }
            // A table refused one of the writes (a trigger that raises, a
            // check, a revoked privilege): left to itself the rollback
            // would return the whole batch and the next tick would send it
            // again, forever. Keep what Redis accepted and put off the rest.
            Err(TickError::Db { stage, reason }) => {
                rollback(tx, deadline).await?;
                keep_after_refusal(
                    conn,
                    (&plan, &journal),
                    settings,
                    deadline,
                    &mut report,
                    (stage, reason),
                )
                .await?;
                laps.lap(2);
                report.stage_us = laps.us;
                return Ok(report);
            }
            Err(e) => return Err(e),
        }
    }
    laps.lap(2);
    commit(tx, deadline).await?;
    laps.lap(3);
    report.stage_us = laps.us;
    Ok(report)
}

/// Microseconds spent in each stage: claim (from checkout), dispatch,
/// settle, commit ([`TickReport::stage_us`]).
struct Laps {
    clock: Instant,
    us: [u64; 4],
}

impl Laps {
    /// The claim stage ends now (it started at `claim_started`).
    fn new(claim_started: Instant) -> Self {
        let mut us = [0u64; 4];
        us[0] = claim_started.elapsed().as_micros() as u64;
        Laps {
            clock: Instant::now(),
            us,
        }
    }

    /// Stage `slot` ends now (it started when the last one ended).
    fn lap(&mut self, slot: usize) {
        let now = Instant::now();
        self.us[slot] = now.duration_since(self.clock).as_micros() as u64;
        self.clock = now;
    }
}

/// The rows the claim may take, and the largest due row's size when it
/// was probed: the first tick since a (re)start sizes itself by the rows
/// due (`rows` is 0).
async fn claim_size(
    conn: &Client,
    settings: &SweepSettings,
    rows: u32,
    deadline: Deadline,
) -> Result<(u32, u64), TickError> {
    if rows != 0 {
        return Ok((rows, 0));
    }
    let largest = deadline
        .run(
            "postgres size probe",
            outbox::largest_due_row(conn, i64::from(settings.batch_size)),
        )
        .await?
        .map_err(TickError::db("postgres size probe"))?;
    Ok((
        ClaimLimit::first(settings.batch_size, settings.max_batch_bytes, largest),
        largest,
    ))
}

/// The tick's session settings.
fn session_settings(delete_claim: bool, deadline: Deadline) -> String {
    // Only SET LOCAL: it ends with the transaction, so nothing leaks to the
    // next user of a pooled (or pgbouncer) server connection.
    // synchronous_commit = off is safe here: a tick's commit lost in a
    // Postgres crash only brings its rows back into the outbox, and they are
    // re-sent (ZADD is idempotent); nothing can be lost that way. It spares
    // every tick a WAL flush wait.
    let t = deadline.pg_timeout();
    // outbox_relay.put_back: rows put back are no new work, and migration
    // 5's trigger sends no NOTIFY for them.
    format!(
        "SET LOCAL statement_timeout = '{t}'; SET LOCAL idle_in_transaction_session_timeout = '{t}';
         SET LOCAL synchronous_commit = off{}",
        if delete_claim {
            "; SET LOCAL outbox_relay.put_back = on"
        } else {
            ""
        }
    )
}

/// What one claim statement takes.
struct ClaimQuery<'a> {
    mode: &'a ClaimMode,
    limit: i64,
    order: ClaimOrder,
    from: Option<outbox::ClaimCursor>,
    skip_paused: bool,
    horizon: bool,
}

/// In the tick's transaction: the session settings, the pauses (and for
/// the listen lead, the snapshot and when the next row comes due), then
/// the claim. `None` when the claim, not skipping paused jobs, took a row
/// of a paused job: the caller rolls back and claims again with the filter.
async fn claim_in(
    tx: &Transaction<'_>,
    set_sql: &str,
    q: ClaimQuery<'_>,
    deadline: Deadline,
) -> Result<Option<(Claimed, Vec<String>, Option<Horizon>)>, TickError> {
    let set = tx.batch_execute(set_sql);
    // Before the claim: the pauses, and (the listen lead) what the
    // claim will see at least and when the next row not yet due comes due.
    let scopes = outbox::pauses_and_horizon(tx, q.horizon);
    let claim = outbox::claim_due(tx, q.mode, q.limit, q.order, q.from, q.skip_paused);
    // All go out together (pipelined); the server runs them in order.
    let (set, scopes, claim) = deadline
        .run("postgres claim", async { tokio::join!(set, scopes, claim) })
        .await?;
    set.map_err(TickError::db("postgres set timeouts"))?;
    let (scopes, seen) = scopes.map_err(TickError::db("read pauses"))?;
    let claimed = claim.map_err(TickError::db("postgres claim"))?;
    // The claim skips paused jobs only while the last tick saw a pause
    // (the filter costs every claim).
    if !q.skip_paused && outbox::claimed_paused(&scopes, &claimed.rows) {
        return Ok(None);
    }
    Ok(Some((claimed, scopes, seen)))
}

/// What the tick writes for its rows ([`settle`], with rows the dead
/// table cannot hold set aside), and its counts in the report.
fn settle_plan(
    rows: &[crate::domain::OutboxRow],
    outcomes: Vec<RowOutcome>,
    settings: &SweepSettings,
    report: &mut TickReport,
) -> Settlement {
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
    plan
}

/// What the settle's put-back found: the outbox's shape (read when rows
/// were put back) and how many rows went back of how many.
struct Written {
    shape: Option<String>,
    restored: u64,
    to_restore: usize,
    /// The journal refused: rows not journaled, and why.
    journal_refused: Option<(usize, String)>,
}

/// The settle's writes, pipelined on the tick's connection and run by the
/// server in this order, each with the time left now as its
/// `statement_timeout` (not the tick's whole budget from when the claim
/// started). A delete claim took the rows out already: the delivered ones
/// are done, and the ones that stay are put back (same id, same values)
/// before the writes after it update or move them.
async fn settle_writes(
    tx: &Transaction<'_>,
    settings: &SweepSettings,
    (claimed, journal): (&Claimed, &Journal<'_>),
    plan: &Settlement,
    delete_claim: bool,
    deadline: Deadline,
) -> Result<Written, TickError> {
    let schema = &settings.schema;
    let (delete, restore): (&[i64], &[usize]) = if delete_claim {
        (&[], &plan.stays)
    } else {
        (&plan.delete, &[])
    };
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
                outbox::shape(tx)
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
                outbox::restore(tx, schema, claimed, restore).await.map_err(|e| {
                    if is_connection_lost(&e) || is_statement_timeout(&e) || db::is_read_only(&e) || is_contention(&e)
                    {
                        TickError::db("restore claimed rows")(e)
                    } else {
                        TickError::ClaimFallback(format!("putting claimed rows back failed: {}", pg_error_text(&e)))
                    }
                })
            },
            async {
                outbox::delete(tx, delete)
                    .await
                    .map_err(TickError::db("delete delivered"))
            },
            async {
                outbox::reschedule(tx, &plan.retry_ids, &plan.retry_delays_ms)
                    .await
                    .map_err(TickError::db("reschedule failed"))
            },
            async {
                outbox::move_to_dead(tx, schema, &plan.dead_ids, &plan.dead_errors)
                    .await
                    .map_err(TickError::db("move to dead letters"))
            },
            async {
                outbox::set_aside(tx, &plan.aside_ids)
                    .await
                    .map_err(TickError::db("set aside"))
            },
            async {
                outbox::postpone(tx, &plan.postpone_ids, plan.postpone_delay_ms)
                    .await
                    .map_err(TickError::db("postpone deferred"))
            },
            // Last, behind a savepoint: a journal that refuses (INSERT
            // revoked, a partition gone) costs the journal, not the
            // settle; the rows are delivered either way.
            async {
                let Some(width) = settings.journal_width.filter(|_| !journal.rows.is_empty()) else {
                    return Ok(None);
                };
                tx.batch_execute("SAVEPOINT journal")
                    .await
                    .map_err(TickError::db("journal savepoint"))?;
                Ok(Some(journal::record(tx, width, &journal.rows, journal.node).await))
            },
        )
    };
    let (_, shape, restored, .., journaled) = deadline.run("postgres settle", settle_all).await??;
    let journal_refused = journal_outcome(tx, journaled, journal.rows.len(), deadline).await?;
    Ok(Written {
        shape,
        restored,
        to_restore: restore.len(),
        journal_refused,
    })
}

/// What became of the journal's insert (last in the settle, behind its
/// savepoint): a passing failure fails the tick (its rows are sent again
/// and journaled then); a refusal is rolled back to the savepoint and
/// returned (rows not journaled, why), and the tick goes on.
async fn journal_outcome(
    tx: &Transaction<'_>,
    journaled: Option<Result<u64, tokio_postgres::Error>>,
    rows: usize,
    deadline: Deadline,
) -> Result<Option<(usize, String)>, TickError> {
    Ok(match journaled {
        // Passing (the connection, a timeout, a lock wait, a read-only
        // server): the tick's, tried again with its rows; the journal is
        // not dropped for it.
        Some(Err(e))
            if is_connection_lost(&e) || is_statement_timeout(&e) || db::is_read_only(&e) || is_contention(&e) =>
        {
            return Err(TickError::db("journal deliveries")(e));
        }
        Some(Err(e)) => {
            deadline
                .run(
                    "postgres rollback to savepoint",
                    tx.batch_execute("ROLLBACK TO SAVEPOINT journal"),
                )
                .await?
                .map_err(TickError::db("rollback to the journal's savepoint"))?;
            Some((rows, pg_error_text(&e)))
        }
        _ => None,
    })
}

/// Whether committing would lose or change rows put back: the tick is
/// undone (every claimed row returns) and the sweep claims by locking.
fn put_back_lost(written: &Written, settings: &SweepSettings) -> Option<TickError> {
    if written.restored < written.to_restore as u64 {
        // A trigger or rule on task_outbox dropped rows it was given
        // back (a producer's de-duplication, say): committing would
        // lose them.
        return Some(TickError::ClaimFallback(format!(
            "putting claimed rows back wrote {} of {} rows: a trigger or rule on task_outbox dropped the others, which would have been lost",
            written.restored, written.to_restore
        )));
    }
    // What was put back may hold a DEFAULT for a new column (the rows
    // return to the outbox as they were claimed; the delivered ones are
    // sent once more, idempotently).
    let now = written
        .shape
        .as_ref()
        .filter(|now| **now != settings.schema.outbox_shape)?;
    Some(TickError::ClaimFallback(format!(
        "task_outbox changed while the relay runs (at start: {}; now: {now})",
        settings.schema.outbox_shape
    )))
}

/// After the settle was refused and rolled back: keep what Redis accepted
/// and put off the rest ([`settle_refused`]), and make the report say so.
async fn keep_after_refusal(
    conn: &mut Client,
    (plan, journal): (&Settlement, &Journal<'_>),
    settings: &SweepSettings,
    deadline: Deadline,
    report: &mut TickReport,
    (stage, reason): (&'static str, String),
) -> Result<(), TickError> {
    let put_off = plan.written_rows();
    let delay = settings.retry.base_backoff;
    let journal = settings.journal_width.map(|w| (w, journal));
    let (kept, journal_refused) = settle_refused(conn, (&plan.delete, &put_off), journal, delay, deadline).await?;
    report.journal_refused = journal_refused;
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
        // Even the delete was refused: every row, delivered or not,
        // waits `delay` and is sent again.
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
    Ok(())
}

async fn rollback(tx: Transaction<'_>, deadline: Deadline) -> Result<(), TickError> {
    deadline
        .run("postgres rollback", tx.rollback())
        .await?
        .map_err(TickError::db("postgres rollback"))
}

/// COMMIT, with [`COMMIT_GRACE`] past the deadline: the outcome of a
/// commit cut short is unknown.
async fn commit(tx: Transaction<'_>, deadline: Deadline) -> Result<(), TickError> {
    deadline.check("postgres commit")?;
    tokio::time::timeout_at(deadline.instant() + COMMIT_GRACE, tx.commit())
        .await
        .map_err(|_| TickError::CommitUnknown("no answer from Postgres".into()))?
        // A connection lost during COMMIT leaves the outcome unknown too;
        // both outcomes are safe, and the lost connection must restart the actor.
        .map_err(TickError::db("postgres commit"))
}
