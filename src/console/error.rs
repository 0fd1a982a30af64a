//! The console's errors: why it could not start ([`ConsoleSetupError`])
//! and why one request could not be answered ([`ConsoleError`]).

use super::auth;
use crate::db::{self, QueryError};

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleSetupError {
    #[error("cannot listen on console.listen {listen}: {source}")]
    Listen { listen: String, source: std::io::Error },
    #[error("console.users_file: {0}")]
    Users(#[from] auth::UsersError),
    #[error(transparent)]
    Database(#[from] db::DbSetupError),
    #[error("console metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("console.trusted_proxies: {0}")]
    Proxies(String),
}

/// Why one request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// What was confirmed no longer holds (409; nothing changed).
    #[error("{0}")]
    Conflict(String),
}

impl From<QueryError> for ConsoleError {
    fn from(e: QueryError) -> Self {
        ConsoleError::Postgres(e.text())
    }
}

impl From<db::dead_letter::DeadLetterError> for ConsoleError {
    fn from(e: db::dead_letter::DeadLetterError) -> Self {
        ConsoleError::Postgres(e.to_string())
    }
}
