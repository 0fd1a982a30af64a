//! The dispatch stage of a tick: send the rows' entries through the
//! dispatch actor, turn its answer into each row's outcome, and keep what
//! the delivery journal records ([`Journal`]) and the delivery lags.

use std::time::Instant;

use actix::Recipient;

use super::report::{TickError, TickReport};
use super::settings::SweepSettings;
use crate::actors::dispatch::DispatchBatch;
use crate::deadline::Deadline;
use crate::domain::{encode_rows, RowOutcome};
use crate::redis::pipeline::DispatchError;

/// What the dispatch said of a tick's rows: an outcome per row, and for
/// the journal the entries sent (with their rows) and the node that
/// acknowledged them.
pub(super) struct Sent {
    pub(super) outcomes: Vec<RowOutcome>,
    /// With the journal on: each entry sent and its row's index.
    pub(super) entries: Vec<(usize, crate::domain::ScheduleEntry)>,
    pub(super) node: Option<crate::domain::NodeMark>,
}

/// What the tick records in the delivery journal.
pub(super) struct Journal<'a> {
    pub(super) rows: Vec<(&'a crate::domain::OutboxRow, &'a crate::domain::ScheduleEntry)>,
    pub(super) node: Option<&'a crate::domain::NodeMark>,
}

impl<'a> Journal<'a> {
    /// The delivered rows and the entries written for them.
    pub(super) fn of(
        rows: &'a [crate::domain::OutboxRow],
        entries: &'a [(usize, crate::domain::ScheduleEntry)],
        outcomes: &[RowOutcome],
        node: Option<&'a crate::domain::NodeMark>,
    ) -> Self {
        Journal {
            rows: entries
                .iter()
                .filter(|(i, _)| outcomes[*i] == RowOutcome::Delivered)
                .map(|(i, e)| (&rows[*i], e))
                .collect(),
            node,
        }
    }
}

/// Send the rows' entries to Redis (through the dispatch actor) and turn
/// its answer into each row's outcome. Rows that could not be encoded are
/// `Poison` already; Redis as a whole unavailable or held back leaves every
/// row `Deferred` (noted in the report).
pub(super) async fn dispatch_rows(
    dispatch: &Recipient<DispatchBatch>,
    rows: &[crate::domain::OutboxRow],
    settings: &SweepSettings,
    deadline: Deadline,
    report: &mut TickReport,
) -> Result<Sent, TickError> {
    let (entries, entry_rows, outcomes) = encode_rows(rows, &settings.key_prefix);
    let mut sent = Sent {
        outcomes,
        entries: Vec::new(),
        node: None,
    };
    if entries.is_empty() {
        return Ok(sent);
    }
    let mark = settings.journal_width.is_some();
    if mark {
        sent.entries = entry_rows.iter().copied().zip(entries.iter().cloned()).collect();
    }
    let reply = deadline
        .run(
            "redis dispatch",
            dispatch.send(DispatchBatch {
                entries,
                deadline,
                mark,
            }),
        )
        .await?
        .map_err(|e| TickError::Mailbox(e.to_string()))?;
    match reply {
        Ok(answer) => {
            for (k, o) in answer.outcomes.into_iter().enumerate() {
                let (outcome, condition) = RowOutcome::of_entry(o);
                if condition.is_some() {
                    report.deferred_reason = condition;
                }
                sent.outcomes[entry_rows[k]] = outcome;
            }
            sent.node = answer.node;
        }
        // The outcome of the ZADDs is unknown: settle nothing.
        Err(DispatchError::Deadline(e)) => return Err(TickError::Deadline(e)),
        // Not the rows' fault: they stay as they are (outcomes remain Deferred).
        Err(DispatchError::Unavailable(why)) => report.redis_unavailable = Some(why),
        // Held back on purpose (Redis nearly full): the rows wait as they are.
        Err(DispatchError::BackPressure(why)) => report.back_pressure = Some(why),
    }
    Ok(sent)
}

/// Per delivered row, seconds from `created_at` and from `run_at` to now
/// (acknowledged): the ages at the claim (database clock) plus the time
/// since (this process's monotonic clock).
pub(super) fn delivery_lags(
    rows: &[crate::domain::OutboxRow],
    outcomes: &[RowOutcome],
    claimed_at: Instant,
) -> Vec<(f64, f64)> {
    let since_claim = claimed_at.elapsed().as_secs_f64();
    rows.iter()
        .zip(outcomes)
        .filter(|(_, o)| matches!(o, RowOutcome::Delivered))
        .map(|(r, _)| {
            let (created, due) = r.age_at_claim_ms;
            (
                created.max(0) as f64 / 1000.0 + since_claim,
                due.max(0) as f64 / 1000.0 + since_claim,
            )
        })
        .collect()
}
