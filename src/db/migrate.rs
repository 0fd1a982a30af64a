//! `outbox-relay migrate`: apply the SQL files of `migrations/`, embedded in
//! the binary, and record each in `outbox_relay_migrations`.
//!
//! The files are plain, idempotent SQL so teams with their own migration
//! tool can apply them with `psql -f`. Everything runs in one transaction
//! under an advisory lock, so two relays starting at once cannot race, and a
//! failed migration leaves nothing behind. Run it over a direct connection,
//! not through pgbouncer (session-level features are not needed, but a
//! migration should not share a server connection with live traffic).

use std::time::Duration;

use slog::{info, Logger};

use super::{connect, pg_error_text, DbSetupError};

/// One embedded migration.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// All migrations, in order. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox",
        sql: include_str!("../../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "notify",
        sql: include_str!("../../migrations/0002_notify.sql"),
    },
    Migration {
        version: 3,
        name: "claim_index",
        sql: include_str!("../../migrations/0003_claim_index.sql"),
    },
];

/// Arbitrary but fixed key of the advisory lock that serialises migrations.
const MIGRATE_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Setup(#[from] DbSetupError),
    #[error("migration {version} ({name}) failed: {reason}")]
    Failed {
        version: i32,
        name: &'static str,
        reason: String,
    },
    #[error("migration bookkeeping failed: {0}")]
    Bookkeeping(String),
    #[error("migration {version} ({name}) was applied with different contents (checksum {applied}, this binary has {embedded}); migrations must never be edited after they ship")]
    Diverged {
        version: i32,
        name: &'static str,
        applied: String,
        embedded: String,
    },
}

/// What `migrate` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<i32>,
    pub already_applied: Vec<i32>,
}

/// FNV-1a 64 of the file, hex: enough to notice an edited migration.
pub fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Apply every migration not yet recorded. Running it twice is a no-op.
pub async fn migrate(url: &str, timeout: Duration, log: &Logger) -> Result<MigrateReport, MigrateError> {
    let mut client = connect(url, timeout).await?;
    let book = |e: tokio_postgres::Error| MigrateError::Bookkeeping(pg_error_text(&e));
    let tx = client.transaction().await.map_err(book)?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATE_LOCK_KEY});
         CREATE TABLE IF NOT EXISTS outbox_relay_migrations (
             version    INT PRIMARY KEY,
             name       TEXT NOT NULL,
             checksum   TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(book)?;
    let rows = tx
        .query_typed("SELECT version, checksum FROM outbox_relay_migrations", &[])
        .await
        .map_err(book)?;
    let applied: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut report = MigrateReport::default();
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        if let Some((_, recorded)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *recorded != sum {
                return Err(MigrateError::Diverged {
                    version: m.version,
                    name: m.name,
                    applied: recorded.clone(),
                    embedded: sum,
                });
            }
            report.already_applied.push(m.version);
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(|e| MigrateError::Failed {
            version: m.version,
            name: m.name,
            reason: pg_error_text(&e),
        })?;
        tx.execute_typed(
            "INSERT INTO outbox_relay_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                (&m.version, tokio_postgres::types::Type::INT4),
                (&m.name, tokio_postgres::types::Type::TEXT),
                (&sum, tokio_postgres::types::Type::TEXT),
            ],
        )
        .await
        .map_err(book)?;
        info!(log, "migration applied"; "version" => m.version, "name" => m.name);
        report.applied.push(m.version);
    }
    tx.commit().await.map_err(book)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_files_are_idempotent_sql() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last);
            last = m.version;
            for stmt in m.sql.split(';') {
                let s = stmt
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let s = s.trim().to_ascii_uppercase();
                if s.starts_with("CREATE TABLE") || s.starts_with("CREATE INDEX") || s.starts_with("CREATE TRIGGER") {
                    assert!(
                        s.contains("IF NOT EXISTS") || m.sql.contains("DROP TRIGGER IF EXISTS"),
                        "not idempotent: {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn checksum_is_stable() {
        assert_eq!(checksum(""), "cbf29ce484222325");
        assert_ne!(checksum("a"), checksum("b"));
    }
}
