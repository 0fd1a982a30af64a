//! What happens to a row on its way out: the ZADD a row becomes
//! ([`ScheduleEntry`]), what Redis said about it ([`EntryOutcome`], decided
//! by the dispatch) and what that means for the row ([`RowOutcome`], what
//! settlement works on), and the rule from one to the other
//! ([`RowOutcome::of_entry`]).

/// One ZADD: `ZADD key score member`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleEntry {
    pub key: String,
    pub score: i64,
    pub member: String,
}

/// What happened to one entry of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryOutcome {
    /// The member is in the sorted set.
    Delivered,
    /// Redis refused this entry for a reason that is the row's fault.
    Rejected(String),
    /// Redis refused for a reason that is not the row's fault; re-send later.
    Deferred(String),
    /// Not written: the job was cancelled (its cancel fence is set).
    Cancelled,
    /// Sent, but no answer came before the deadline (a cluster node that
    /// stalled): it may be in the sorted set already, with the row's score.
    /// Re-sent as it is (same member, same score, so the re-send changes
    /// nothing if it did land), never with a new score.
    Unknown(String),
}

/// What happened to one claimed row during the tick.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// Its member is in Redis.
    Delivered,
    /// Redis refused it for a reason that is the row's fault.
    Failed(String),
    /// Redis as a whole gave no usable answer: leave the row as it is (no
    /// other row could be delivered either).
    Deferred,
    /// Redis refused this entry for a reason that is not the row's fault
    /// (its cluster node is down, OOM, READONLY, a WAIT shortfall) while
    /// other entries may have gone through: try it again after
    /// `base_backoff`, without counting an attempt, so it does not sit at
    /// the head of the queue and starve the rows that can be delivered.
    Postponed,
    /// It can never be delivered (cannot be encoded): dead-letter at once.
    Poison(String),
    /// Its job was cancelled: the row is void, delete it unsent.
    Cancelled,
}

impl RowOutcome {
    /// What Redis's answer for a row's entry means for the row, and the
    /// server-wide condition it reports, if any (OOM, READONLY, a WAIT
    /// shortfall, a write that may have landed).
    pub fn of_entry(entry: EntryOutcome) -> (RowOutcome, Option<String>) {
        match entry {
            EntryOutcome::Delivered => (RowOutcome::Delivered, None),
            EntryOutcome::Cancelled => (RowOutcome::Cancelled, None),
            EntryOutcome::Rejected(e) => (RowOutcome::Failed(e), None),
            // Not the row's fault: tried again later, no attempt counted.
            EntryOutcome::Deferred(e) => (RowOutcome::Postponed, Some(e)),
            // Maybe written with the row's score: keep the row (and so the
            // score) as it is for the re-send.
            EntryOutcome::Unknown(e) => (RowOutcome::Deferred, Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_rows_own_fault_fails_it_and_a_maybe_written_entry_keeps_its_row() {
        let e = || "why".to_string();
        assert_eq!(
            RowOutcome::of_entry(EntryOutcome::Delivered),
            (RowOutcome::Delivered, None)
        );
        assert_eq!(
            RowOutcome::of_entry(EntryOutcome::Cancelled),
            (RowOutcome::Cancelled, None)
        );
        assert_eq!(
            RowOutcome::of_entry(EntryOutcome::Rejected(e())),
            (RowOutcome::Failed(e()), None)
        );
        assert_eq!(
            RowOutcome::of_entry(EntryOutcome::Deferred(e())),
            (RowOutcome::Postponed, Some(e()))
        );
        assert_eq!(
            RowOutcome::of_entry(EntryOutcome::Unknown(e())),
            (RowOutcome::Deferred, Some(e()))
        );
    }
}
