//! The console's `reconcile` job action: the job's journaled entries that
//! are missing from its schedule written again (`outbox-relay reconcile
//! --job J`, see `actors::journal::reconcile`), with the console's own
//! Postgres role and Redis user. Audited and detached like every action.

use super::error::ConsoleError;
use super::state::Console;
use crate::actors::journal::reconcile::{reconcile, Plan, ReconcileError};
use crate::db::journal::Selection;
use crate::domain::Window;

/// How far back the action looks: everything the journal holds.
const EVERYTHING_SECS: i64 = 10 * 365 * 24 * 3600;

/// Reconcile job `scope`: the message for the operator and the entries written.
pub(crate) async fn reconcile_job(st: &Console, scope: &str) -> Result<(String, Option<u64>), ConsoleError> {
    let pg = crate::db::connect(&st.pg_url, st.timeout)
        .await
        .map_err(|e| ConsoleError::Postgres(e.to_string()))?;
    let there = crate::db::journal::exists(&pg)
        .await
        .map_err(|e| ConsoleError::Postgres(e.text()))?;
    if !there {
        return Err(ConsoleError::Postgres(
            "there is no delivery journal (table outbox_relay_journal): run `outbox-relay migrate`, and set journal.keep on the relays".into(),
        ));
    }
    let redis = crate::redis::pool(&st.redis_cfg, st.timeout).map_err(|e| ConsoleError::Redis(e.to_string()))?;
    let plan = Plan {
        selection: Selection {
            window: Window::All,
            keep_secs: EVERYTHING_SECS,
            job: Some(scope.to_string()),
            key_prefix: st.redis_cfg.key_prefix.clone(),
            until_secs_ago: 0,
            at_epoch: None,
        },
        still_pending: st.journal.still_pending.clone(),
        jobs_id: st.schema.jobs_id,
        wait_replicas: st.redis_cfg.wait_replicas,
        rate: st.journal.reconcile_rate,
        dry_run: false,
    };
    let r = reconcile(&pg, &redis, &plan, |_| {}).await.map_err(|e| match e {
        ReconcileError::Redis(_) => ConsoleError::Redis(e.to_string()),
        _ => ConsoleError::Postgres(e.to_string()),
    })?;
    let message = format!(
        "job {scope}: {} journaled entries, {} in its schedule, {} missing: {} written again, {} left out (job cancelled), {} held back (job paused: reconcile again after the resume), {} left out (no longer pending), {} refused by Redis",
        r.examined, r.present, r.missing, r.written, r.cancelled, r.paused, r.not_pending, r.refused
    );
    if r.refused > 0 {
        return Err(ConsoleError::Redis(message));
    }
    if r.paused > 0 {
        return Err(ConsoleError::Conflict(message));
    }
    Ok((message, Some(r.written)))
}
