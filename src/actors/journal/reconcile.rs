//! Write lost schedule entries again from the delivery journal: the loss
//! watch runs this when it notices a loss, `outbox-relay reconcile` and
//! the console on demand.
//!
//! Page by page (outbox-id order) through the selected journal entries:
//! ask Redis which members are missing from their schedules, drop those of
//! cancelled jobs (`jobs.status`, so a cancel survives even a `FLUSHALL`
//! that took its fence) and, with `journal.still_pending` set, those the
//! application no longer considers waiting; write the rest through the
//! same fenced write as the ticks (a fence that is there still wins).
//! Entries of a paused job (or of every job, paused as a whole) are held
//! back and counted, for a run after the resume.
//! Idempotent: a member that is there is never written, so running it
//! twice writes nothing the second time. Paced to `journal.reconcile_rate`
//! entries examined per second, so it does not starve the drain.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::db::journal::{self, Journaled, Selection};
use crate::db::schema::IdType;
use crate::deadline::Deadline;
use crate::domain::{EntryOutcome, ScheduleEntry};
use crate::redis::pipeline::{checkout, zadd_batch, DispatchError};
use crate::redis::Redis;

/// Journal batches read at a time.
const BATCHES: i64 = 20;

/// Entries checked and written at a time.
pub const PAGE: usize = 500;

/// How long one page's Redis and Postgres work may take.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to reconcile, and how.
#[derive(Debug, Clone)]
pub struct Plan {
    pub selection: Selection,
    /// `journal.still_pending` (`""`: every missing entry is written).
    pub still_pending: String,
    pub jobs_id: IdType,
    pub wait_replicas: u32,
    /// Entries examined per second at most.
    pub rate: u32,
    /// Count what would be written, write nothing.
    pub dry_run: bool,
}

/// What a reconcile did (`--json` prints it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Journal entries looked at.
    pub examined: u64,
    /// Of those, members still in their schedule.
    pub present: u64,
    /// Members missing from their schedule.
    pub missing: u64,
    /// Missing, but their job is cancelled: left out.
    pub cancelled: u64,
    /// Missing, but `journal.still_pending` did not return them: left out.
    pub not_pending: u64,
    /// Missing, but their job (or everything) is paused (`outbox-relay
    /// pause`): not written; a run after the resume writes them.
    pub paused: u64,
    /// Written again (with `--dry-run`: would be).
    pub written: u64,
    /// Redis refused to write them (a fence, OOM, READONLY, …): not written.
    pub refused: u64,
    /// What Redis said of the first entry it refused (`NOPERM …`, `OOM …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    pub seconds: f64,
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply Redis sends as `wire` (e.g. `-NOPERM …`).
    fn reply(wire: &str) -> ::redis::Value {
        ::redis::parse_redis_value(format!("{wire}\r\n").as_bytes()).unwrap_or(::redis::Value::Okay)
    }

    #[test]
    fn only_nil_is_missing_and_a_refusal_is_no_answer() {
        assert!(!membership(&::redis::Value::Nil).unwrap());
        assert!(membership(&reply(",1.5")).unwrap());
        assert!(membership(&reply("$2\r\n17")).unwrap());
        let wrong = reply("-WRONGTYPE Operation against a key holding the wrong kind of value");
        assert!(membership(&wrong).unwrap(), "writing again could not fix it");
        for refusal in [
            "-NOPERM User x has no permissions to run the 'zscore' command",
            "-LOADING Redis is loading",
            "-ERR proxy says no",
        ] {
            assert!(membership(&reply(refusal)).is_err(), "{refusal}");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("journal.still_pending failed: {0}")]
    StillPending(String),
    #[error("redis: {0}")]
    Redis(String),
    /// A statement did not answer within a page's time (a hung Postgres):
    /// the connection may still be running it and must not be reused.
    #[error("postgres did not answer {0} within 30s")]
    Stalled(&'static str),
}

/// A Postgres step of a page, bounded by [`PAGE_TIMEOUT`].
async fn pg_step<T>(
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, crate::db::QueryError>>,
    wrap: fn(String) -> ReconcileError,
) -> Result<T, ReconcileError> {
    match tokio::time::timeout(PAGE_TIMEOUT, step).await {
        Ok(r) => r.map_err(|e| wrap(e.text())),
        Err(_) => Err(ReconcileError::Stalled(what)),
    }
}

impl From<DispatchError> for ReconcileError {
    fn from(e: DispatchError) -> Self {
        ReconcileError::Redis(e.to_string())
    }
}

/// Run `plan` to the end; `progress` hears the running totals after each
/// page.
pub async fn reconcile(
    pg: &Client,
    redis: &Redis,
    plan: &Plan,
    mut progress: impl FnMut(&Report),
) -> Result<Report, ReconcileError> {
    let started = Instant::now();
    let mut report = Report {
        dry_run: plan.dry_run,
        ..Report::default()
    };
    // The window is fixed now: a reconcile that pages for minutes does not
    // take in what was journaled meanwhile.
    let mut selection = plan.selection.clone();
    if selection.at_epoch.is_none() {
        selection.at_epoch = Some(pg_step("reading the clock", journal::fix_now(pg), ReconcileError::Postgres).await?);
    }
    let mut after = i64::MIN;
    loop {
        let page = pg_step(
            "reading the journal",
            journal::page(pg, &selection, after, BATCHES),
            ReconcileError::Postgres,
        )
        .await?;
        let Some(last) = page.last else { break };
        after = last;
        let mut entries = page.entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<Journaled> = entries.by_ref().take(PAGE).collect();
            one_page(pg, redis, plan, chunk, &mut report).await?;
            report.seconds = started.elapsed().as_secs_f64();
            progress(&report);
            // Paced: never ahead of `rate` entries a second.
            let due = Duration::from_secs_f64(report.examined as f64 / f64::from(plan.rate.max(1)));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One page: which are missing, which of those may be written, the write.
async fn one_page(
    pg: &Client,
    redis: &Redis,
    plan: &Plan,
    page: Vec<Journaled>,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let deadline = Deadline::after(PAGE_TIMEOUT);
    report.examined += page.len() as u64;
    let there = present(redis, &page, deadline).await?;
    let mut missing: Vec<Journaled> = page
        .into_iter()
        .zip(&there)
        .filter(|(_, t)| !**t)
        .map(|(j, _)| j)
        .collect();
    report.present += (there.len() - missing.len()) as u64;
    report.missing += missing.len() as u64;
    if missing.is_empty() {
        return Ok(());
    }
    let jobs: HashSet<&str> = missing.iter().map(|j| j.job_id.as_str()).collect();
    let jobs: Vec<&str> = jobs.into_iter().collect();
    let cancelled: HashSet<String> = pg_step(
        "reading cancelled jobs",
        journal::cancelled_jobs(pg, plan.jobs_id, &jobs),
        ReconcileError::Postgres,
    )
    .await?
    .into_iter()
    .collect();
    let before = missing.len();
    missing.retain(|j| {
        plan.jobs_id
            .stored_form(&j.job_id)
            .is_none_or(|form| !cancelled.contains(&form))
    });
    report.cancelled += (before - missing.len()) as u64;
    // A pause holds these entries back as it holds the rows: an operator
    // who paused during an incident gets no writes until the resume.
    let pauses: HashSet<String> = pg_step("reading pauses", crate::db::pause::list(pg), ReconcileError::Postgres)
        .await?
        .into_iter()
        .map(|p| p.scope)
        .collect();
    let before = missing.len();
    if pauses.contains(crate::db::pause::ALL) {
        missing.clear();
    } else if !pauses.is_empty() {
        missing.retain(|j| !pauses.contains(&j.job_id));
    }
    report.paused += (before - missing.len()) as u64;
    if !plan.still_pending.trim().is_empty() && !missing.is_empty() {
        let tasks: Vec<&str> = missing.iter().map(|j| j.task_id.as_str()).collect();
        let pending: HashSet<String> = pg_step(
            "journal.still_pending",
            journal::still_pending(pg, &plan.still_pending, &tasks),
            ReconcileError::StillPending,
        )
        .await?
        .into_iter()
        .collect();
        let before = missing.len();
        missing.retain(|j| pending.contains(&j.task_id));
        report.not_pending += (before - missing.len()) as u64;
    }
    if missing.is_empty() {
        return Ok(());
    }
    if plan.dry_run {
        report.written += missing.len() as u64;
        return Ok(());
    }
    let entries: Vec<ScheduleEntry> = missing.into_iter().map(|j| j.entry).collect();
    let prefix = &plan.selection.key_prefix;
    let batch = zadd_batch(redis, prefix, &entries, (plan.wait_replicas, false), deadline).await?;
    for o in &batch.outcomes {
        match o {
            EntryOutcome::Delivered => report.written += 1,
            EntryOutcome::Cancelled => report.cancelled += 1,
            EntryOutcome::Rejected(why) | EntryOutcome::Deferred(why) | EntryOutcome::Unknown(why) => {
                report.refused += 1;
                report.refusal.get_or_insert_with(|| why.clone());
            }
        }
    }
    Ok(())
}

/// Whether each entry's member is in its schedule (`ZSCORE`): one
/// pipeline on one server; in a cluster each to its key's node (see
/// [`membership`]).
async fn present(redis: &Redis, page: &[Journaled], deadline: Deadline) -> Result<Vec<bool>, ReconcileError> {
    let mut conn = checkout(redis, deadline).await?;
    conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
    let replies: Vec<::redis::Value> = if let Some(cluster) = conn.cluster() {
        let asks = page.iter().map(|j| {
            let mut c = cluster.clone();
            let cmd = ::redis::cmd("ZSCORE").arg(&j.entry.key).arg(&j.entry.member).to_owned();
            async move { cmd.query_async::<::redis::Value>(&mut c).await }
        });
        let answers = deadline
            .run("redis ZSCORE", futures_util::future::join_all(asks))
            .await
            .map_err(|e| ReconcileError::Redis(e.to_string()))?;
        answers
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| ReconcileError::Redis(e.to_string()))?
    } else {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for j in page {
            pipe.cmd("ZSCORE").arg(&j.entry.key).arg(&j.entry.member);
        }
        deadline
            .run("redis ZSCORE", pipe.query_async(&mut conn))
            .await
            .map_err(|e| ReconcileError::Redis(e.to_string()))?
            .map_err(|e| ReconcileError::Redis(e.to_string()))?
    };
    if replies.len() != page.len() {
        return Err(ReconcileError::Redis(format!(
            "{} replies to {} ZSCOREs",
            replies.len(),
            page.len()
        )));
    }
    replies.iter().map(membership).collect()
}

/// What one `ZSCORE` says: missing (`nil`), there (a score, or a key of
/// another type, which writing again could not fix), or nothing usable
/// (`NOPERM`, `LOADING`, a proxy's error): the reconcile stops rather
/// than take a refusal for "there".
fn membership(reply: &::redis::Value) -> Result<bool, ReconcileError> {
    match reply {
        ::redis::Value::Nil => Ok(false),
        ::redis::Value::ServerError(e) if e.code() == "WRONGTYPE" => Ok(true),
        ::redis::Value::ServerError(e) => Err(ReconcileError::Redis(format!(
            "ZSCORE refused: {} {}",
            e.code(),
            e.details().unwrap_or_default()
        ))),
        _ => Ok(true),
    }
}
