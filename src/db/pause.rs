//! `outbox_relay_pause`: the control table of `pause` and `resume`.
//!
//! A row with scope `*` pauses every relay on the database; a row whose
//! scope is a job id (as `task_outbox.job_id::text` spells it) pauses that
//! job's rows. The sweep's claim skips what is paused (`db::outbox`), so
//! every relay obeys from its next tick with no restart; the metrics probe
//! reads [`counts`] for the gauges, the health lines and `/readyz`.

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use super::error::{column, QueryError};

/// The scope that pauses everything.
pub const ALL: &str = "*";

const TABLE: &str = "outbox_relay_pause";

/// One pause in force.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pause {
    /// `*` (everything) or a job id.
    pub scope: String,
    pub paused_at: String,
    pub paused_by: String,
    pub reason: String,
}

/// Pause `scope`; false when it was paused already (its first pause,
/// time and reason, are kept).
pub async fn pause(client: &impl GenericClient, scope: &str, reason: &str) -> Result<bool, QueryError> {
    Ok(client
        .execute_typed(
            "INSERT INTO outbox_relay_pause (scope, reason) VALUES ($1, $2) ON CONFLICT (scope) DO NOTHING",
            &[(&scope, Type::TEXT), (&reason, Type::TEXT)],
        )
        .await?
        == 1)
}

/// Resume `scope`; false when it was not paused.
pub async fn resume(client: &impl GenericClient, scope: &str) -> Result<bool, QueryError> {
    let lifted = client
        .execute_typed(
            "DELETE FROM outbox_relay_pause WHERE scope = $1",
            &[(&scope, Type::TEXT)],
        )
        .await?
        == 1;
    if lifted {
        // The held rows are due and no insert announces them: wake the
        // listening relays (they would otherwise find them at their next
        // poll, sweep.listen_poll_interval).
        client
            .execute_typed("SELECT pg_notify('outbox_relay', '')", &[])
            .await?;
    }
    Ok(lifted)
}

/// Every pause in force, `*` first, then the oldest.
pub async fn list(client: &impl GenericClient) -> Result<Vec<Pause>, QueryError> {
    client
        .query_typed(
            "SELECT scope, to_char(paused_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), paused_by, reason
               FROM outbox_relay_pause ORDER BY scope <> '*', paused_at, scope",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(Pause {
                scope: column(r, TABLE, 0)?,
                paused_at: column(r, TABLE, 1)?,
                paused_by: column(r, TABLE, 2)?,
                reason: column(r, TABLE, 3)?,
            })
        })
        .collect()
}
