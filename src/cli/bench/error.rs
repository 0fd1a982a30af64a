//! How `bench` fails: [`BenchError`], and the conversions of the Postgres
//! and Redis clients' errors into it.

use crate::db::{self, pg_error_text};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Setup(#[from] db::DbSetupError),
    #[error(transparent)]
    Migrate(#[from] db::migrate::MigrateError),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("relay subprocess: {0}")]
    Relay(String),
    #[error("{0}")]
    Usage(String),
}

pub(super) fn pg(e: tokio_postgres::Error) -> BenchError {
    BenchError::Postgres(pg_error_text(&e))
}

pub(super) fn rd(e: ::redis::RedisError) -> BenchError {
    BenchError::Redis(e.to_string())
}
