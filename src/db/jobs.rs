//! Queries on `jobs`: the running-task counter and cancellation.
//!
//! Each counter write is one autocommit statement that locks one job row:
//! no transaction ever holds several jobs' row locks (the Go sweeper
//! deadlocked against a trigger when it did).

use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use super::error::{column, pg_error_text, ColumnError, QueryError};
use super::schema::{IdType, Schema};

/// Set one job's `running_tasks` to `count` if it is `running` or
/// `pending`; returns the previous value (`Some(None)` when it was NULL), or
/// `None` when the job is absent or in another state (left alone). An
/// unchanged value is not rewritten; a NULL one is. The previous value is
/// read as `int8`, so any integer column type works.
pub async fn set_running_tasks(
    client: &impl GenericClient,
    jobs_id: IdType,
    job: &str,
    count: i32,
) -> Result<Option<Option<i64>>, QueryError> {
    // The id is bound as text and cast to the column's type (UUID or TEXT).
    let sql = format!(
        "WITH cur AS (
                 SELECT id, running_tasks AS prev FROM jobs
                  WHERE id = $1::{jobs_id} AND status IN ('running', 'pending')
                    FOR UPDATE
             ), upd AS (
                 UPDATE jobs j SET running_tasks = $2 FROM cur
                  WHERE j.id = cur.id AND cur.prev IS DISTINCT FROM $2
             )
             SELECT prev::int8 AS running_tasks FROM cur"
    );
    let row = client
        .query_typed_opt(&sql, &[(&job, Type::TEXT), (&count, Type::INT4)])
        .await?;
    Ok(row.map(|r| column(&r, "jobs", 0)).transpose()?)
}

/// Jobs that are `running`/`pending` with a non-zero counter.
pub async fn jobs_with_running_tasks(client: &impl GenericClient) -> Result<Vec<String>, QueryError> {
    Ok(client
        .query_typed(
            "SELECT id::text FROM jobs WHERE running_tasks > 0 AND status IN ('running', 'pending')",
            &[],
        )
        .await?
        .iter()
        .map(|r| column(r, "jobs", 0))
        .collect::<Result<_, _>>()?)
}

/// Statuses a job can be cancelled from.
pub const CANCELLABLE: &[&str] = &["pending", "running", "paused", "initialising"];

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job with id {0}")]
    UnknownJob(String),
    #[error("job {job} is {status}; only pending, running, paused or initialising jobs can be cancelled")]
    NotCancellable { job: String, status: String },
    #[error("cancel failed: {0}")]
    Query(String),
}

impl From<ColumnError> for CancelError {
    fn from(e: ColumnError) -> Self {
        CancelError::Query(e.to_string())
    }
}

impl From<tokio_postgres::Error> for CancelError {
    fn from(e: tokio_postgres::Error) -> Self {
        CancelError::Query(pg_error_text(&e))
    }
}

/// What cancelling did in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// The job was cancelled before (its status did not change).
    pub already: bool,
    pub outbox_rows_deleted: u64,
}

/// In one transaction: mark the job cancelled and delete its outbox rows.
///
/// The DELETE waits for rows a sweep has claimed (they are locked until its
/// tick commits or rolls back), so once this returns no tick still holds a
/// row of the job. That alone does not stop a late write: a tick that
/// passed its deadline has rolled back, but its ZADD may still be queued in
/// a stalled Redis or a black-holed network and run after the caller has
/// removed the schedule. The caller therefore sets the job's cancel fence
/// before removing the schedule, and every schedule write checks that fence
/// inside Redis (`redis::pipeline::FENCED_ZADD`).
///
/// `job` is compared as the type of each column it meets (`schema`: UUID
/// or TEXT); an id a UUID column cannot hold matches nothing there.
pub async fn cancel(client: &mut Client, schema: &Schema, job: &str) -> Result<Cancelled, CancelError> {
    let tx = client.transaction().await?;
    let status: Option<String> = if schema.jobs_id.accepts(job) {
        tx.query_typed_opt(
            // NO KEY UPDATE, the lock the status UPDATE takes anyway: it
            // does not block the KEY SHARE lock of a foreign key check (a
            // producer inserting a row of the job, a relay moving one).
            &format!(
                "SELECT status FROM jobs WHERE id = $1::{} FOR NO KEY UPDATE",
                schema.jobs_id
            ),
            &[(&job, Type::TEXT)],
        )
        .await?
        .map(|r| column(&r, "jobs", 0))
        .transpose()?
    } else {
        None
    };
    let already = match status.as_deref() {
        None => return Err(CancelError::UnknownJob(job.to_string())),
        Some("cancelled") => true,
        Some(s) if CANCELLABLE.contains(&s) => false,
        Some(s) => {
            return Err(CancelError::NotCancellable {
                job: job.to_string(),
                status: s.to_string(),
            })
        }
    };
    if !already {
        tx.execute_typed(
            &format!(
                "UPDATE jobs SET status = 'cancelled', completed_at = now() WHERE id = $1::{}",
                schema.jobs_id
            ),
            &[(&job, Type::TEXT)],
        )
        .await?;
    }
    // Also for an already-cancelled job: rows a producer wrote after the
    // first cancel would otherwise wait forever.
    //
    // Rows this DELETE cannot see are not its concern: a producer's commit
    // after its snapshot, or a row a delete-claiming sweep put back (a
    // retry: a new row version, committed while this DELETE waited for
    // that sweep). The job's cancel fence, set once this commits, refuses
    // every later write of the job in Redis, and the sweep deletes such a
    // row unsent (`cancelled`) when it next claims it.
    let deleted = match schema.outbox_job_id.stored_form(job) {
        Some(j) => {
            let sql = format!("DELETE FROM task_outbox WHERE job_id = $1::{}", schema.outbox_job_id);
            tx.execute_typed(&sql, &[(&j, Type::TEXT)]).await?
        }
        None => 0,
    };
    tx.commit().await?;
    Ok(Cancelled {
        already,
        outbox_rows_deleted: deleted,
    })
}
