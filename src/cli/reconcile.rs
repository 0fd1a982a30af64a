//! `outbox-relay reconcile`: write schedule entries Redis lost again from
//! the delivery journal (see `actors::journal::reconcile`), on demand: after
//! a `FLUSHALL`, a restore from an old snapshot, a loss the watch could not
//! see (a Redis Cluster, a relay that was down).

use std::time::{Duration, Instant};

use crate::actors::journal::reconcile::{reconcile, Plan, Report};
use crate::config::Config;
use crate::db::journal::Selection;
use crate::db::{self, DbSetupError};
use crate::deadline::STARTUP_TIMEOUT;
use crate::domain::Window;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileCmdError {
    #[error(transparent)]
    Setup(#[from] DbSetupError),
    #[error("{0}")]
    Usage(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("reconcile stopped: {0} (what was written stays written; run it again to go on)")]
    Failed(#[from] crate::actors::journal::reconcile::ReconcileError),
    #[error("{0}")]
    Postgres(String),
    /// Entries of paused jobs were held back (exit 1).
    #[error("{0}")]
    HeldBack(String),
}

/// How far back `reconcile` looks without `--since`: everything the
/// journal holds (retention empties what is older than `journal.keep`).
const EVERYTHING_SECS: i64 = 10 * 365 * 24 * 3600;

/// How often a progress line is printed (to standard error).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `outbox-relay reconcile [--since D] [--job J] [--dry-run] [--json]`.
pub async fn run(
    cfg: &Config,
    since: Option<String>,
    job: Option<String>,
    dry_run: bool,
    json: bool,
) -> Result<(), ReconcileCmdError> {
    let keep_secs = match &since {
        None => EVERYTHING_SECS,
        Some(text) => crate::config::parse_duration(text)
            .map_err(|e| ReconcileCmdError::Usage(format!("--since: {e}")))?
            .as_secs()
            .min(EVERYTHING_SECS as u64) as i64,
    };
    let (client, schema) = db::connect_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    let there = db::journal::exists(&client)
        .await
        .map_err(|e| ReconcileCmdError::Postgres(e.text()))?;
    if !there {
        return Err(ReconcileCmdError::Postgres(
            "there is no delivery journal (table outbox_relay_journal): run `outbox-relay migrate`, and set journal.keep on the relays".into(),
        ));
    }
    // The job as the outbox's job_id column gives it back (a UUID in its
    // canonical form), as the journal holds it.
    let job = match job {
        None => None,
        Some(j) => Some(schema.outbox_job_id.stored_form(&j).ok_or_else(|| {
            ReconcileCmdError::Usage(format!(
                "--job {j:?} cannot name a job (task_outbox.job_id is {})",
                schema.outbox_job_id
            ))
        })?),
    };
    let redis = crate::redis::pool(&cfg.redis, STARTUP_TIMEOUT).map_err(|e| ReconcileCmdError::Redis(e.to_string()))?;
    let plan = Plan {
        selection: Selection {
            window: Window::All,
            keep_secs,
            job,
            key_prefix: cfg.redis.key_prefix.clone(),
            until_secs_ago: 0,
            at_epoch: None,
        },
        still_pending: cfg.journal.still_pending.clone(),
        jobs_id: schema.jobs_id,
        wait_replicas: cfg.redis.wait_replicas,
        rate: cfg.journal.reconcile_rate,
        dry_run,
    };
    let mut last_line = Instant::now();
    let report = reconcile(&client, &redis, &plan, |r: &Report| {
        if last_line.elapsed() >= PROGRESS_EVERY {
            last_line = Instant::now();
            eprintln!(
                "reconcile: {} examined, {} missing, {} {} ({:.0}/s)",
                r.examined,
                r.missing,
                r.written,
                if r.dry_run { "to write" } else { "written" },
                r.examined as f64 / r.seconds.max(0.001)
            );
        }
    })
    .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .unwrap_or_else(|e| format!("{{\"error\":\"cannot render JSON: {e}\"}}"))
        );
    } else {
        println!(
            "{}journal entries examined {}: present in Redis {}, missing {}; of the missing: {} {}, {} of cancelled jobs left out, {} of paused jobs held back, {} no longer pending left out, {} refused by Redis ({:.1}s)",
            if report.dry_run { "dry run: " } else { "" },
            report.examined,
            report.present,
            report.missing,
            report.written,
            if report.dry_run { "would be written" } else { "written again" },
            report.cancelled,
            report.paused,
            report.not_pending,
            report.refused,
            report.seconds
        );
    }
    if report.refused > 0 {
        return Err(ReconcileCmdError::Redis(format!(
            "{} entries were refused by Redis ({}) and are still missing; run reconcile again when Redis accepts writes",
            report.refused,
            report.refusal.as_deref().unwrap_or("no reason given")
        )));
    }
    if report.paused > 0 && !report.dry_run {
        return Err(ReconcileCmdError::HeldBack(format!(
            "{} entries of paused jobs were held back; run reconcile again after `outbox-relay resume`",
            report.paused
        )));
    }
    Ok(())
}
