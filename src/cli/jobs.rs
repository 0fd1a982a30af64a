//! `outbox-relay cancel-job` and `outbox-relay status`.
//!
//! `cancel-job` cancels in Postgres first (one transaction: status,
//! `completed_at`, the job's outbox rows), then sets the job's cancel fence
//! and removes its schedule key and running-counter field from Redis; see
//! [`crate::db::jobs::cancel`] for why no sweep, concurrent or stalled, can
//! leave a schedule entry behind.
//! `status` reads the backlog from Postgres and the deepest schedules from
//! Redis; it prints what it could read even when one side is down.

use serde::Serialize;

use crate::config::Config;
use crate::db::jobs::CancelError;
use crate::db::{self, column, dead_letter, pause, pg_error_text, DbSetupError};
use crate::deadline::STARTUP_TIMEOUT;
use crate::redis::keys::{keys_matching, per_key};
use crate::redis::{DirectConn, RedisSetupError};

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Setup(#[from] DbSetupError),
    #[error(transparent)]
    Cancel(#[from] CancelError),
    #[error(transparent)]
    CancelEverywhere(#[from] crate::cancel::CancelJobError),
    #[error("status: {0}")]
    Status(String),
    #[error("{0}")]
    Pause(String),
    #[error("status is incomplete: {0}")]
    Partial(String),
}

/// `outbox-relay cancel-job`.
pub async fn cancel_job(cfg: &Config, job: String, json: bool) -> Result<(), JobsError> {
    let out = crate::cancel::cancel_everywhere(&cfg.database.url, &cfg.redis, job).await?;
    let (job, key, removed) = (&out.job_id, &out.schedule_key, out.schedule_entries_removed);
    if json {
        println!("{}", to_json(&out));
    } else if out.already_cancelled {
        println!(
            "job {job} was already cancelled; {} late outbox rows deleted, schedule key {key} {}",
            out.outbox_rows_deleted,
            if removed { "removed" } else { "absent" }
        );
    } else {
        println!(
            "job {job} cancelled: {} outbox rows deleted, schedule key {key} {}",
            out.outbox_rows_deleted,
            if removed { "removed" } else { "was empty" }
        );
    }
    Ok(())
}

#[derive(Debug, Serialize, Default)]
pub struct Status {
    /// Rows due now.
    pub backlog: i64,
    /// Age of the oldest due row by `created_at`; None when nothing is due.
    pub oldest_due_age_seconds: Option<f64>,
    /// Rows scheduled for later (retries with backoff, delayed tasks).
    pub future_rows: i64,
    /// Rows set aside (`run_at = infinity`): bound for the dead table, whose
    /// id columns cannot hold them (a TEXT task id that is not a UUID).
    pub set_aside_rows: i64,
    pub dead_letters: i64,
    /// Pauses in force (`outbox-relay pause`): scope `*` is everything.
    pub paused: Vec<crate::db::pause::Pause>,
    /// The ten deepest schedule sets; None when Redis could not be read.
    pub schedules: Option<Vec<Schedule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_error: Option<String>,
    /// This configuration's listener checked end to end as `run` checks it:
    /// `active`, `deaf` (new rows wait for the next poll), `off` or `failed`.
    pub listen: String,
    /// The check's one line (what it found, and the fix when deaf).
    pub listen_detail: String,
    /// The delivery journal (`journal.keep`): None when migration 8 is not
    /// applied.
    pub journal: Option<crate::db::journal::Size>,
    /// This configuration's `journal.keep` (`0s`: off).
    pub journal_keep: String,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Schedule {
    pub job_id: String,
    pub key: String,
    pub depth: i64,
}

/// The `top` deepest `{prefix}sched:*` sorted sets (SCAN on every master,
/// then ZCARD).
pub async fn deepest_schedules(
    conn: &mut DirectConn,
    prefix: &str,
    top: usize,
) -> Result<Vec<Schedule>, ::redis::RedisError> {
    let pattern = format!("{prefix}sched:*");
    let keys = keys_matching(conn, &pattern).await?;
    let mut all: Vec<Schedule> = Vec::new();
    for chunk in keys.chunks(1000) {
        let depths = per_key::<::redis::Value>(conn, "ZCARD", chunk).await;
        for (k, d) in chunk.iter().zip(depths) {
            match d {
                Ok(::redis::Value::Int(depth)) => {
                    let job_id = k[pattern.len() - 1..].to_string();
                    all.push(Schedule {
                        job_id,
                        key: k.clone(),
                        depth,
                    });
                }
                // A key of another type (WRONGTYPE) is not a schedule: skip it.
                Ok(_) => {}
                Err(e) if e.code() == Some("WRONGTYPE") => {}
                Err(e) => return Err(e),
            }
        }
    }
    all.sort_by(|a, b| b.depth.cmp(&a.depth).then_with(|| a.key.cmp(&b.key)));
    all.truncate(top);
    Ok(all)
}

/// How long `status` waits for each store's answers.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Print the relay's view of the backlog.
pub async fn status(cfg: &Config, json: bool) -> Result<(), JobsError> {
    let (client, _) = db::connect_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    // Bounded like every probe: a frozen server makes `status` fail with
    // one line, not hang an operator's terminal.
    let stalled = || JobsError::Status(format!("Postgres did not answer within {}s", STATUS_TIMEOUT.as_secs()));
    let read = async {
        let row = client
            .query_typed_one(
                "SELECT count(*) FILTER (WHERE run_at <= now()),
                    count(*) FILTER (WHERE run_at > now() AND run_at <> 'infinity'),
                    extract(epoch FROM now() - min(created_at) FILTER (WHERE run_at <= now() AND isfinite(created_at)))::float8,
                    count(*) FILTER (WHERE run_at = 'infinity')
               FROM task_outbox",
                &[],
            )
            .await
            .map_err(|e| JobsError::Status(pg_error_text(&e)))?;
        let st = Status {
            backlog: column(&row, "task_outbox", 0).map_err(|e| JobsError::Status(e.to_string()))?,
            future_rows: column(&row, "task_outbox", 1).map_err(|e| JobsError::Status(e.to_string()))?,
            oldest_due_age_seconds: column(&row, "task_outbox", 2).map_err(|e| JobsError::Status(e.to_string()))?,
            set_aside_rows: column(&row, "task_outbox", 3).map_err(|e| JobsError::Status(e.to_string()))?,
            dead_letters: dead_letter::count(&client)
                .await
                .map_err(|e| JobsError::Status(e.to_string()))?,
            paused: pause::list(&client).await.map_err(|e| JobsError::Status(e.text()))?,
            journal: if db::journal::exists(&client)
                .await
                .map_err(|e| JobsError::Status(e.text()))?
            {
                Some(
                    db::journal::size(&client)
                        .await
                        .map_err(|e| JobsError::Status(e.text()))?,
                )
            } else {
                None
            },
            journal_keep: if cfg.journal.on() {
                crate::config::format_duration(cfg.journal.keep.0)
            } else {
                "0s".into()
            },
            ..Status::default()
        };
        Ok::<_, JobsError>(st)
    };
    let mut st = tokio::time::timeout(STATUS_TIMEOUT, read)
        .await
        .map_err(|_| stalled())??;
    let hearing = crate::db::listen::check(crate::db::listen::ListenTarget::new(
        cfg.database.listen_target(),
        &cfg.database.url,
    ))
    .await;
    st.listen = hearing.word().to_string();
    st.listen_detail = hearing.describe();
    let redis: Result<Vec<Schedule>, String> = async {
        let mut conn = crate::redis::connect_config(&cfg.redis, STARTUP_TIMEOUT)
            .await
            .map_err(|e: RedisSetupError| e.to_string())?;
        tokio::time::timeout(STATUS_TIMEOUT, deepest_schedules(&mut conn, &cfg.redis.key_prefix, 10))
            .await
            .map_err(|_| format!("Redis did not answer within {}s", STATUS_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())
    }
    .await;
    match redis {
        Ok(s) => st.schedules = Some(s),
        Err(e) => st.redis_error = Some(e),
    }
    if json {
        println!("{}", to_json(&st));
    } else {
        print_status(&st, &cfg.redis.key_prefix);
    }
    match st.redis_error {
        Some(e) => Err(JobsError::Partial(format!("redis: {e}"))),
        None => Ok(()),
    }
}

fn print_status(st: &Status, prefix: &str) {
    println!("backlog (due now):      {} rows", st.backlog);
    match st.oldest_due_age_seconds {
        Some(age) => println!("oldest due row:         {age:.1}s old (by created_at)"),
        None => println!("oldest due row:         -"),
    }
    println!("future-dated rows:      {}", st.future_rows);
    if st.set_aside_rows > 0 {
        println!(
            "set aside:              {} rows (cannot be dead-lettered: ids the dead table cannot hold; run_at = infinity, see docs/operations.md, Runbooks)",
            st.set_aside_rows
        );
    } else {
        println!("set aside:              0");
    }
    println!("dead letters:           {}", st.dead_letters);
    match &st.journal {
        None => println!("delivery journal:       none (migration 8 not applied)"),
        Some(j) => println!(
            "delivery journal:       {} entries, {:.1} MiB, oldest {} (journal.keep = {}{})",
            j.entries,
            j.bytes as f64 / 1_048_576.0,
            j.oldest_secs
                .map_or_else(|| "-".to_string(), |s| format!("{s:.0}s old")),
            st.journal_keep,
            if st.journal_keep == "0s" { ": off" } else { "" }
        ),
    }
    println!("listen (new rows wake): {}", st.listen_detail);
    if st.paused.is_empty() {
        println!("paused:                 no");
    }
    for p in &st.paused {
        let what = if p.scope == pause::ALL {
            "everything (no relay claims any row)".to_string()
        } else {
            format!("job {}", p.scope)
        };
        println!(
            "paused:                 {what} since {} by {}{}",
            p.paused_at,
            p.paused_by,
            if p.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", p.reason)
            }
        );
    }
    match &st.schedules {
        Some(s) if s.is_empty() => println!("schedules ({prefix}sched:*): none"),
        Some(s) => {
            println!("deepest schedules ({prefix}sched:*):");
            for sch in s {
                println!("{:>12}  {}", sch.depth, sch.job_id);
            }
        }
        None => println!(
            "schedules:              unavailable ({})",
            st.redis_error.as_deref().unwrap_or("unknown")
        ),
    }
}

#[derive(Serialize)]
struct PauseOutput {
    scope: String,
    paused: bool,
    changed: bool,
}

/// The pause scope for `job` (None: everything), in the form the claim
/// compares (`task_outbox.job_id::text`).
async fn pause_scope(cfg: &Config, job: Option<String>) -> Result<(tokio_postgres::Client, String), JobsError> {
    let (client, schema) = db::connect_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    let scope = match job {
        None => pause::ALL.to_string(),
        Some(j) => {
            let scope = schema.outbox_job_id.stored_form(&j).ok_or_else(|| {
                JobsError::Pause(format!(
                    "job id {j:?} cannot name a job: task_outbox.job_id is a {} column",
                    schema.outbox_job_id
                ))
            })?;
            // `*` names every job in the pause table: a job called `*`
            // (a TEXT id) cannot be paused alone without pausing all.
            if scope == pause::ALL {
                return Err(JobsError::Pause(format!(
                    "job id {j:?} is the pause table's name for every job; pause or resume everything without --job"
                )));
            }
            scope
        }
    };
    Ok((client, scope))
}

fn describe(scope: &str) -> String {
    if scope == pause::ALL {
        "every relay on this database".to_string()
    } else {
        format!("job {scope}")
    }
}

/// `outbox-relay pause [--job ID]`.
pub async fn pause(cfg: &Config, job: Option<String>, reason: &str, json: bool) -> Result<(), JobsError> {
    let (client, scope) = pause_scope(cfg, job).await?;
    let changed = pause::pause(&client, &scope, reason)
        .await
        .map_err(|e| JobsError::Pause(format!("pause failed: {}", e.text())))?;
    if json {
        println!(
            "{}",
            to_json(&PauseOutput {
                scope,
                paused: true,
                changed
            })
        );
    } else if changed {
        println!(
            "paused {}: no row is claimed from each relay's next tick; ticks in flight finish; resume with `outbox-relay resume{}`",
            describe(&scope),
            if scope == pause::ALL { String::new() } else { format!(" --job {scope}") }
        );
    } else {
        println!("{} was already paused", describe(&scope));
    }
    Ok(())
}

/// `outbox-relay resume [--job ID]`.
pub async fn resume(cfg: &Config, job: Option<String>, json: bool) -> Result<(), JobsError> {
    let (client, scope) = pause_scope(cfg, job).await?;
    let changed = pause::resume(&client, &scope)
        .await
        .map_err(|e| JobsError::Pause(format!("resume failed: {}", e.text())))?;
    if json {
        println!(
            "{}",
            to_json(&PauseOutput {
                scope,
                paused: false,
                changed
            })
        );
    } else if changed {
        println!(
            "resumed {}: rows are claimed again from each relay's next tick",
            describe(&scope)
        );
    } else {
        println!("{} was not paused", describe(&scope));
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"cannot render JSON: {e}\"}}"))
}
