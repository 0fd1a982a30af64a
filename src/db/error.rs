//! How the relay tells Postgres failures apart: the start-up errors, a
//! readable text for a driver error, the SQLSTATEs the callers act on, and
//! the error for a column that does not hold what the relay reads.

use tokio_postgres::error::SqlState;

use crate::pool::FailureKind;

/// tokio-postgres does not tell a connect timeout apart; bb8 reports it
/// as its own timeout.
impl FailureKind for tokio_postgres::Error {
    fn is_timeout(&self) -> bool {
        false
    }

    /// With its cause: `error connecting to server: database does not
    /// allow writes` (a read-only server refused by `target_session_attrs`).
    fn text(&self) -> String {
        pg_error_text(self)
    }
}

/// Why Postgres could not be used at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    #[error("invalid Postgres URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach Postgres at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Postgres at {url} has no outbox schema (tables task_outbox and task_outbox_dead); run `outbox-relay migrate` first")]
    SchemaMissing { url: String },
    #[error("Postgres at {url} has no delivery journal (table outbox_relay_journal) but journal.keep is set; run `outbox-relay migrate` first, or set journal.keep = \"0s\"")]
    JournalMissing { url: String },
    /// One line per thing in the tables the relay cannot work with.
    #[error("{}", .problems.iter().map(|p| format!("Postgres at {url}: {p}")).collect::<Vec<_>>().join("\n"))]
    Schema { url: String, problems: Vec<String> },
    /// One line per privilege the role lacks (docs/postgres.md "Database roles").
    #[error("{}", .missing.iter().map(|m| format!("Postgres at {url}: {m}")).collect::<Vec<_>>().join("\n"))]
    Privileges { url: String, missing: Vec<String> },
}

/// A readable one-line description of a Postgres error: the server's message
/// and SQLSTATE when there is one, else the client error and its causes.
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The server takes no writes (SQLSTATE 25006): a standby, or a server
/// or role set `default_transaction_read_only` while the session was open.
/// The server's fault, never a row's: the session must be replaced.
pub fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// The connection is gone: closed socket, or the server ended the session
/// (`pg_terminate_backend` 57P01, crash 57P02, restart 57P03).
pub fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW
        )
}

/// A column that did not hold what the relay reads from it (NULL where a
/// value is needed, another type than expected): the tables are the
/// producers' and the operators', so this is external data and an error
/// naming the table and column, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{table}.{column}: {reason}")]
pub struct ColumnError {
    pub table: &'static str,
    pub column: String,
    pub reason: String,
}

/// Column `idx` of a row read from `table`, or why it cannot be read as `T`.
pub fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    table: &'static str,
    idx: usize,
) -> Result<T, ColumnError> {
    row.try_get(idx).map_err(|e| ColumnError {
        table,
        column: row
            .columns()
            .get(idx)
            .map_or_else(|| format!("#{idx}"), |c| c.name().to_string()),
        // tokio-postgres says "error deserializing column N"; the cause
        // ("unexpected null", "cannot convert between …") is its source.
        reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string()),
    })
}

/// A statement failed, or its result had a column the relay cannot read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Column(#[from] ColumnError),
}

impl QueryError {
    /// One line for a log or an error message.
    pub fn text(&self) -> String {
        match self {
            QueryError::Pg(e) => pg_error_text(e),
            QueryError::Column(e) => e.to_string(),
        }
    }
}

/// `statement_timeout` (or a cancel) ended the statement: SQLSTATE 57014.
pub fn is_statement_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
}
