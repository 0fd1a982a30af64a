//! Settlement rules of one tick (SPEC §3), as pure logic.
//!
//! Given the claimed rows and what happened to each, decide which rows are
//! deleted, which are rescheduled (and when), which move to the dead-letter
//! table, and which are left untouched for a later tick. No I/O here: the
//! sweep applies the resulting [`Settlement`] in its transaction.

use std::time::Duration;

use super::outcome::RowOutcome;
use super::row::OutboxRow;

/// How failed rows are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// Delay before the next try of a row that has failed `attempts` times
    /// before this failure: `min(base * 2^attempts, max)`.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exp = attempts.clamp(0, 62) as u32;
        let factor = 1u64 << exp;
        let base_ms = self.base_backoff.as_millis().min(u128::from(u64::MAX)) as u64;
        let ms = base_ms.saturating_mul(factor);
        Duration::from_millis(ms).min(self.max_backoff)
    }

    /// Whether one more failure exhausts the row's attempts.
    pub fn exhausted(&self, attempts: i32) -> bool {
        i64::from(attempts) + 1 >= i64::from(self.max_attempts)
    }
}

/// The writes one tick makes, grouped for array statements.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Settlement {
    pub delete: Vec<i64>,
    pub retry_ids: Vec<i64>,
    pub retry_delays_ms: Vec<i64>,
    pub dead_ids: Vec<i64>,
    pub dead_errors: Vec<String>,
    /// Rows to try again after `postpone_delay_ms` (attempts unchanged).
    pub postpone_ids: Vec<i64>,
    pub postpone_delay_ms: i64,
    /// Rows not settled this time (left as they are, or postponed).
    pub deferred: usize,
    /// Rows of cancelled jobs, deleted unsent (they are also in `delete`).
    pub cancelled: usize,
    /// The last error among retried rows, for the log line.
    pub last_retry_error: Option<String>,
    /// Rows bound for the dead table that it cannot hold (their ids do not
    /// fit its columns): kept in the outbox, never claimed again.
    pub aside_ids: Vec<i64>,
    /// Why each of `aside_ids` was set aside (the column, the value), and
    /// the error that sent it toward the dead table.
    pub aside_reasons: Vec<String>,
    /// Indexes (into the tick's rows) of every row that is not deleted: a
    /// delete claim puts these back before the writes above run on them.
    pub stays: Vec<usize>,
}

impl Settlement {
    /// How long until the first row rescheduled here (a retry, a
    /// postponed write) comes due.
    pub fn earliest_put_back(&self) -> Option<Duration> {
        let postponed = (!self.postpone_ids.is_empty()).then_some(self.postpone_delay_ms);
        self.retry_delays_ms
            .iter()
            .copied()
            .chain(postponed)
            .min()
            .map(|ms| Duration::from_millis(ms.max(0) as u64))
    }

    /// The rows this settlement writes besides deleting: retried, moved
    /// to the dead table, set aside, postponed. When Postgres refuses one
    /// of those writes, these are the rows put off instead.
    pub fn written_rows(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .retry_ids
            .iter()
            .chain(&self.dead_ids)
            .chain(&self.aside_ids)
            .chain(&self.postpone_ids)
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The tick changes no row (each stays exactly as it was): a delete
    /// claim then rolls back instead of putting every row back.
    pub fn changes_nothing(&self) -> bool {
        self.delete.is_empty() && self.updates_nothing()
    }

    /// Whether the tick has statements to run before its commit. A delete
    /// claim took every row out: each row that stays must be put back,
    /// whatever else happens to it (a `Deferred` row next to a delivered
    /// one is written by nothing else, and would be lost). A locking claim
    /// writes the delivered rows' DELETE and the updates of those that
    /// stay.
    pub fn needs_writes(&self, delete_claim: bool) -> bool {
        if delete_claim {
            !self.stays.is_empty()
        } else {
            !self.delete.is_empty() || !self.updates_nothing()
        }
    }

    /// No row that stays is written (retried, moved, set aside, postponed).
    pub fn updates_nothing(&self) -> bool {
        self.retry_ids.is_empty()
            && self.dead_ids.is_empty()
            && self.postpone_ids.is_empty()
            && self.aside_ids.is_empty()
    }

    /// Take out of the dead-letter move every row `refusal` says the dead
    /// table cannot hold, and set it aside instead, so one such row never
    /// fails the move of the others.
    pub fn set_aside(&mut self, rows: &[OutboxRow], refusal: impl Fn(&OutboxRow) -> Option<String>) {
        if self.dead_ids.is_empty() {
            return;
        }
        let mut keep_ids = Vec::with_capacity(self.dead_ids.len());
        let mut keep_errors = Vec::with_capacity(self.dead_errors.len());
        for (id, err) in self.dead_ids.drain(..).zip(self.dead_errors.drain(..)) {
            match rows.iter().find(|r| r.id == id).and_then(&refusal) {
                Some(why) => {
                    self.aside_ids.push(id);
                    self.aside_reasons
                        .push(format!("{why}; it was bound for the dead table: {err}"));
                }
                None => {
                    keep_ids.push(id);
                    keep_errors.push(err);
                }
            }
        }
        self.dead_ids = keep_ids;
        self.dead_errors = keep_errors;
    }
}

/// Apply the rules to `rows` and their `outcomes` (same order, same length).
pub fn settle(rows: &[OutboxRow], outcomes: Vec<RowOutcome>, policy: &RetryPolicy) -> Settlement {
    debug_assert_eq!(rows.len(), outcomes.len());
    let mut s = Settlement {
        postpone_delay_ms: policy.base_backoff.as_millis().min(i64::MAX as u128) as i64,
        ..Settlement::default()
    };
    for (i, (row, outcome)) in rows.iter().zip(outcomes).enumerate() {
        if !matches!(outcome, RowOutcome::Delivered | RowOutcome::Cancelled) {
            s.stays.push(i);
        }
        match outcome {
            RowOutcome::Delivered => s.delete.push(row.id),
            RowOutcome::Cancelled => {
                s.delete.push(row.id);
                s.cancelled += 1;
            }
            RowOutcome::Deferred => s.deferred += 1,
            RowOutcome::Postponed => {
                s.postpone_ids.push(row.id);
                s.deferred += 1;
            }
            RowOutcome::Poison(err) => {
                s.dead_ids.push(row.id);
                s.dead_errors.push(err);
            }
            RowOutcome::Failed(err) if policy.exhausted(row.attempts) => {
                s.dead_ids.push(row.id);
                s.dead_errors.push(err);
            }
            RowOutcome::Failed(err) => {
                s.retry_ids.push(row.id);
                s.retry_delays_ms
                    .push(policy.backoff(row.attempts).as_millis().min(i64::MAX as u128) as i64);
                s.last_retry_error = Some(err);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
            max_attempts: 3,
        }
    }

    fn row(id: i64, attempts: i32) -> OutboxRow {
        OutboxRow::blank(id, "", attempts)
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy();
        assert_eq!(p.backoff(0), Duration::from_secs(2));
        assert_eq!(p.backoff(1), Duration::from_secs(4));
        assert_eq!(p.backoff(5), Duration::from_secs(64));
        assert_eq!(p.backoff(8), Duration::from_secs(300));
        assert_eq!(p.backoff(10_000), Duration::from_secs(300));
        assert_eq!(p.backoff(-3), Duration::from_secs(2));
    }

    #[test]
    fn exhaustion_at_the_cap() {
        let p = policy();
        assert!(!p.exhausted(0));
        assert!(!p.exhausted(1));
        assert!(p.exhausted(2));
        let one = RetryPolicy { max_attempts: 1, ..p };
        assert!(one.exhausted(0));
    }

    #[test]
    fn every_outcome_lands_in_exactly_one_place() {
        let rows = [row(1, 0), row(2, 0), row(3, 2), row(4, 1), row(5, 0), row(6, 2)];
        let outcomes = vec![
            RowOutcome::Delivered,
            RowOutcome::Failed("WRONGTYPE x".into()),
            RowOutcome::Failed("WRONGTYPE y".into()),
            RowOutcome::Deferred,
            RowOutcome::Poison("field path contains the separator".into()),
            RowOutcome::Postponed,
        ];
        let s = settle(&rows, outcomes, &policy());
        assert_eq!(s.delete, [1]);
        assert_eq!(s.retry_ids, [2]);
        assert_eq!(s.retry_delays_ms, [2000]);
        assert_eq!(s.dead_ids, [3, 5]);
        assert_eq!(s.dead_errors[0], "WRONGTYPE y");
        // A postponed row is not failed: it keeps its attempts even when
        // one more failure would exhaust them.
        assert_eq!(s.postpone_ids, [6]);
        assert_eq!(s.postpone_delay_ms, 2000);
        assert_eq!(s.deferred, 2);
        assert_eq!(s.last_retry_error.as_deref(), Some("WRONGTYPE x"));
        // Every row but the delivered one stays (a delete claim puts them back).
        assert_eq!(s.stays, [1, 2, 3, 4, 5]);
        assert!(!s.changes_nothing());
    }

    #[test]
    fn every_row_that_stays_is_written_after_a_delete_claim() {
        let rows = [row(1, 0), row(2, 0)];
        // Delivered beside Deferred: the deferred row must be put back.
        let s = settle(&rows, vec![RowOutcome::Delivered, RowOutcome::Deferred], &policy());
        assert!(s.updates_nothing());
        assert!(s.needs_writes(true), "the deferred row would be lost");
        // The locking claim deletes the delivered row and leaves the other.
        assert!(s.needs_writes(false));
        let s = settle(&rows, vec![RowOutcome::Delivered, RowOutcome::Cancelled], &policy());
        assert!(!s.needs_writes(true), "nothing to put back");
        assert!(s.needs_writes(false), "the locking claim deletes them");
        let s = settle(&rows, vec![RowOutcome::Deferred, RowOutcome::Deferred], &policy());
        assert!(!s.needs_writes(false));
    }

    #[test]
    fn the_rows_written_besides_deleting_are_each_listed_once() {
        let rows = [row(1, 0), row(2, 0), row(3, 9), row(4, 0)];
        let s = settle(
            &rows,
            vec![
                RowOutcome::Delivered,
                RowOutcome::Failed("WRONGTYPE x".into()),
                RowOutcome::Failed("WRONGTYPE x".into()),
                RowOutcome::Postponed,
            ],
            &policy(),
        );
        assert_eq!(s.delete, [1]);
        assert_eq!(s.written_rows(), [2, 3, 4], "retried, dead-lettered, postponed");
    }

    #[test]
    fn a_tick_that_settles_nothing_changes_nothing() {
        let rows = [row(1, 0), row(2, 9)];
        let s = settle(&rows, vec![RowOutcome::Deferred, RowOutcome::Deferred], &policy());
        assert!(s.changes_nothing());
        assert_eq!(s.stays, [0, 1]);
        let s = settle(&rows, vec![RowOutcome::Deferred, RowOutcome::Postponed], &policy());
        assert!(!s.changes_nothing());
        let s = settle(&rows, vec![RowOutcome::Cancelled, RowOutcome::Deferred], &policy());
        assert!(!s.changes_nothing());
        assert_eq!(s.stays, [1]);
    }

    #[test]
    fn rows_the_dead_table_cannot_hold_are_set_aside_alone() {
        let mut rows: Vec<OutboxRow> = (1..=3).map(|i| row(i, 2)).collect();
        rows[1].task_id = "not-a-uuid".into();
        let outcomes = vec![
            RowOutcome::Failed("WRONGTYPE".into()),
            RowOutcome::Failed("WRONGTYPE".into()),
            RowOutcome::Poison("path contains |".into()),
        ];
        let mut s = settle(&rows, outcomes, &policy());
        assert_eq!(s.dead_ids, [1, 2, 3]);
        s.set_aside(&rows, |r| {
            (r.task_id == "not-a-uuid").then(|| "task_id refused".to_string())
        });
        assert_eq!(s.dead_ids, [1, 3]);
        assert_eq!(s.dead_errors, ["WRONGTYPE", "path contains |"]);
        assert_eq!(s.aside_ids, [2]);
        assert_eq!(
            s.aside_reasons,
            ["task_id refused; it was bound for the dead table: WRONGTYPE"]
        );
    }

    #[test]
    fn the_first_row_put_back_sets_when_to_look_again() {
        let rows: Vec<OutboxRow> = vec![row(1, 3), row(2, 0), row(3, 0)];
        // Delivered rows put nothing back.
        let s = settle(&rows, vec![RowOutcome::Delivered; 3], &policy());
        assert_eq!(s.earliest_put_back(), None);
        // Row 1 has used its attempts (dead), row 2 retries after 2 s.
        let fail = || RowOutcome::Failed("WRONGTYPE".into());
        let s = settle(&rows, vec![fail(), fail(), RowOutcome::Delivered], &policy());
        assert_eq!(s.earliest_put_back(), Some(Duration::from_secs(2)));
        // A postponed write comes back after base_backoff as well; a row
        // left as it is (Deferred) is due now and sets no timer.
        let s = settle(
            &rows,
            vec![RowOutcome::Deferred, RowOutcome::Postponed, RowOutcome::Delivered],
            &policy(),
        );
        assert_eq!(s.earliest_put_back(), Some(Duration::from_secs(2)));
        let s = settle(&rows, vec![RowOutcome::Deferred; 3], &policy());
        assert_eq!(s.earliest_put_back(), None);
    }
}
