//! The outbox row as the relay sees it: what a claim returns, what the
//! member is encoded from and what settlement decides on. Both stores use
//! it; neither owns it.

/// A claimed outbox row: the columns the member needs, plus `attempts` for
/// the retry decision and the score (`run_at` in unix milliseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub task_id: String,
    pub job_id: String,
    pub page_id: i32,
    pub host: String,
    pub path: String,
    pub priority: f64,
    pub retry_count: i32,
    pub source_type: String,
    pub source_url: String,
    pub task_type: String,
    pub lighthouse_run_id: Option<i64>,
    pub attempts: i32,
    pub run_at_ms: i64,
    /// Milliseconds from `created_at` to the claim, and from `run_at` to the
    /// claim, both by the database's clock (so clock skew between the
    /// relay's host and Postgres never enters the delivery lag).
    pub age_at_claim_ms: (i64, i64),
}

#[cfg(test)]
impl OutboxRow {
    /// A row with `id`, `job_id` and `attempts` and every other field empty
    /// or zero: for tests of what is decided about rows, not what they hold.
    pub(crate) fn blank(id: i64, job_id: &str, attempts: i32) -> OutboxRow {
        OutboxRow {
            id,
            task_id: String::new(),
            job_id: job_id.into(),
            page_id: 0,
            host: String::new(),
            path: String::new(),
            priority: 0.0,
            retry_count: 0,
            source_type: String::new(),
            source_url: String::new(),
            task_type: String::new(),
            lighthouse_run_id: None,
            attempts,
            run_at_ms: 0,
            age_at_claim_ms: (0, 0),
        }
    }
}

impl OutboxRow {
    /// What the row weighs against `sweep.max_batch_bytes`: its text
    /// fields, and 128 for the rest. A tick holds each row several times
    /// over (the database's reply, the member, the pipeline).
    pub fn bytes(&self) -> u64 {
        (self.task_id.len()
            + self.job_id.len()
            + self.host.len()
            + self.path.len()
            + self.source_type.len()
            + self.source_url.len()
            + self.task_type.len()
            + 128) as u64
    }
}
