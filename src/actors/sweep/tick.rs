//! One tick's I/O, a plain async function ([`run_tick`]): claim, encode,
//! dispatch, settle, commit, in one Postgres transaction, and what it
//! reports or why it failed.

use super::refused::settle_refused;
use super::*;

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

    pub(super) fn db(stage: &'static str) -> impl Fn(tokio_postgres::Error) -> TickError {
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
