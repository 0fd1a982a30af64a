//! Postgres side of the relay: pools, start-up checks, migrations and the
//! outbox queries; TLS when the URL asks for it ([`tls`]).
//!
//! Every statement goes through the unnamed-statement APIs of tokio-postgres
//! (`query_typed*`, `execute_typed`, `batch_execute`, `simple_query`), never
//! `query`/`execute` with a `&str`, which PREPARE a named statement: behind
//! pgbouncer in transaction pooling mode, named statements collide across
//! processes (SQLSTATE 42P05, incident 5 of the spec).

pub mod dead_letter;
pub mod fleet;
pub mod hosts;
pub mod jobs;
pub mod journal;
pub mod listen;
pub mod migrate;
pub mod outbox;
pub mod pause;
pub mod privileges;
pub mod schema;
pub mod tls;

mod error;
mod pool;
mod setup;
mod url;

pub use error::{
    column, is_connection_lost, is_read_only, is_statement_timeout, pg_error_text, ColumnError, DbSetupError,
    QueryError,
};
pub use pool::{pool, CheckoutError, Pg, PgConn, PgManager, PgPool, CANCEL_LINGER, CANCEL_WAIT};
pub use setup::{check_journal, check_privileges, check_ready, connect, connect_ready};
pub use url::{pg_config, APPLICATION_NAME};
