//! What a tick reports ([`TickReport`]), why it fails ([`TickError`]), what
//! it claims ([`ClaimPlan`]) and how rows of a refused settle were kept
//! ([`Kept`]).

use std::time::Duration;

use crate::db::listen::Snapshot;
use crate::db::outbox::ClaimCursor;
use crate::db::{self, is_connection_lost, is_statement_timeout, pg_error_text};
use crate::deadline::Expired;

/// What one successful tick did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TickReport {
    /// From checkout to the claim's answer (BEGIN, claim, shape check).
    pub claim_us: u64,
    /// A drain claim from the beginning (no cursor).
    pub full_scan: bool,
    pub claimed: usize,
    /// The most rows the claim could take ([`crate::domain::ClaimLimit`]): as many
    /// claimed is a full batch.
    pub limit: usize,
    /// The largest claimed row ([`crate::domain::OutboxRow::bytes`]).
    pub max_row_bytes: u64,
    pub delivered: usize,
    pub retried: usize,
    pub dead_lettered: usize,
    /// Rows of cancelled jobs, deleted unsent (the cancel fence stopped their ZADD).
    pub cancelled: usize,
    pub deferred: usize,
    /// Redis gave no usable reply: no row was charged an attempt.
    pub redis_unavailable: Option<String>,
    /// Writes are held back: Redis memory is at `redis.max_memory_ratio`.
    pub back_pressure: Option<String>,
    /// Redis reported a server-wide condition for some entries (OOM, READONLY, WAIT shortfall).
    pub deferred_reason: Option<String>,
    pub last_retry_error: Option<String>,
    pub last_dead_error: Option<String>,
    /// Rows bound for the dead table that it cannot hold, set aside in the
    /// outbox: (outbox id, why).
    pub set_aside: Vec<(i64, String)>,
    /// Per delivered row: seconds from `created_at`, and from `run_at`, to
    /// its ZADD acknowledged (observed once the tick has committed).
    pub delivery_lags: Vec<(f64, f64)>,
    /// Key of the last row claimed (oldest-first lanes resume after it).
    pub cursor: Option<ClaimCursor>,
    /// Something was paused when the tick claimed: the next claim skips
    /// paused jobs in SQL.
    pub pauses_seen: bool,
    /// Microseconds spent in each stage: claim (checkout, begin, claim),
    /// dispatch (encode and the ZADD round trip), settle, commit.
    pub stage_us: [u64; 4],
    /// The snapshot taken just before the claim (a listening relay's
    /// claims): every transaction it shows committed is seen by the claim.
    pub snapshot: Option<Snapshot>,
    /// How long until the next row not yet due at the claim comes due (by
    /// the database's clock).
    pub next_due_in: Option<Duration>,
    /// Some rows were left as they were, due now (Redis unavailable or
    /// held back, a write whose outcome is unknown).
    pub left_due: bool,
    /// How long until the first row this tick put back for later (a
    /// retry, a postponed write) comes due.
    pub put_back_in: Option<Duration>,
    /// Postgres refused a settle write (`stage`, `reason`): how many rows
    /// were kept in the outbox, and how.
    pub settle_refused: Option<(&'static str, String, usize, Kept)>,
    /// The delivery journal refused this tick's deliveries (rows
    /// delivered, not journaled) and why: the tick went on without it.
    pub journal_refused: Option<(usize, String)>,
}

/// Why a tick was abandoned. The transaction was rolled back in every case.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("{stage}: {reason}")]
    Db { stage: &'static str, reason: String },
    #[error("statement timeout during {stage}")]
    StatementTimeout { stage: &'static str },
    #[error(transparent)]
    Deadline(#[from] Expired),
    #[error("dispatch actor unreachable: {0}")]
    Mailbox(String),
    #[error("commit outcome unknown: {0}")]
    CommitUnknown(String),
    /// The rows could not be put back (a delete claim) or `task_outbox`
    /// changed since start: the tick rolled back, and the sweep claims by
    /// locking from now on. Not a failure of the tick's rows.
    #[error("{0}")]
    ClaimFallback(String),
    #[error("connection lost during {stage}: {reason}")]
    ConnectionLost { stage: &'static str, reason: String },
    /// Another transaction was in the way (a deadlock, a serialization
    /// failure, `lock_timeout`): the tick is tried again, nothing refused.
    #[error("{stage}: {reason} (contention; the rows are claimed again)")]
    Contention { stage: &'static str, reason: String },
    /// The session's server takes no writes (SQLSTATE 25006: a standby, a
    /// server set read-only behind the same address).
    #[error("postgres takes no writes (read-only server) during {stage}: {reason}")]
    ReadOnly { stage: &'static str, reason: String },
}

impl TickError {
    /// Whether the tick ran out of time (as opposed to failing).
    pub fn is_deadline(&self) -> bool {
        matches!(self, TickError::Deadline(_) | TickError::StatementTimeout { .. })
    }

    /// The Postgres connection died under the tick (server restart,
    /// `pg_terminate_backend`, network) or its server takes no writes (a
    /// failover's old primary, a standby): the pool is suspect, restart
    /// (its new connections are to a server that takes writes, see
    /// [`db::pool`]).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, TickError::ConnectionLost { .. } | TickError::ReadOnly { .. })
    }

    pub(super) fn db(stage: &'static str) -> impl Fn(tokio_postgres::Error) -> TickError {
        move |e| {
            if is_statement_timeout(&e) {
                TickError::StatementTimeout { stage }
            } else if is_connection_lost(&e) {
                TickError::ConnectionLost {
                    stage,
                    reason: pg_error_text(&e),
                }
            } else if db::is_read_only(&e) {
                TickError::ReadOnly {
                    stage,
                    reason: pg_error_text(&e),
                }
            } else if is_contention(&e) {
                TickError::Contention {
                    stage,
                    reason: pg_error_text(&e),
                }
            } else {
                TickError::Db {
                    stage,
                    reason: pg_error_text(&e),
                }
            }
        }
    }
}

/// SQLSTATE class 40 (a deadlock, a serialization failure) or 55P03
/// (`lock_timeout`): another transaction was in the way, nothing refused.
pub(super) fn is_contention(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("40") || c.code() == "55P03")
}

/// What a tick claims.
#[derive(Debug, Clone, Copy)]
pub struct ClaimPlan {
    /// Oldest-first from here (a drain lane's cursor).
    pub from: Option<ClaimCursor>,
    /// Leave paused jobs' rows (something was paused at the last claim).
    pub skip_paused: bool,
    /// The row limit (0: size the first claim by the rows due).
    pub rows: u32,
    /// Also read the claim's snapshot and when the next row comes due
    /// ([`crate::db::outbox::pauses_and_horizon`]): for the listen lead.
    pub horizon: bool,
}

/// How the rows of a tick whose settle Postgres refused were kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The delivered rows deleted, the others put off by `base_backoff`.
    PutOff,
    /// The delivered rows deleted; the others could not be put off (an
    /// UPDATE refused too) and are due: claimed again at the next tick.
    Due,
    /// Nothing could be deleted: every row, delivered or not, put off and
    /// sent again after `base_backoff`.
    AllPutOff,
}

impl Kept {
    pub fn as_str(self) -> &'static str {
        match self {
            Kept::PutOff => "delivered rows deleted, the others put off by base_backoff",
            Kept::Due => {
                "delivered rows deleted (if any); the others could not be put off: left due, and this relay holds its claims for a growing backoff (at most 30 s)"
            }
            Kept::AllPutOff => "nothing could be deleted: every row put off by base_backoff and sent again",
        }
    }
}
