//! Queries on `task_outbox_dead`: list, summarise, requeue, purge.
//!
//! Used by the `dead-letter` subcommands and by the `DeadLetterActor`'s
//! retention. Every statement is unnamed (pgbouncer-safe). Requeue is one
//! transaction: rows move back to `task_outbox` (attempts 0, due now,
//! original `created_at`) and leave the dead table together, or not at all.
//! Purge deletes in small batches so it never holds a long lock.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use super::error::{column, pg_error_text, ColumnError};
use super::schema::Schema;

/// Which dead letters a `list` looks at (all filters combine with AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// A job id, compared as the type of `task_outbox_dead.job_id`.
    pub job: Option<String>,
    /// Only rows dead-lettered within this long.
    pub since: Option<Duration>,
    /// Only rows whose `last_error` contains this text (case-sensitive).
    pub error: Option<String>,
}

/// Which dead letters a requeue moves. There is no default: the operator
/// must say what they mean.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Ids(Vec<i64>),
    Job(String),
    Error(String),
    All,
}

/// One dead letter as listed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadRow {
    pub id: i64,
    pub original_id: i64,
    pub task_id: String,
    pub job_id: String,
    pub attempts: i32,
    pub dead_lettered_at: String,
    pub last_error: String,
}

/// Dead letters sharing one error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorCount {
    pub error: String,
    pub count: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RequeueReport {
    /// Dead letters the selector matched.
    pub matched: u64,
    /// Moved back into the outbox.
    pub requeued: u64,
    /// Left in the dead table because their task is already in the outbox
    /// (re-produced meanwhile) or is selected twice.
    pub skipped: u64,
    /// Of `skipped`: `lighthouse` rows whose run was deleted (the dead
    /// table's foreign key set their run id NULL), which `task_outbox`'s
    /// routing check would refuse.
    pub lighthouse_run_gone: u64,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead letter query failed: {0}")]
    Query(String),
    #[error("no dead letter with id {}", .0.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "))]
    UnknownIds(Vec<i64>),
}

impl From<ColumnError> for DeadLetterError {
    fn from(e: ColumnError) -> Self {
        DeadLetterError::Query(e.to_string())
    }
}

/// The table every query here reads (named in a [`ColumnError`]).
const TABLE: &str = "task_outbox_dead";

impl From<tokio_postgres::Error> for DeadLetterError {
    fn from(e: tokio_postgres::Error) -> Self {
        DeadLetterError::Query(pg_error_text(&e))
    }
}

/// `job_id` is cast to text rather than `$1` to the column's type, so an id
/// the column cannot hold matches nothing instead of failing the cast
/// (these triage queries are not on the hot path).
const FILTER: &str = "($1::text IS NULL OR job_id::text = $1)
     AND ($2::int8 IS NULL OR dead_lettered_at >= now() - $2 * interval '1 millisecond')
     AND ($3::text IS NULL OR strpos(last_error, $3) > 0)";

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Newest first, at most `limit` rows.
pub async fn list(client: &Client, schema: &Schema, f: &Filter, limit: i64) -> Result<Vec<DeadRow>, DeadLetterError> {
    let since = f.since.map(ms);
    let job = job_text(schema, f.job.as_deref());
    let sql = format!(
        "SELECT id, original_id, task_id::text, job_id::text, attempts,
                to_char(dead_lettered_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), last_error
           FROM task_outbox_dead
          WHERE {FILTER}
          ORDER BY dead_lettered_at DESC, id DESC
          LIMIT $4"
    );
    let rows = client
        .query_typed(
            &sql,
            &[
                (&job, Type::TEXT),
                (&since, Type::INT8),
                (&f.error, Type::TEXT),
                (&limit, Type::INT8),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(DeadRow {
                id: column(r, TABLE, 0)?,
                original_id: column(r, TABLE, 1)?,
                task_id: column(r, TABLE, 2)?,
                job_id: column(r, TABLE, 3)?,
                attempts: column(r, TABLE, 4)?,
                dead_lettered_at: column(r, TABLE, 5)?,
                last_error: column(r, TABLE, 6)?,
            })
        })
        .collect::<Result<_, ColumnError>>()?)
}

/// Count per distinct error over everything the filter matches, largest first.
pub async fn summary(client: &Client, schema: &Schema, f: &Filter) -> Result<Vec<ErrorCount>, DeadLetterError> {
    let since = f.since.map(ms);
    let job = job_text(schema, f.job.as_deref());
    let sql = format!(
        "SELECT last_error, count(*) FROM task_outbox_dead WHERE {FILTER}
          GROUP BY last_error ORDER BY count(*) DESC, last_error"
    );
    let rows = client
        .query_typed(
            &sql,
            &[(&job, Type::TEXT), (&since, Type::INT8), (&f.error, Type::TEXT)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(ErrorCount {
                error: column(r, TABLE, 0)?,
                count: column(r, TABLE, 1)?,
            })
        })
        .collect::<Result<_, ColumnError>>()?)
}

/// A job id in the form `task_outbox_dead.job_id::text` gives it back
/// (canonical for a UUID column); an id that column cannot hold is kept as
/// given and simply matches nothing.
fn job_text(schema: &Schema, job: Option<&str>) -> Option<String> {
    job.map(|j| schema.dead_job_id.stored_form(j).unwrap_or_else(|| j.to_string()))
}

/// Total dead letters.
pub async fn count(client: &impl GenericClient) -> Result<i64, DeadLetterError> {
    Ok(client
        .query_typed_one("SELECT count(*) FROM task_outbox_dead", &[])
        .await
        .map(|r| column(&r, TABLE, 0))??)
}

/// Move the selected dead letters back into `task_outbox`, atomically.
///
/// Ids are cast to `task_outbox`'s column types (`schema`); where its
/// routing check needs a run id, `lighthouse` rows whose run is gone stay
/// in the dead table (counted in `lighthouse_run_gone`) instead of failing
/// the whole requeue.
pub async fn requeue(
    client: &mut Client,
    schema: &Schema,
    sel: &Selector,
    dry_run: bool,
) -> Result<RequeueReport, DeadLetterError> {
    let (ids, job, error): (Option<Vec<i64>>, Option<String>, Option<String>) = match sel {
        Selector::Ids(ids) => (Some(ids.clone()), None, None),
        Selector::Job(j) => (None, job_text(schema, Some(j)), None),
        Selector::Error(e) => (None, None, Some(e.clone())),
        Selector::All => (None, None, None),
    };
    let tx = client.transaction().await?;
    let locked: Vec<i64> = tx
        .query_typed(
            "SELECT id FROM task_outbox_dead
              WHERE ($1::int8[] IS NULL OR id = ANY($1))
                AND ($2::text IS NULL OR job_id::text = $2)
                AND ($3::text IS NULL OR strpos(last_error, $3) > 0)
              ORDER BY id
                FOR UPDATE",
            &[(&ids, Type::INT8_ARRAY), (&job, Type::TEXT), (&error, Type::TEXT)],
        )
        .await?
        .iter()
        .map(|r| column(r, TABLE, 0))
        .collect::<Result<_, ColumnError>>()?;
    if let Some(wanted) = &ids {
        let missing: Vec<i64> = wanted.iter().filter(|i| !locked.contains(i)).copied().collect();
        if !missing.is_empty() {
            return Err(DeadLetterError::UnknownIds(missing));
        }
    }
    let matched = locked.len() as u64;
    let (task_t, job_t) = (schema.outbox_task_id.sql(), schema.outbox_job_id.sql());
    // Rows task_outbox's checks would refuse: left where they are.
    let run_gone: i64 = if schema.outbox_checks_lighthouse_run {
        tx.query_typed_one(
            "SELECT count(*) FROM task_outbox_dead
              WHERE id = ANY($1) AND task_type = 'lighthouse' AND lighthouse_run_id IS NULL",
            &[(&locked, Type::INT8_ARRAY)],
        )
        .await
        .map(|r| column(&r, TABLE, 0))??
    } else {
        0
    };
    let lighthouse_run_gone = run_gone.max(0) as u64;
    let eligible = if schema.outbox_checks_lighthouse_run {
        "AND NOT (d.task_type = 'lighthouse' AND d.lighthouse_run_id IS NULL)"
    } else {
        ""
    };
    if dry_run {
        let would_skip: i64 = tx
            .query_typed_one(
                &format!(
                    "SELECT count(*) - count(DISTINCT d.task_id) FILTER (WHERE o.task_id IS NULL)
                       FROM task_outbox_dead d LEFT JOIN task_outbox o ON o.task_id = d.task_id::{task_t}
                      WHERE d.id = ANY($1) {eligible}"
                ),
                &[(&locked, Type::INT8_ARRAY)],
            )
            .await
            .map(|r| column(&r, TABLE, 0))??;
        let skipped = (would_skip.max(0) as u64 + lighthouse_run_gone).min(matched);
        return Ok(RequeueReport {
            matched,
            requeued: matched - skipped,
            skipped,
            lighthouse_run_gone,
            dry_run: true,
        });
    }
    let requeued: i64 = tx
        .query_typed_one(
            &format!(
                "WITH sel AS (
                 SELECT DISTINCT ON (task_id) *
                   FROM task_outbox_dead d
                  WHERE id = ANY($1) {eligible}
                  ORDER BY task_id, dead_lettered_at DESC, id DESC
             ), ins AS (
                 INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count,
                                          source_type, source_url, run_at, attempts, created_at,
                                          task_type, lighthouse_run_id)
                 SELECT task_id::{task_t}, job_id::{job_t}, page_id, host, path, priority, retry_count,
                        source_type, source_url, now(), 0, created_at, task_type, lighthouse_run_id
                   FROM sel
                 ON CONFLICT (task_id) DO NOTHING
                 RETURNING task_id
             ), del AS (
                 DELETE FROM task_outbox_dead d
                  USING sel JOIN ins ON ins.task_id = sel.task_id::{task_t}
                  WHERE d.id = sel.id
                 RETURNING d.id
             )
             SELECT count(*) FROM del"
            ),
            &[(&locked, Type::INT8_ARRAY)],
        )
        .await
        .map(|r| column(&r, TABLE, 0))??;
    tx.commit().await?;
    let requeued = requeued.max(0) as u64;
    Ok(RequeueReport {
        matched,
        requeued,
        skipped: matched - requeued,
        lighthouse_run_gone,
        dry_run: false,
    })
}

/// Dead letters older than `older_than` (counted, nothing deleted).
pub async fn count_older(client: &impl GenericClient, older_than: Duration) -> Result<i64, DeadLetterError> {
    Ok(client
        .query_typed_one(
            "SELECT count(*) FROM task_outbox_dead WHERE dead_lettered_at < now() - $1 * interval '1 millisecond'",
            &[(&ms(older_than), Type::INT8)],
        )
        .await?
        .get(0))
}

/// Delete at most `batch` dead letters dead-lettered before `cutoff_ms`
/// (unix milliseconds); returns how many went. Each call is its own short
/// statement, so a large purge never holds a long lock.
pub async fn purge_batch(client: &impl GenericClient, cutoff_ms: i64, batch: i64) -> Result<u64, DeadLetterError> {
    Ok(client
        .execute_typed(
            "DELETE FROM task_outbox_dead WHERE id IN (
                 SELECT id FROM task_outbox_dead
                  WHERE dead_lettered_at < to_timestamp($1::float8 / 1000)
                  LIMIT $2)",
            &[(&(cutoff_ms as f64), Type::FLOAT8), (&batch, Type::INT8)],
        )
        .await?)
}

/// The cut-off for "older than `older_than`", fixed once by the server's clock.
pub async fn cutoff_ms(client: &impl GenericClient, older_than: Duration) -> Result<i64, DeadLetterError> {
    Ok(client
        .query_typed_one(
            "SELECT floor(extract(epoch FROM now()) * 1000)::int8 - $1",
            &[(&ms(older_than), Type::INT8)],
        )
        .await?
        .get(0))
}

/// What a filtered requeue or purge did, over all its batches.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BatchReport {
    /// Dead letters the filter matched when their batch was taken.
    pub matched: u64,
    /// Moved back into the outbox (requeue) or deleted (purge).
    pub done: u64,
    /// Left in place (requeue: their task is in the outbox already, or a
    /// `lighthouse` row's run is gone).
    pub skipped: u64,
    pub batches: u64,
}

/// Which rows a filter matched, exactly: how many, the highest id, and a
/// fingerprint of the whole id set (the sum of a 64-bit hash of each id:
/// any row added, removed or swapped changes it). What a confirmation
/// shows and a bulk action is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub rows: i64,
    pub max_id: i64,
    pub fingerprint: String,
}

/// The SQL of an [`Extent`] over the `id`s a `FROM … WHERE` selects.
pub const EXTENT_COLUMNS: &str =
    "count(*), coalesce(max(id), 0)::int8, coalesce(sum(hashint8extended(id, 0)::numeric), 0)::text";

impl Extent {
    /// Read from a row of [`EXTENT_COLUMNS`].
    pub fn from_row(r: &tokio_postgres::Row, table: &'static str) -> Result<Extent, ColumnError> {
        Ok(Extent {
            rows: column(r, table, 0)?,
            max_id: column(r, table, 1)?,
            fingerprint: column(r, table, 2)?,
        })
    }
}

/// The [`Extent`] of the dead letters matching `f`.
pub async fn extent(client: &Client, schema: &Schema, f: &Filter) -> Result<Extent, DeadLetterError> {
    let job = job_text(schema, f.job.as_deref());
    let since = f.since.map(ms);
    let r = client
        .query_typed_one(
            &format!("SELECT {EXTENT_COLUMNS} FROM task_outbox_dead WHERE {FILTER}"),
            &[(&job, Type::TEXT), (&since, Type::INT8), (&f.error, Type::TEXT)],
        )
        .await?;
    Ok(Extent::from_row(&r, TABLE)?)
}

/// The next at most `batch` ids matching `f` above `after` and at most
/// `upto`, in id order.
async fn next_ids(
    client: &Client,
    schema: &Schema,
    f: &Filter,
    (after, upto): (i64, i64),
    batch: i64,
) -> Result<Vec<i64>, DeadLetterError> {
    let job = job_text(schema, f.job.as_deref());
    let since = f.since.map(ms);
    let rows = client
        .query_typed(
            &format!("SELECT id FROM task_outbox_dead WHERE {FILTER} AND id > $4 AND id <= $6 ORDER BY id LIMIT $5"),
            &[
                (&job, Type::TEXT),
                (&since, Type::INT8),
                (&f.error, Type::TEXT),
                (&after, Type::INT8),
                (&batch, Type::INT8),
                (&upto, Type::INT8),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| column(r, TABLE, 0))
        .collect::<Result<_, ColumnError>>()?)
}

/// Requeue every dead letter matching `f` whose id is at most `upto` (the
/// highest id the operator confirmed: rows dead-lettered since are not
/// touched), `batch` at a time (each batch its own transaction, so a
/// large requeue never holds long locks); `progress` is called after each
/// batch. Rows a concurrent purge took meanwhile are skipped, not an
/// error.
pub async fn requeue_matching(
    client: &mut Client,
    schema: &Schema,
    f: &Filter,
    upto: i64,
    batch: i64,
    mut progress: impl FnMut(&BatchReport),
) -> Result<BatchReport, DeadLetterError> {
    let mut report = BatchReport::default();
    let mut after = 0;
    loop {
        let ids = next_ids(client, schema, f, (after, upto), batch).await?;
        let Some(&last) = ids.last() else { break };
        after = last;
        let mut want = ids;
        let done = loop {
            match requeue(client, schema, &Selector::Ids(want.clone()), false).await {
                Ok(r) => break r,
                Err(DeadLetterError::UnknownIds(gone)) => {
                    want.retain(|i| !gone.contains(i));
                    if want.is_empty() {
                        break RequeueReport::default();
                    }
                }
                Err(e) => return Err(e),
            }
        };
        report.matched += done.matched;
        report.done += done.requeued;
        report.skipped += done.skipped;
        report.batches += 1;
        progress(&report);
    }
    Ok(report)
}

/// Delete every dead letter matching `f` whose id is at most `upto`,
/// `batch` per statement.
pub async fn purge_matching(
    client: &Client,
    schema: &Schema,
    f: &Filter,
    upto: i64,
    batch: i64,
    mut progress: impl FnMut(&BatchReport),
) -> Result<BatchReport, DeadLetterError> {
    let mut report = BatchReport::default();
    let mut after = 0;
    loop {
        let ids = next_ids(client, schema, f, (after, upto), batch).await?;
        let Some(&last) = ids.last() else { break };
        after = last;
        let deleted = client
            .execute_typed(
                "DELETE FROM task_outbox_dead WHERE id = ANY($1)",
                &[(&ids, Type::INT8_ARRAY)],
            )
            .await?;
        report.matched += ids.len() as u64;
        report.done += deleted;
        report.skipped += ids.len() as u64 - deleted.min(ids.len() as u64);
        report.batches += 1;
        progress(&report);
    }
    Ok(report)
}
