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
