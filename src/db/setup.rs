//! Start-up: a direct connection, and the checks that the database has
//! the outbox schema and that the role holds the privileges it needs.

use std::time::Duration;

use super::error::{pg_error_text, DbSetupError};
use super::url::pg_config;
use super::{hosts, privileges, schema, tls};
use crate::redact::redact_url;

/// Open one direct connection (not pooled); the connection task runs on the
/// current runtime and ends when the client is dropped.
pub async fn connect(url: &str, timeout: Duration) -> Result<tokio_postgres::Client, DbSetupError> {
    let cfg = pg_config(url, timeout)?;
    let unreachable = |reason: String| DbSetupError::Unreachable {
        url: redact_url(url),
        reason,
    };
    // Each host bounded as a whole (see `hosts`): a frozen first host
    // does not keep a start-up from the next.
    let (client, connection) = hosts::connect(&cfg, tls::connector(), timeout)
        .await
        .map_err(unreachable)?;
    tokio::spawn(async move {
        // The connection ends with an error when the server goes away; the
        // client's next call reports it, so there is nothing to add here.
        let _ = connection.await;
    });
    Ok(client)
}

/// Check that Postgres answers and that the outbox tables exist and have
/// a shape the relay can work with; returns that shape.
pub async fn check_ready(url: &str, timeout: Duration) -> Result<schema::Schema, DbSetupError> {
    connect_ready(url, timeout).await.map(|(_, schema)| schema)
}

/// A direct connection to a database that has the outbox schema, and the
/// shape of its tables (UUID or TEXT ids, see [`schema`]).
pub async fn connect_ready(
    url: &str,
    timeout: Duration,
) -> Result<(tokio_postgres::Client, schema::Schema), DbSetupError> {
    let client = connect(url, timeout).await?;
    let row = client
        .query_typed_one(
            "SELECT to_regclass('task_outbox') IS NOT NULL AND to_regclass('task_outbox_dead') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| DbSetupError::Unreachable {
            url: redact_url(url),
            reason: pg_error_text(&e),
        })?;
    if !row.get::<_, bool>(0) {
        return Err(DbSetupError::SchemaMissing { url: redact_url(url) });
    }
    match schema::read(&client).await {
        Ok(schema) => Ok((client, schema)),
        Err(problems) => Err(DbSetupError::Schema {
            url: redact_url(url),
            problems,
        }),
    }
}

/// With `journal.keep` set: the journal's table is there (migration 8)
/// and the role may write, read and empty it.
pub async fn check_journal(url: &str, timeout: Duration) -> Result<(), DbSetupError> {
    let client = connect(url, timeout).await?;
    let there = super::journal::exists(&client)
        .await
        .map_err(|e| DbSetupError::Unreachable {
            url: redact_url(url),
            reason: e.text(),
        })?;
    if !there {
        return Err(DbSetupError::JournalMissing { url: redact_url(url) });
    }
    drop(client);
    check_privileges(url, privileges::JOURNAL, timeout).await.map(|_| ())
}

/// Check that the role of `url` holds every privilege in `needs`. Missing
/// required ones are an error listing each; missing optional ones are
/// returned for a warning.
pub async fn check_privileges(
    url: &str,
    needs: &[privileges::Need],
    timeout: Duration,
) -> Result<Vec<privileges::Missing>, DbSetupError> {
    let client = connect(url, timeout).await?;
    let missing = privileges::missing(&client, needs)
        .await
        .map_err(|e| DbSetupError::Unreachable {
            url: redact_url(url),
            reason: e.text(),
        })?;
    if missing.iter().any(|m| m.need.required) {
        return Err(DbSetupError::Privileges {
            url: redact_url(url),
            missing: missing.iter().map(ToString::to_string).collect(),
        });
    }
    Ok(missing)
}
