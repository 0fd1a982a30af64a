//! Queries of one sweep tick on `task_outbox` (and the atomic move into
//! `task_outbox_dead`), each a plain async function on the tick's
//! transaction so it can be tested without actors.
//!
//! All of them take arrays (`= ANY($1)`, `unnest`), so a settle costs one
//! round trip per kind of outcome whatever the batch size.
//!
//! Two ways to claim ([`ClaimMode`], chosen at start from the catalog):
//! - **delete** (the default): the claim *is* the delete, `DELETE … WHERE
//!   ctid = ANY(ARRAY(SELECT ctid … FOR UPDATE SKIP LOCKED LIMIT n))
//!   RETURNING …`, inside the tick's transaction. A delivered batch then
//!   needs nothing but the COMMIT: one statement per tick, as Postgres alone
//!   would do it. Rows that must stay (retry, dead letter, set aside,
//!   postponed) are put back with [`restore`] (same id, same values) before
//!   the settle statements run on them, and a tick that changes nothing
//!   rolls back. A rollback, whatever its cause, brings every row back.
//! - **lock**: `SELECT … FOR UPDATE SKIP LOCKED`, then `DELETE` of the
//!   delivered rows: for an outbox the relay cannot put rows back into
//!   (columns it does not know, no INSERT privilege, a partitioned table).

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use super::schema::{ClaimMode, Schema};
use crate::domain::OutboxRow;

/// Which due rows a tick claims first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOrder {
    /// Oldest `run_at` first: the normal, fair drain (walks the `run_at` index).
    Oldest,
    /// Newest rows first (walks the primary key backwards): the "fresh
    /// lane" that gets a just-committed row out while a backlog drains.
    /// Delivery order does not matter to consumers, who read by score.
    Newest,
}

/// What a claim returns, in this order. Times come back as timestamps (8
/// binary bytes each) and are turned into milliseconds here: computing
/// `extract(epoch …)` in SQL costs Postgres numeric arithmetic on every row.
const CLAIM_COLUMNS: &str = "id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
        source_type, source_url, task_type, lighthouse_run_id, attempts, run_at, created_at, now()";

/// Rows of paused jobs (`outbox_relay_pause`), only added to a claim while
/// something is paused (see [`paused_scopes`]).
const PAUSE_FILTER: &str = "
    AND NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope = '*')
    AND job_id::text NOT IN (SELECT scope FROM outbox_relay_pause)";

/// Only the newest 20,000 ids: when fewer than LIMIT rows are there, the
/// backward scan stops at this bound instead of walking every dead entry a
/// past drain left in the primary key. Older rows are the drain lanes' work.
const NEWEST_BOUND: &str = "
    AND id > (SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('task_outbox', 'id')::regclass), 0)
                     - 20000)";

/// The largest of the first `limit` due rows by [`OutboxRow::bytes`] (0:
/// none due): what a relay's first claim after a start is sized by. Reads
/// sizes only (`octet_length` of a TOASTed value does not fetch it).
pub async fn largest_due_row(client: &tokio_postgres::Client, limit: i64) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_typed_one(
            "SELECT COALESCE(max(octet_length(task_id::text) + octet_length(job_id::text) + octet_length(host)
                                + octet_length(path) + octet_length(source_type) + octet_length(source_url)
                                + octet_length(task_type) + 128), 0)::int8
               FROM (SELECT * FROM task_outbox WHERE run_at <= now() ORDER BY run_at, id LIMIT $1) due",
            &[(&limit, Type::INT8)],
        )
        .await?;
    Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
}

/// The claim statement for a mode, an order, whether it resumes at a
/// cursor (`$2`, `$3`) and whether it skips paused jobs. `$1` is the limit.
pub fn claim_sql(mode: &ClaimMode, order: ClaimOrder, from: bool, skip_paused: bool) -> String {
    let resume = if from { " AND (run_at, id) >= ($2, $3)" } else { "" };
    let pause = if skip_paused { PAUSE_FILTER } else { "" };
    let (bound, order_by) = match order {
        ClaimOrder::Oldest => ("", "run_at, id"),
        ClaimOrder::Newest => (NEWEST_BOUND, "id DESC"),
    };
    let pick = format!(
        "FROM task_outbox
  WHERE run_at <= statement_timestamp(){resume}{pause}{bound}
  ORDER BY {order_by}
  LIMIT $1
    FOR UPDATE SKIP LOCKED"
    );
    match mode {
        // The row's ctid cannot change between the lock and the delete (the
        // lock stops every other writer), so the delete needs no index
        // lookup: a TID scan, measured 1.5x the throughput of `id IN (…)`.
        ClaimMode::Delete => format!(
            "DELETE FROM task_outbox WHERE ctid = ANY(ARRAY(SELECT ctid {pick}))
 RETURNING {CLAIM_COLUMNS}"
        ),
        ClaimMode::Lock(_) => format!("SELECT {CLAIM_COLUMNS} {pick}"),
    }
}

/// A `timestamptz` exactly as Postgres stores it: microseconds since
/// 2000-01-01 UTC, with `-infinity` and `infinity` as `i64::MIN` and
/// `i64::MAX`. Claimed rows keep their times in this form so a row put back
/// is bit for bit what was claimed, and an infinite `run_at` is seen as
/// such: `SystemTime` cannot hold `-infinity` (postgres-types' conversion
/// overflows, a panic in a debug build) and no time can be its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgTime(pub i64);

/// Unix milliseconds of 2000-01-01 00:00:00 UTC, Postgres's epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;

impl PgTime {
    /// Milliseconds since the Unix epoch, rounded down; the infinities
    /// stay `i64::MIN` / `i64::MAX`.
    pub fn unix_ms(self) -> i64 {
        match self.0 {
            i64::MIN => i64::MIN,
            i64::MAX => i64::MAX,
            us => us.div_euclid(1000).saturating_add(PG_EPOCH_MS),
        }
    }
}

impl<'a> tokio_postgres::types::FromSql<'a> for PgTime {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "a timestamp is 8 bytes")?;
        Ok(PgTime(i64::from_be_bytes(bytes)))
    }

    /// A `timestamp` column (no zone) has the same form, read as UTC.
    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ || *ty == Type::TIMESTAMP
    }
}

impl tokio_postgres::types::ToSql for PgTime {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Where an oldest-first claim resumes: the (run_at, id) key of the last
/// row of a previous batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClaimCursor {
    pub run_at: PgTime,
    pub id: i64,
}

/// What one claim returned.
#[derive(Debug, Default)]
pub struct Claimed {
    pub rows: Vec<OutboxRow>,
    /// `run_at` and `created_at` of each row as stored (same order as
    /// `rows`): what [`restore`] puts back.
    pub stored_at: Vec<(PgTime, PgTime)>,
    /// The greatest (run_at, id) claimed, for an oldest-first claim (a
    /// delete claim returns rows in no particular order).
    pub cursor: Option<ClaimCursor>,
    /// The largest [`OutboxRow::bytes`] claimed: what the next claim's row
    /// limit is sized by ([`crate::domain::ClaimLimit`]).
    pub max_row_bytes: u64,
}

/// Milliseconds since the Unix epoch, rounded down (what
/// `floor(extract(epoch FROM t) * 1000)` gives).
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => {
            let d = before.duration();
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            if d.as_nanos() % 1_000_000 == 0 {
                -ms
            } else {
                -ms - 1
            }
        }
    }
}

/// Claim up to `limit` due rows in `order` (oldest-first from `from` when
/// given), skipping rows another tick or relay holds, and the rows of
/// paused jobs when `skip_paused`. In [`ClaimMode::Delete`] the rows are
/// deleted by the claim (until the transaction commits). UUIDs come back
/// as text: the member needs their canonical form, and text columns avoid
/// any type lookup behind pgbouncer.
pub async fn claim_due(
    tx: &Transaction<'_>,
    mode: &ClaimMode,
    limit: i64,
    order: ClaimOrder,
    from: Option<ClaimCursor>,
    skip_paused: bool,
) -> Result<Claimed, tokio_postgres::Error> {
    let from = from.filter(|_| order == ClaimOrder::Oldest);
    let sql = claim_sql(mode, order, from.is_some(), skip_paused);
    let rows = match from {
        Some(c) => {
            tx.query_typed(
                &sql,
                &[
                    (&limit, Type::INT8),
                    (&c.run_at, Type::TIMESTAMPTZ),
                    (&c.id, Type::INT8),
                ],
            )
            .await?
        }
        None => tx.query_typed(&sql, &[(&limit, Type::INT8)]).await?,
    };
    let mut claimed = Claimed {
        rows: Vec::with_capacity(rows.len()),
        stored_at: Vec::with_capacity(rows.len()),
        cursor: None,
        max_row_bytes: 0,
    };
    for r in &rows {
        let run_at: PgTime = r.try_get(13)?;
        let created_at: PgTime = r.try_get(14)?;
        let now = unix_ms(r.try_get(15)?);
        let row = OutboxRow {
            id: r.try_get(0)?,
            task_id: r.try_get(1)?,
            job_id: r.try_get(2)?,
            page_id: r.try_get(3)?,
            host: r.try_get(4)?,
            path: r.try_get(5)?,
            priority: r.try_get(6)?,
            retry_count: r.try_get(7)?,
            source_type: r.try_get(8)?,
            source_url: r.try_get(9)?,
            task_type: r.try_get(10)?,
            lighthouse_run_id: r.try_get(11)?,
            attempts: r.try_get(12)?,
            run_at_ms: run_at.unix_ms(),
            age_at_claim_ms: (
                now.saturating_sub(created_at.unix_ms()),
                now.saturating_sub(run_at.unix_ms()),
            ),
        };
        if order == ClaimOrder::Oldest {
            let key = ClaimCursor { run_at, id: row.id };
            claimed.cursor = Some(claimed.cursor.map_or(key, |c| c.max(key)));
        }
        claimed.max_row_bytes = claimed.max_row_bytes.max(row.bytes());
        claimed.rows.push(row);
        claimed.stored_at.push((run_at, created_at));
    }
    Ok(claimed)
}

/// What a listening relay reads just before its claim (pipelined with it).
#[derive(Debug, Clone, Default)]
pub struct Horizon {
    /// The transaction snapshot at this moment: the claim, a later
    /// statement, sees at least every transaction this one shows committed.
    pub snapshot: Option<super::listen::Snapshot>,
    /// How long until the first row not yet due comes due, by the
    /// database's clock; `None` when no row waits (`infinity`, a set-aside
    /// row, counts as none).
    pub next_due_in: Option<std::time::Duration>,
}

/// The pauses, and with them the [`Horizon`]: one statement, so a
/// listening relay's claim costs no extra round of the pipeline (measured
/// +0.17 ms per claim as a statement of its own).
const PAUSES_AND_HORIZON_SQL: &str = "SELECT ARRAY(SELECT scope FROM outbox_relay_pause),
       txid_current_snapshot()::text,
       (SELECT ceil(extract(epoch FROM min(run_at) - statement_timestamp()) * 1000)::int8
          FROM task_outbox WHERE run_at > statement_timestamp() AND run_at < 'infinity')";

/// [`paused_scopes`], and the [`Horizon`] when `horizon` (one index probe
/// on the claim index).
///
/// Due means `run_at <= statement_timestamp()`, here and in the claim, not
/// `now()` (the transaction's start): a producer's row whose `run_at` is
/// its own transaction's start, committed between the tick's BEGIN and its
/// claim, is then due at the claim instead of seeming to come due a moment
/// later (a wake-up timer each, measured ~20 a second at 1,200 commits/s).
pub async fn pauses_and_horizon(
    tx: &Transaction<'_>,
    horizon: bool,
) -> Result<(Vec<String>, Option<Horizon>), tokio_postgres::Error> {
    if !horizon {
        return Ok((paused_scopes(tx).await?, None));
    }
    let row = tx.query_typed_one(PAUSES_AND_HORIZON_SQL, &[]).await?;
    let scopes: Vec<String> = row.try_get(0)?;
    let snapshot: Option<String> = row.try_get(1)?;
    let due_ms: Option<i64> = row.try_get(2)?;
    Ok((
        scopes,
        Some(Horizon {
            snapshot: snapshot.as_deref().and_then(super::listen::Snapshot::parse),
            next_due_in: due_ms.map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
        }),
    ))
}

/// `task_outbox`'s shape now ([`super::schema::OUTBOX_SHAPE_SQL`]).
pub async fn shape(tx: &Transaction<'_>) -> Result<String, tokio_postgres::Error> {
    let row = tx.query_typed_one(super::schema::OUTBOX_SHAPE_SQL, &[]).await?;
    Ok(row.try_get::<_, Option<String>>(0)?.unwrap_or_default())
}

/// The scopes paused now (`*` or job ids), read in the tick's transaction
/// just before its claim: a claim that skips paused jobs costs Postgres
/// planning and a subplan on every tick, so it is used only while
/// something is paused (the sweep checks the claimed rows against this
/// list and claims again with the filter when it missed a pause).
pub async fn paused_scopes(tx: &Transaction<'_>) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = tx.query_typed("SELECT scope FROM outbox_relay_pause", &[]).await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// Whether a claim that did not skip paused jobs took a row it should not
/// have: everything is paused, or one of `rows` belongs to a paused job.
pub fn claimed_paused(scopes: &[String], rows: &[OutboxRow]) -> bool {
    if scopes.is_empty() || rows.is_empty() {
        return false;
    }
    scopes.iter().any(|s| s == "*") || rows.iter().any(|r| scopes.contains(&r.job_id))
}

/// Put rows a delete claim took back into `task_outbox` as they were (same
/// id, same values), so the settle statements can update or move them.
/// `which` indexes `claimed.rows`.
pub async fn restore(
    tx: &Transaction<'_>,
    schema: &Schema,
    claimed: &Claimed,
    which: &[usize],
) -> Result<u64, tokio_postgres::Error> {
    if which.is_empty() {
        return Ok(0);
    }
    let rows: Vec<&OutboxRow> = which.iter().map(|&i| &claimed.rows[i]).collect();
    let col = |f: fn(&OutboxRow) -> &str| rows.iter().map(|r| f(r)).collect::<Vec<&str>>();
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let page_ids: Vec<i32> = rows.iter().map(|r| r.page_id).collect();
    let priorities: Vec<f64> = rows.iter().map(|r| r.priority).collect();
    let retry_counts: Vec<i32> = rows.iter().map(|r| r.retry_count).collect();
    let runs: Vec<Option<i64>> = rows.iter().map(|r| r.lighthouse_run_id).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
    let run_ats: Vec<PgTime> = which.iter().map(|&i| claimed.stored_at[i].0).collect();
    let created_ats: Vec<PgTime> = which.iter().map(|&i| claimed.stored_at[i].1).collect();
    let (task_ids, job_ids) = (col(|r| &r.task_id), col(|r| &r.job_id));
    let (hosts, paths) = (col(|r| &r.host), col(|r| &r.path));
    let (source_types, source_urls, task_types) =
        (col(|r| &r.source_type), col(|r| &r.source_url), col(|r| &r.task_type));
    let sql = format!(
        "INSERT INTO task_outbox
                (id, task_id, job_id, page_id, host, path, priority, retry_count, source_type,
                 source_url, task_type, lighthouse_run_id, attempts, run_at, created_at)
         OVERRIDING SYSTEM VALUE
         SELECT id, task_id::{}, job_id::{}, page_id, host, path, priority, retry_count, source_type,
                source_url, task_type, lighthouse_run_id, attempts, run_at, created_at
           FROM unnest($1::int8[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[],
                       $7::float8[], $8::int4[], $9::text[], $10::text[], $11::text[], $12::int8[],
                       $13::int4[], $14::timestamptz[], $15::timestamptz[])
             AS u(id, task_id, job_id, page_id, host, path, priority, retry_count, source_type,
                  source_url, task_type, lighthouse_run_id, attempts, run_at, created_at)",
        schema.outbox_task_id.sql(),
        schema.outbox_job_id.sql(),
    );
    tx.execute_typed(
        &sql,
        &[
            (&ids, Type::INT8_ARRAY),
            (&task_ids, Type::TEXT_ARRAY),
            (&job_ids, Type::TEXT_ARRAY),
            (&page_ids, Type::INT4_ARRAY),
            (&hosts, Type::TEXT_ARRAY),
            (&paths, Type::TEXT_ARRAY),
            (&priorities, Type::FLOAT8_ARRAY),
            (&retry_counts, Type::INT4_ARRAY),
            (&source_types, Type::TEXT_ARRAY),
            (&source_urls, Type::TEXT_ARRAY),
            (&task_types, Type::TEXT_ARRAY),
            (&runs, Type::INT8_ARRAY),
            (&attempts, Type::INT4_ARRAY),
            (&run_ats, Type::TIMESTAMPTZ_ARRAY),
            (&created_ats, Type::TIMESTAMPTZ_ARRAY),
        ],
    )
    .await
}

/// Delete delivered rows.
pub async fn delete(tx: &Transaction<'_>, ids: &[i64]) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute_typed(
        "DELETE FROM task_outbox WHERE id = ANY($1)",
        &[(&ids, Type::INT8_ARRAY)],
    )
    .await
}

/// Count a failed attempt and push each row's `run_at` out by its own delay,
/// from now (`clock_timestamp()`): the transaction's `now()` is its start,
/// and a tick that waited on Redis would put rows off by less than their
/// delay, some already due (`tests/settle_refusals.rs`).
pub async fn reschedule(tx: &Transaction<'_>, ids: &[i64], delays_ms: &[i64]) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute_typed(
        "UPDATE task_outbox o
            SET attempts = o.attempts + 1,
                run_at = clock_timestamp() + u.delay_ms * interval '1 millisecond'
           FROM unnest($1::int8[], $2::int8[]) AS u(id, delay_ms)
          WHERE o.id = u.id",
        &[(&ids, Type::INT8_ARRAY), (&delays_ms, Type::INT8_ARRAY)],
    )
    .await
}

/// Try rows again `delay_ms` from now (`clock_timestamp()`, as
/// [`reschedule`]), attempts unchanged (not their fault).
pub async fn postpone(tx: &Transaction<'_>, ids: &[i64], delay_ms: i64) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute_typed(
        "UPDATE task_outbox SET run_at = clock_timestamp() + $2::int8 * interval '1 millisecond' WHERE id = ANY($1::int8[])",
        &[(&ids, Type::INT8_ARRAY), (&delay_ms, Type::INT8)],
    )
    .await
}

/// Move rows to `task_outbox_dead` with `attempts + 1` and their own error.
///
/// One statement (a DELETE … RETURNING feeding an INSERT) inside the tick's
/// transaction: a row is never in both tables and never in neither. The ids
/// are cast to the dead table's column types (`schema`): on the Go
/// sweeper's database a TEXT id goes into a UUID column, which has no
/// assignment cast. The caller keeps rows whose ids cannot be cast out of
/// `ids` ([`Schema::dead_letter_refusal`], then [`set_aside`]), so one such
/// row cannot fail the statement for the others.
pub async fn move_to_dead(
    tx: &Transaction<'_>,
    schema: &Schema,
    ids: &[i64],
    errors: &[String],
) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "WITH moved AS (
             DELETE FROM task_outbox o
              USING unnest($1::int8[], $2::text[]) AS u(id, err)
              WHERE o.id = u.id
          RETURNING o.*, u.err
         )
         INSERT INTO task_outbox_dead
                (original_id, task_id, job_id, page_id, host, path, priority, retry_count,
                 source_type, source_url, run_at, attempts, created_at, task_type,
                 lighthouse_run_id, last_error)
         SELECT id, task_id::{}, job_id::{}, page_id, host, path, priority, retry_count,
                source_type, source_url, run_at, attempts + 1, created_at, task_type,
                lighthouse_run_id, err
           FROM moved",
        schema.dead_task_id.sql(),
        schema.dead_job_id.sql(),
    );
    tx.execute_typed(&sql, &[(&ids, Type::INT8_ARRAY), (&errors, Type::TEXT_ARRAY)])
        .await
}

/// `run_at` of a row set aside: never due, so no tick claims it again.
pub const SET_ASIDE_RUN_AT: &str = "infinity";

/// Set aside rows that should move to the dead table but cannot (their
/// ids do not fit its columns, see [`Schema::dead_letter_refusal`]): they
/// stay in `task_outbox` with `attempts + 1` and `run_at = 'infinity'`, so
/// they are never claimed again (no hot retry loop), never lost, and
/// visible to `status` and the `outbox_relay_set_aside_rows` gauge. An
/// operator fixes the id or deletes the row; `UPDATE task_outbox SET run_at
/// = now() WHERE run_at = 'infinity'` puts them back in the queue.
pub async fn set_aside(tx: &Transaction<'_>, ids: &[i64]) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute_typed(
        "UPDATE task_outbox SET attempts = attempts + 1, run_at = 'infinity' WHERE id = ANY($1::int8[])",
        &[(&ids, Type::INT8_ARRAY)],
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pg_times_give_unix_ms_rounded_down_and_keep_the_infinities() {
        assert_eq!(PgTime(0).unix_ms(), 946_684_800_000);
        assert_eq!(PgTime(1_500).unix_ms(), 946_684_800_001);
        assert_eq!(PgTime(-946_684_800_000_000).unix_ms(), 0);
        assert_eq!(PgTime(-946_684_800_000_500).unix_ms(), -1);
        assert_eq!(PgTime(i64::MIN).unix_ms(), i64::MIN);
        assert_eq!(PgTime(i64::MAX).unix_ms(), i64::MAX);
        assert!(PgTime(i64::MIN) < PgTime(0) && PgTime(0) < PgTime(i64::MAX));
    }

    #[test]
    fn unix_ms_rounds_down_on_both_sides_of_the_epoch() {
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_micros(1_500)), 1);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_micros(500)), -1);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_millis(1)), -1);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_micros(1_001)), -2);
        assert_eq!(
            unix_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            1_700_000_000_123
        );
    }

    fn row(job: &str) -> OutboxRow {
        OutboxRow::blank(1, job, 0)
    }

    #[test]
    fn a_claim_took_a_paused_row_only_when_a_pause_covers_one() {
        let rows = [row("job-a"), row("job-b")];
        let scopes = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!claimed_paused(&[], &rows));
        assert!(claimed_paused(&scopes(&["*"]), &rows));
        assert!(claimed_paused(&scopes(&["job-x", "job-b"]), &rows));
        assert!(!claimed_paused(&scopes(&["job-x"]), &rows));
        // Nothing claimed: nothing to undo, whatever is paused.
        assert!(!claimed_paused(&scopes(&["*"]), &[]));
    }

    #[test]
    fn the_claim_statement_follows_mode_order_cursor_and_pauses() {
        let delete = claim_sql(&ClaimMode::Delete, ClaimOrder::Oldest, false, false);
        assert!(
            delete.starts_with("DELETE FROM task_outbox WHERE ctid = ANY(ARRAY(SELECT ctid"),
            "{delete}"
        );
        assert!(delete.contains("ORDER BY run_at, id") && delete.contains("FOR UPDATE SKIP LOCKED"));
        assert!(
            !delete.contains("outbox_relay_pause") && !delete.contains("$2"),
            "{delete}"
        );
        let resumed = claim_sql(&ClaimMode::Delete, ClaimOrder::Oldest, true, true);
        assert!(resumed.contains("(run_at, id) >= ($2, $3)"), "{resumed}");
        assert!(resumed.contains("job_id::text NOT IN (SELECT scope FROM outbox_relay_pause)"));
        let newest = claim_sql(&ClaimMode::Delete, ClaimOrder::Newest, false, false);
        assert!(newest.contains("ORDER BY id DESC") && newest.contains("pg_sequence_last_value"));
        let lock = claim_sql(&ClaimMode::Lock("why".into()), ClaimOrder::Oldest, false, false);
        assert!(lock.starts_with("SELECT id, task_id::text"), "{lock}");
        assert!(!lock.contains("DELETE") && lock.contains("FOR UPDATE SKIP LOCKED"));
    }
}
