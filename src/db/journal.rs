//! Queries on the delivery journal (`outbox_relay_journal`, migration 8):
//! what a tick records of its deliveries, retention by whole partitions,
//! and what the loss watch and `reconcile` read back.
//!
//! Every row lands in slot `floor(epoch / width) % 16` of the database's
//! clock ([`crate::domain::journal`]); retention TRUNCATEs the two slots
//! ahead of the one being written, each under its own lock and a short
//! `lock_timeout`, so it never waits long behind a reader, never empties
//! the slot being written, and never leaves dead rows behind.

use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Transaction};

use super::error::{column, QueryError};
use super::schema::IdType;
use crate::domain::journal::{is_ahead, slots_ahead};
use crate::domain::{NodeMark, OutboxRow, ScheduleEntry, Window};

/// The slot a statement run now writes to, in SQL, for a slice `$1`
/// seconds wide.
const SLOT_SQL: &str = "(floor(extract(epoch FROM statement_timestamp()) / $1::int8)::int8 % 16)::int2";

/// Record the delivered `rows` (each with the entry written for it) in
/// the tick's transaction, acknowledged by `node`: one journal row for the
/// batch, the entries in its arrays.
pub async fn record(
    tx: &Transaction<'_>,
    width_secs: i64,
    delivered: &[(&OutboxRow, &ScheduleEntry)],
    node: Option<&NodeMark>,
) -> Result<u64, tokio_postgres::Error> {
    if delivered.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = delivered.iter().map(|(r, _)| r.id).collect();
    let first = ids.iter().copied().min().unwrap_or_default();
    let tasks: Vec<&str> = delivered.iter().map(|(r, _)| r.task_id.as_str()).collect();
    let jobs: Vec<&str> = delivered.iter().map(|(r, _)| r.job_id.as_str()).collect();
    let keys: Vec<&str> = delivered.iter().map(|(_, e)| e.key.as_str()).collect();
    let scores: Vec<i64> = delivered.iter().map(|(_, e)| e.score).collect();
    let members: Vec<&str> = delivered.iter().map(|(_, e)| e.member.as_str()).collect();
    let blank = NodeMark::default();
    let node = node.unwrap_or(&blank);
    tx.execute_typed(
        &format!(
            "INSERT INTO outbox_relay_journal
                    (slot, delivered_at, first_id, outbox_ids, task_ids, job_ids, schedule_keys, scores, members,
                     node_run_id, node_replid, node_offset)
             VALUES ({SLOT_SQL}, statement_timestamp(), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ),
        &[
            (&width_secs, Type::INT8),
            (&first, Type::INT8),
            (&ids, Type::INT8_ARRAY),
            (&tasks, Type::TEXT_ARRAY),
            (&jobs, Type::TEXT_ARRAY),
            (&keys, Type::TEXT_ARRAY),
            (&scores, Type::INT8_ARRAY),
            (&members, Type::TEXT_ARRAY),
            (&node.run_id, Type::TEXT),
            (&node.replid, Type::TEXT),
            (&node.offset, Type::INT8),
        ],
    )
    .await
}

/// Whether the journal's table is there (migration 8 applied).
pub async fn exists(client: &impl GenericClient) -> Result<bool, QueryError> {
    let row = client
        .query_typed_one("SELECT to_regclass('outbox_relay_journal') IS NOT NULL", &[])
        .await?;
    Ok(column(&row, "outbox_relay_journal", 0)?)
}

/// Empty the two slots ahead of the one written now (the next slice's
/// and the one after), those that hold anything: the slots emptied.
///
/// Each in a transaction of its own that first takes the partition's lock
/// (`lock_timeout` 1 s: an error then, tried again next round), then reads
/// the clock: a relay stopped between reading the clock and emptying a
/// slot (SIGSTOP) can never empty the slot being written, because it
/// checks which slot is ahead only once no one else can write to it.
pub async fn empty_ahead(client: &mut Client, width_secs: i64) -> Result<Vec<u64>, QueryError> {
    let mut emptied = Vec::new();
    let first = client
        .query_typed_one(
            "SELECT floor(extract(epoch FROM clock_timestamp()) / $1::int8)::int8",
            &[(&width_secs, Type::INT8)],
        )
        .await?;
    let slice: i64 = column(&first, "outbox_relay_journal", 0)?;
    // Each slot on its own: a lock wait on the first does not keep the
    // second from being emptied; the first error is returned after both.
    let mut failed = None;
    for slot in slots_ahead(slice.max(0) as u64) {
        match empty_slot(client, width_secs, slot).await {
            Ok(true) => emptied.push(slot),
            Ok(false) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(emptied)
}

/// Empty `slot` if it holds anything and is still ahead of the slice
/// written now, read under its lock. Whether it was emptied.
async fn empty_slot(client: &mut Client, width_secs: i64, slot: u64) -> Result<bool, QueryError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '1s'; LOCK TABLE outbox_relay_journal_{slot} IN ACCESS EXCLUSIVE MODE"
    ))
    .await?;
    let row = tx
        .query_typed_one(
            "SELECT floor(extract(epoch FROM clock_timestamp()) / $1::int8)::int8,
                    EXISTS (SELECT 1 FROM outbox_relay_journal WHERE slot = $2::int2)",
            &[(&width_secs, Type::INT8), (&(slot as i16), Type::INT2)],
        )
        .await?;
    let now: i64 = column(&row, "outbox_relay_journal", 0)?;
    let holds: bool = column(&row, "outbox_relay_journal", 1)?;
    // Still ahead of the slice written now (not it, not one it keeps)?
    let empty = holds && is_ahead(slot, now.max(0) as u64);
    if empty {
        tx.batch_execute(&format!("TRUNCATE outbox_relay_journal_{slot}"))
            .await?;
    }
    tx.commit().await?;
    Ok(empty)
}

/// The journal's size: entries kept, bytes on disk, and the oldest
/// kept entry's age in seconds (for `status`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Size {
    pub entries: i64,
    pub bytes: i64,
    pub oldest_secs: Option<f64>,
}

/// [`Size`] (it reads every batch row's array length: a few thousand rows).
pub async fn size(client: &impl GenericClient) -> Result<Size, QueryError> {
    let row = client
        .query_typed_one(
            "SELECT coalesce(sum(cardinality(outbox_ids)), 0)::int8,
                    (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8
                       FROM pg_inherits WHERE inhparent = 'outbox_relay_journal'::regclass),
                    extract(epoch FROM now() - min(delivered_at))::float8
               FROM outbox_relay_journal",
            &[],
        )
        .await?;
    Ok(Size {
        entries: column(&row, "outbox_relay_journal", 0)?,
        bytes: column(&row, "outbox_relay_journal", 1)?,
        oldest_secs: column(&row, "outbox_relay_journal", 2)?,
    })
}

/// One journaled delivery, as reconcile reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Journaled {
    pub outbox_id: i64,
    pub task_id: String,
    pub job_id: String,
    pub entry: ScheduleEntry,
}

/// Which journaled deliveries reconcile looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub window: Window,
    /// Only entries younger than this (`journal.keep`, or `--since`).
    pub keep_secs: i64,
    /// Only this job's entries (`--job`).
    pub job: Option<String>,
    /// Only entries under this key prefix (`redis.key_prefix`).
    pub key_prefix: String,
    /// Only entries journaled at least this long ago (seconds): the time
    /// since the loss was noticed, so what the node acknowledged after it
    /// is not written again; 0 for everything up to now.
    pub until_secs_ago: i64,
    /// The database's clock (unix seconds) both ends are counted back
    /// from, fixed once per reconcile so its window does not slide while
    /// it pages ([`fix_now`]); `None`: each statement's own time.
    pub at_epoch: Option<f64>,
}

/// The database's clock now, in unix seconds: what a reconcile fixes its
/// window to ([`Selection::at_epoch`]).
pub async fn fix_now(client: &impl GenericClient) -> Result<f64, QueryError> {
    let row = client
        .query_typed_one("SELECT extract(epoch FROM statement_timestamp())::float8", &[])
        .await?;
    Ok(column(&row, "outbox_relay_journal", 0)?)
}

impl Selection {
    /// `(replid, offset, by_offset, from_secs_ago)` of the window: how far
    /// back entries are taken, counted from now.
    fn bounds(&self) -> (&str, i64, bool, i64) {
        let until = self.until_secs_ago.max(0);
        match &self.window {
            Window::All => ("", 0, false, self.keep_secs),
            Window::After { replid, offset } => (replid.as_str(), *offset, true, self.keep_secs),
            Window::Recent { secs } => ("", 0, false, (*secs as i64 + until).min(self.keep_secs)),
        }
    }
}

/// The selection's filter on journal rows, `$2`… `$7` and `$9` as in
/// [`page`]: the window's ends counted back from `$9` (unix seconds, the
/// database's clock when the selection was fixed), or from now.
const SELECTED: &str = "delivered_at >= coalesce(to_timestamp($9::float8), statement_timestamp()) - $2::int8 * interval '1 second'
                AND delivered_at <= coalesce(to_timestamp($9::float8), statement_timestamp()) - $7::int8 * interval '1 second'
                AND (NOT $3::bool OR (node_replid = $4 AND node_offset >= $5) OR node_replid = '')
                AND ($6::text = '' OR $6 = ANY(job_ids))";

/// A page of the journal: the entries of up to `limit` batches whose
/// first outbox id is above `after` (in that order, the index of migration
/// 8), and the last batch's first id (where the next page starts).
#[derive(Debug, Default)]
pub struct Page {
    pub entries: Vec<Journaled>,
    pub last: Option<i64>,
}

/// The next [`Page`] of `sel`.
pub async fn page(client: &impl GenericClient, sel: &Selection, after: i64, limit: i64) -> Result<Page, QueryError> {
    let (replid, offset, by_offset, recent) = sel.bounds();
    let rows = client
        .query_typed(
            &format!(
                "SELECT first_id, outbox_ids, task_ids, job_ids, schedule_keys, scores, members
                   FROM outbox_relay_journal
                  WHERE first_id > $1 AND {SELECTED}
                  ORDER BY first_id
                  LIMIT $8"
            ),
            &[
                (&after, Type::INT8),
                (&recent, Type::INT8),
                (&by_offset, Type::BOOL),
                (&replid, Type::TEXT),
                (&offset, Type::INT8),
                (&sel.job.as_deref().unwrap_or(""), Type::TEXT),
                (&sel.until_secs_ago.max(0), Type::INT8),
                (&limit, Type::INT8),
                (&sel.at_epoch, Type::FLOAT8),
            ],
        )
        .await?;
    let mut page = Page::default();
    for r in &rows {
        let t = "outbox_relay_journal";
        page.last = Some(column(r, t, 0)?);
        let ids: Vec<i64> = column(r, t, 1)?;
        let tasks: Vec<String> = column(r, t, 2)?;
        let jobs: Vec<String> = column(r, t, 3)?;
        let keys: Vec<String> = column(r, t, 4)?;
        let scores: Vec<i64> = column(r, t, 5)?;
        let members: Vec<String> = column(r, t, 6)?;
        let n = ids.len();
        if [tasks.len(), jobs.len(), keys.len(), scores.len(), members.len()] != [n; 5] {
            return Err(QueryError::Column(super::error::ColumnError {
                table: t,
                column: "outbox_ids".into(),
                reason: "the batch's arrays differ in length".into(),
            }));
        }
        let entries = ids.into_iter().zip(tasks).zip(jobs).zip(keys).zip(scores).zip(members);
        for (((((outbox_id, task_id), job_id), key), score), member) in entries {
            if sel.job.as_deref().is_some_and(|j| j != job_id) || !key.starts_with(&sel.key_prefix) {
                continue;
            }
            page.entries.push(Journaled {
                outbox_id,
                task_id,
                job_id,
                entry: ScheduleEntry { key, score, member },
            });
        }
    }
    Ok(page)
}

/// Whether `sel` selects any batch at all (the watch skips a failover
/// the promoted replica lost nothing of): one `EXISTS`, no array read.
/// The key prefix is judged by each batch's first key.
pub async fn any(client: &impl GenericClient, sel: &Selection) -> Result<bool, QueryError> {
    let (replid, offset, by_offset, recent) = sel.bounds();
    let row = client
        .query_typed_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM outbox_relay_journal
                                 WHERE $8::int8 = 0 AND {SELECTED}
                                   AND starts_with(schedule_keys[1], $1))"
            ),
            &[
                (&sel.key_prefix, Type::TEXT),
                (&recent, Type::INT8),
                (&by_offset, Type::BOOL),
                (&replid, Type::TEXT),
                (&offset, Type::INT8),
                (&sel.job.as_deref().unwrap_or(""), Type::TEXT),
                (&sel.until_secs_ago.max(0), Type::INT8),
                (&0i64, Type::INT8),
                (&sel.at_epoch, Type::FLOAT8),
            ],
        )
        .await?;
    Ok(column(&row, "outbox_relay_journal", 0)?)
}

/// Which of `jobs` are cancelled (`jobs.status = 'cancelled'`): their
/// entries stay lost. Ids `jobs.id` cannot hold are left out first, so
/// they match nothing.
pub async fn cancelled_jobs(
    client: &impl GenericClient,
    jobs_id: IdType,
    jobs: &[&str],
) -> Result<Vec<String>, QueryError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let forms: Vec<String> = jobs.iter().filter_map(|j| jobs_id.stored_form(j)).collect();
    // Cast to the column's type, so its primary key's index answers.
    let rows = client
        .query_typed(
            &format!("SELECT id::text FROM jobs WHERE id = ANY($1::text[]::{jobs_id}[]) AND status = 'cancelled'"),
            &[(&forms, Type::TEXT_ARRAY)],
        )
        .await?;
    rows.iter().map(|r| Ok(column(r, "jobs", 0)?)).collect()
}

/// `journal.still_pending`, run with `$1` = `tasks`: the task ids (its
/// first column, which must be text: `id::text`) the application still
/// considers waiting.
pub async fn still_pending(client: &impl GenericClient, sql: &str, tasks: &[&str]) -> Result<Vec<String>, QueryError> {
    let rows = client.query_typed(sql, &[(&tasks, Type::TEXT_ARRAY)]).await?;
    rows.iter()
        .map(|r| Ok(column(r, "journal.still_pending", 0)?))
        .collect()
}
