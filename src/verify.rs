//! The outbox invariant, checked over a ledger of produced tasks.
//!
//! Every committed outbox row must end either as a member of its job's
//! schedule set (with the exact member encoding and a score no earlier than
//! its `run_at`) or as a row of `task_outbox_dead`. [`verify`] takes the
//! produced rows (a *ledger*: a table with the outbox's columns that the
//! producer filled in the same transaction as the outbox) and reports, for
//! each, where it ended up: delivered, dead-lettered, still pending, lost,
//! or corrupted (its job's set holds a different member for the task).
//! Used by the fault tests and by `outbox-relay verify`.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::db::{column, pg_error_text, ColumnError};
use crate::domain::{encode_member, schedule_key, OutboxRow};

/// Where the produced rows ended up. The invariant holds when `lost`,
/// `corrupted` and `wrong_score` are empty and, after a drain, `pending_due` is 0.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    pub produced: usize,
    pub delivered: usize,
    pub dead_lettered: usize,
    /// Still in `task_outbox` and due: the drain is not finished.
    pub pending_due: usize,
    /// Still in `task_outbox`, scheduled for later (retry backoff, delayed).
    pub pending_future: usize,
    /// Task ids found nowhere.
    pub lost: Vec<String>,
    /// (task id, member found) where the member differs from the encoding.
    pub corrupted: Vec<(String, String)>,
    /// Task ids delivered with a score earlier than their `run_at`.
    pub wrong_score: Vec<String>,
}

impl VerifyReport {
    pub fn holds(&self) -> bool {
        self.lost.is_empty() && self.corrupted.is_empty() && self.wrong_score.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("ledger table name {0:?} is not a plain identifier")]
    BadLedger(String),
    #[error("postgres: {0}")]
    Postgres(String),
    /// A ledger column is NULL or of another type than the outbox's.
    #[error("ledger {ledger}, column {}: {}", .error.column, .error.reason)]
    Column { ledger: String, error: ColumnError },
    #[error("redis: {0}")]
    Redis(String),
}

fn pg(e: tokio_postgres::Error) -> VerifyError {
    VerifyError::Postgres(pg_error_text(&e))
}

/// A table name that can be put into SQL as is (`schema.table` allowed).
pub fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').count() <= 2
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !part.starts_with(|c: char| c.is_ascii_digit())
        })
}

/// Which ledger rows to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Rows created within this many milliseconds.
    Ago(i64),
    /// Rows created at or after this timestamp (any form Postgres accepts).
    At(String),
}

/// Read the produced rows from `ledger`, optionally only recent ones.
pub async fn ledger_rows(client: &Client, ledger: &str, since: Option<&Since>) -> Result<Vec<OutboxRow>, VerifyError> {
    if !valid_identifier(ledger) {
        return Err(VerifyError::BadLedger(ledger.to_string()));
    }
    let sql = format!(
        "SELECT task_id::text, job_id::text, page_id, host, path, priority, retry_count, source_type,
                source_url, task_type, lighthouse_run_id, floor(extract(epoch FROM run_at) * 1000)::int8
           FROM {ledger}
          WHERE ($1::int8 IS NULL OR created_at >= now() - $1 * interval '1 millisecond')
            AND ($2::text IS NULL OR created_at >= $2::timestamptz)"
    );
    let (ago, at) = match since {
        Some(Since::Ago(ms)) => (Some(*ms), None),
        Some(Since::At(ts)) => (None, Some(ts.clone())),
        None => (None, None),
    };
    let rows = client
        .query_typed(&sql, &[(&ago, Type::INT8), (&at, Type::TEXT)])
        .await
        .map_err(pg)?;
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: 0,
                task_id: column(r, "ledger", 0)?,
                job_id: column(r, "ledger", 1)?,
                page_id: column(r, "ledger", 2)?,
                host: column(r, "ledger", 3)?,
                path: column(r, "ledger", 4)?,
                priority: column(r, "ledger", 5)?,
                retry_count: column(r, "ledger", 6)?,
                source_type: column(r, "ledger", 7)?,
                source_url: column(r, "ledger", 8)?,
                task_type: column(r, "ledger", 9)?,
                lighthouse_run_id: column(r, "ledger", 10)?,
                attempts: 0,
                run_at_ms: column(r, "ledger", 11)?,
                age_at_claim_ms: (0, 0),
            })
        })
        .collect::<Result<_, ColumnError>>()
        .map_err(|error| VerifyError::Column {
            ledger: ledger.to_string(),
            error,
        })
}

/// Check the invariant for `produced` against Postgres and Redis.
pub async fn verify<C: ::redis::aio::ConnectionLike + Send>(
    client: &Client,
    redis: &mut C,
    prefix: &str,
    produced: &[OutboxRow],
) -> Result<VerifyReport, VerifyError> {
    let dead: HashSet<String> = client
        .query_typed("SELECT task_id::text FROM task_outbox_dead", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| column(r, "task_outbox_dead", 0))
        .collect::<Result<_, ColumnError>>()
        .map_err(|e| VerifyError::Postgres(e.to_string()))?;
    let pending: HashMap<String, bool> = client
        .query_typed("SELECT task_id::text, run_at <= now() FROM task_outbox", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| Ok((column(r, "task_outbox", 0)?, column(r, "task_outbox", 1)?)))
        .collect::<Result<_, ColumnError>>()
        .map_err(|e| VerifyError::Postgres(e.to_string()))?;

    // Every member of every job's set, grouped by the task id it starts with.
    let jobs: HashSet<&str> = produced.iter().map(|r| r.job_id.as_str()).collect();
    let mut members: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for job in jobs {
        let key = schedule_key(prefix, job);
        let kind: String = ::redis::cmd("TYPE")
            .arg(&key)
            .query_async(redis)
            .await
            .map_err(|e| VerifyError::Redis(e.to_string()))?;
        if kind != "zset" {
            continue;
        }
        let pairs: Vec<(String, f64)> = ::redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(redis)
            .await
            .map_err(|e| VerifyError::Redis(e.to_string()))?;
        for (member, score) in pairs {
            let task = member.split('|').next().unwrap_or_default().to_string();
            members.entry(task).or_default().push((member, score));
        }
    }

    let mut report = VerifyReport {
        produced: produced.len(),
        ..VerifyReport::default()
    };
    for row in produced {
        let found = members.get(&row.task_id);
        let expected = encode_member(row).ok();
        let mut delivered = false;
        for (member, score) in found.into_iter().flatten() {
            if Some(member) == expected.as_ref() {
                delivered = true;
                if (*score as i64) < row.run_at_ms {
                    report.wrong_score.push(row.task_id.clone());
                }
            } else {
                report.corrupted.push((row.task_id.clone(), member.clone()));
            }
        }
        if delivered {
            report.delivered += 1;
        } else if dead.contains(&row.task_id) {
            report.dead_lettered += 1;
        } else {
            match pending.get(&row.task_id) {
                Some(true) => report.pending_due += 1,
                Some(false) => report.pending_future += 1,
                None => report.lost.push(row.task_id.clone()),
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_names_are_plain_identifiers() {
        assert!(valid_identifier("produced"));
        assert!(valid_identifier("audit.produced_2026"));
        assert!(!valid_identifier("produced; DROP TABLE x"));
        assert!(!valid_identifier("a.b.c"));
        assert!(!valid_identifier("9lives"));
        assert!(!valid_identifier(""));
    }
}
