//! Queries of one sweep tick on `task_outbox` (and the atomic move into
//! `task_outbox_dead`), each a plain async function on the tick's
//! transaction so it can be tested without actors.
//!
//! All of them take arrays (`= ANY($1)`, `unnest`), so a settle costs one
//! round trip per kind of outcome whatever the batch size.

use std::time::SystemTime;

use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use super::schema::Schema;
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

const CLAIM_OLDEST: &str = "SELECT id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
        source_type, source_url, task_type, lighthouse_run_id, attempts,
        floor(extract(epoch FROM run_at) * 1000)::int8, run_at,
        floor(extract(epoch FROM now() - created_at) * 1000)::int8,
        floor(extract(epoch FROM now() - run_at) * 1000)::int8
   FROM task_outbox
  WHERE run_at <= now()
    AND NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope = '*')
    -- Per row only while some job is paused: the EXISTS is evaluated once
    -- (an InitPlan), and OR stops there when no job is.
    AND (NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope <> '*')
         OR job_id::text NOT IN (SELECT scope FROM outbox_relay_pause))
  ORDER BY run_at, id
  LIMIT $1
    FOR UPDATE SKIP LOCKED";

/// The same, resuming at a key: the index scan starts there instead of
/// walking the dead entries of rows already delivered.
const CLAIM_OLDEST_FROM: &str = "SELECT id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
        source_type, source_url, task_type, lighthouse_run_id, attempts,
        floor(extract(epoch FROM run_at) * 1000)::int8, run_at,
        floor(extract(epoch FROM now() - created_at) * 1000)::int8,
        floor(extract(epoch FROM now() - run_at) * 1000)::int8
   FROM task_outbox
  WHERE run_at <= now() AND (run_at, id) >= ($2, $3)
    AND NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope = '*')
    -- Per row only while some job is paused: the EXISTS is evaluated once
    -- (an InitPlan), and OR stops there when no job is.
    AND (NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope <> '*')
         OR job_id::text NOT IN (SELECT scope FROM outbox_relay_pause))
  ORDER BY run_at, id
  LIMIT $1
    FOR UPDATE SKIP LOCKED";

const CLAIM_NEWEST: &str = "SELECT id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
        source_type, source_url, task_type, lighthouse_run_id, attempts,
        floor(extract(epoch FROM run_at) * 1000)::int8, run_at,
        floor(extract(epoch FROM now() - created_at) * 1000)::int8,
        floor(extract(epoch FROM now() - run_at) * 1000)::int8
   FROM task_outbox
  WHERE run_at <= now()
    AND NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope = '*')
    -- Per row only while some job is paused: the EXISTS is evaluated once
    -- (an InitPlan), and OR stops there when no job is.
    AND (NOT EXISTS (SELECT 1 FROM outbox_relay_pause WHERE scope <> '*')
         OR job_id::text NOT IN (SELECT scope FROM outbox_relay_pause))
    -- Only the newest 20,000 ids: when fewer than LIMIT rows are
    -- there, the backward scan stops at this bound instead of walking every
    -- dead entry a past drain left in the primary key. Older rows are the
    -- drain lanes' work.
    AND id > (SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('task_outbox', 'id')::regclass), 0)
                     - 20000)
  ORDER BY id DESC
  LIMIT $1
    FOR UPDATE SKIP LOCKED";

/// Where an oldest-first claim resumes: the (run_at, id) key of the last
/// row of a previous batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClaimCursor {
    pub run_at: SystemTime,
    pub id: i64,
}

/// Claim up to `limit` due rows in `order` that are not paused
/// (`outbox_relay_pause`: scope `*` pauses everything, a job id its rows) (oldest-first from `from` when
/// given), skipping rows another tick or relay holds. Returns the rows and
/// the key of the last one. UUIDs come back as text: the member needs their
/// canonical form, and text columns avoid any type lookup behind pgbouncer.
pub async fn claim_due(
    tx: &Transaction<'_>,
    limit: i64,
    order: ClaimOrder,
    from: Option<ClaimCursor>,
) -> Result<(Vec<OutboxRow>, Option<ClaimCursor>), tokio_postgres::Error> {
    let rows = match (order, from) {
        (ClaimOrder::Oldest, Some(c)) => {
            tx.query_typed(
                CLAIM_OLDEST_FROM,
                &[
                    (&limit, Type::INT8),
                    (&c.run_at, Type::TIMESTAMPTZ),
                    (&c.id, Type::INT8),
                ],
            )
            .await?
        }
        (ClaimOrder::Oldest, None) => tx.query_typed(CLAIM_OLDEST, &[(&limit, Type::INT8)]).await?,
        (ClaimOrder::Newest, _) => tx.query_typed(CLAIM_NEWEST, &[(&limit, Type::INT8)]).await?,
    };
    let cursor = match rows.last() {
        Some(r) => Some(ClaimCursor {
            run_at: r.try_get(14)?,
            id: r.try_get(0)?,
        }),
        None => None,
    };
    let rows = rows
        .iter()
        .map(|r| {
            Ok(OutboxRow {
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
                run_at_ms: r.try_get(13)?,
                age_at_claim_ms: (r.try_get(15)?, r.try_get(16)?),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok((rows, cursor))
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

/// Count a failed attempt and push each row's `run_at` out by its own delay.
pub async fn reschedule(tx: &Transaction<'_>, ids: &[i64], delays_ms: &[i64]) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute_typed(
        "UPDATE task_outbox o
            SET attempts = o.attempts + 1,
                run_at = now() + u.delay_ms * interval '1 millisecond'
           FROM unnest($1::int8[], $2::int8[]) AS u(id, delay_ms)
          WHERE o.id = u.id",
        &[(&ids, Type::INT8_ARRAY), (&delays_ms, Type::INT8_ARRAY)],
    )
    .await
}

/// Try rows again after `delay_ms`, attempts unchanged (not their fault).
pub async fn postpone(tx: &Transaction<'_>, ids: &[i64], delay_ms: i64) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute_typed(
        "UPDATE task_outbox SET run_at = now() + $2::int8 * interval '1 millisecond' WHERE id = ANY($1::int8[])",
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
