//! `outbox-relay dead-letter list|requeue|purge`: triage of
//! `task_outbox_dead` without hand-written SQL.
//!
//! Every command connects directly with `database.url`, changes nothing on
//! bad input (selectors, durations, unknown ids are refused before any
//! write), and prints either a table for people or `--json` for machines.

use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;

use crate::config::{format_duration, parse_duration, Config};
use crate::db::dead_letter::{self as dl, DeadLetterError, Filter, Selector};
use crate::db::schema::Schema;
use crate::db::{self, DbSetupError};
use crate::deadline::STARTUP_TIMEOUT;

/// Rows deleted per statement by `purge` (short locks, steady progress).
pub const PURGE_BATCH: i64 = 1000;

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, newest first, with a count per distinct error.
    List(ListArgs),
    /// Move dead letters back into task_outbox (attempts 0, due now), atomically.
    Requeue(RequeueArgs),
    /// Delete dead letters older than a duration, in small batches.
    Purge(PurgeArgs),
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this job's dead letters.
    #[arg(long, value_name = "JOB_ID")]
    pub job: Option<String>,
    /// Only dead letters from the last DURATION (90s, 15m, 12h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub since: Option<Duration>,
    /// Only dead letters whose last error contains this text (case-sensitive).
    #[arg(long, value_name = "SUBSTRING")]
    pub error: Option<String>,
    /// Show at most N rows (the summary always covers every match).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub limit: i64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("selector").required(true).args(["ids", "job", "error", "all"])))]
pub struct RequeueArgs {
    /// Dead-letter ids (the `id` column of `list`); repeat or separate with commas.
    #[arg(long = "id", value_name = "ID", num_args = 1.., value_delimiter = ',')]
    pub ids: Vec<i64>,
    /// Every dead letter of this job.
    #[arg(long, value_name = "JOB_ID")]
    pub job: Option<String>,
    /// Every dead letter whose last error contains this text.
    #[arg(long, value_name = "SUBSTRING")]
    pub error: Option<String>,
    /// Every dead letter (requires --yes).
    #[arg(long)]
    pub all: bool,
    /// Say what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm --all.
    #[arg(long)]
    pub yes: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Delete dead letters older than DURATION (90s, 15m, 12h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub older_than: Duration,
    /// Count what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm the deletion (required unless --dry-run).
    #[arg(long)]
    pub yes: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error(transparent)]
    Setup(#[from] DbSetupError),
    #[error(transparent)]
    Query(#[from] DeadLetterError),
    #[error("{0}")]
    Refused(String),
}

/// Run one `dead-letter` subcommand.
pub async fn run(cfg: &Config, cmd: DeadLetterCommand) -> Result<(), TriageError> {
    let (mut client, schema) = db::connect_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    match cmd {
        DeadLetterCommand::List(a) => list(&client, &schema, a).await,
        DeadLetterCommand::Requeue(a) => requeue(&mut client, &schema, a).await,
        DeadLetterCommand::Purge(a) => purge(&client, a).await,
    }
}

#[derive(Serialize)]
struct ListOutput {
    total: i64,
    rows: Vec<dl::DeadRow>,
    by_error: Vec<dl::ErrorCount>,
}

async fn list(client: &tokio_postgres::Client, schema: &Schema, a: ListArgs) -> Result<(), TriageError> {
    let filter = Filter {
        job: a.job,
        since: a.since,
        error: a.error,
    };
    let rows = dl::list(client, schema, &filter, a.limit).await?;
    let by_error = dl::summary(client, schema, &filter).await?;
    let total: i64 = by_error.iter().map(|e| e.count).sum();
    if a.json {
        println!("{}", to_json(&ListOutput { total, rows, by_error }));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no dead letters match");
        return Ok(());
    }
    println!(
        "{:<10} {:<36} {:<36} {:>8}  {:<20}  LAST_ERROR",
        "ID", "TASK", "JOB", "ATTEMPTS", "DEAD_LETTERED_AT"
    );
    for r in &rows {
        println!(
            "{:<10} {:<36} {:<36} {:>8}  {:<20}  {}",
            r.id, r.task_id, r.job_id, r.attempts, r.dead_lettered_at, r.last_error
        );
    }
    println!();
    println!("{total} dead letters match (showing {}); by error:", rows.len());
    for e in &by_error {
        println!("{:>10}  {}", e.count, e.error);
    }
    Ok(())
}

async fn requeue(client: &mut tokio_postgres::Client, schema: &Schema, a: RequeueArgs) -> Result<(), TriageError> {
    let selector = if !a.ids.is_empty() {
        Selector::Ids(a.ids)
    } else if let Some(job) = a.job {
        Selector::Job(job)
    } else if let Some(error) = a.error {
        if error.is_empty() {
            return Err(TriageError::Refused(
                "--error needs some text; use --all --yes to requeue everything".into(),
            ));
        }
        Selector::Error(error)
    } else {
        if !a.yes && !a.dry_run {
            return Err(TriageError::Refused(
                "--all requeues every dead letter; add --yes to confirm (or --dry-run to see how many)".into(),
            ));
        }
        Selector::All
    };
    let report = dl::requeue(client, schema, &selector, a.dry_run).await?;
    let why = if report.lighthouse_run_gone > 0 {
        format!(
            "task already in the outbox, or a lighthouse row whose run is gone ({} of them)",
            report.lighthouse_run_gone
        )
    } else {
        "task already in the outbox".to_string()
    };
    if a.json {
        println!("{}", to_json(&report));
    } else if report.dry_run {
        println!(
            "dry run: {} dead letters match; {} would be requeued, {} skipped ({why}); nothing changed",
            report.matched, report.requeued, report.skipped
        );
    } else {
        println!(
            "requeued {} of {} dead letters; {} skipped ({why}, left in the dead table)",
            report.requeued, report.matched, report.skipped
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct PurgeOutput {
    older_than: String,
    matched: i64,
    deleted: u64,
    dry_run: bool,
}

async fn purge(client: &tokio_postgres::Client, a: PurgeArgs) -> Result<(), TriageError> {
    let older = format_duration(a.older_than);
    let matched = dl::count_older(client, a.older_than).await?;
    if a.dry_run || !a.yes {
        if a.json {
            println!(
                "{}",
                to_json(&PurgeOutput {
                    older_than: older.clone(),
                    matched,
                    deleted: 0,
                    dry_run: true
                })
            );
        } else {
            println!("{matched} dead letters are older than {older}; nothing deleted");
        }
        if !a.dry_run {
            return Err(TriageError::Refused(format!(
                "purge deletes {matched} dead letters for good; add --yes to confirm"
            )));
        }
        return Ok(());
    }
    let cutoff = dl::cutoff_ms(client, a.older_than).await?;
    let mut deleted = 0u64;
    loop {
        let n = dl::purge_batch(client, cutoff, PURGE_BATCH).await?;
        deleted += n;
        if matched > PURGE_BATCH {
            eprintln!("purge: {deleted} of about {matched} deleted");
        }
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    if a.json {
        println!(
            "{}",
            to_json(&PurgeOutput {
                older_than: older,
                matched,
                deleted,
                dry_run: false
            })
        );
    } else {
        println!("deleted {deleted} dead letters older than {older}");
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"cannot render JSON: {e}\"}}"))
}
