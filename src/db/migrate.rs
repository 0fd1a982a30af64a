//! `outbox-relay migrate`: apply the SQL files of `migrations/`, embedded in
//! the binary, and record each in `outbox_relay_migrations`.
//!
//! The files are plain, idempotent SQL so teams with their own migration
//! tool can apply them with `psql -f`. Everything runs in one transaction
//! under an advisory lock, so two relays starting at once cannot race, and a
//! failed migration leaves nothing behind. Run it over a direct connection,
//! not through pgbouncer (session-level features are not needed, but a
//! migration should not share a server connection with live traffic).
//!
//! On a database that already has tables of its own (the Go sweeper's), a
//! migration adds only what is missing: each file is run statement by
//! statement, and a `CREATE TABLE IF NOT EXISTS` whose table exists or a
//! `CREATE INDEX IF NOT EXISTS` for which an *equivalent* index exists
//! (same table, same key columns in the same order and direction, or all
//! reversed, no predicate, no expression; its name does not matter) is
//! skipped and reported. No statement alters a column or a constraint.
//! `dry_run` plans without writing anything: it reads the catalog and
//! reports what each statement would do, taking no lock.

use std::time::Duration;

use slog::{info, Logger};

use super::error::{pg_error_text, DbSetupError};
use super::setup::connect;

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
    Migration {
        version: 4,
        name: "pause",
        sql: include_str!("../../migrations/0004_pause.sql"),
    },
    Migration {
        version: 5,
        name: "quiet_put_back",
        sql: include_str!("../../migrations/0005_quiet_put_back.sql"),
    },
    Migration {
        version: 6,
        name: "notify_xid",
        sql: include_str!("../../migrations/0006_notify_xid.sql"),
    },
    Migration {
        version: 7,
        name: "fleet",
        sql: include_str!("../../migrations/0007_fleet.sql"),
    },
    Migration {
        version: 8,
        name: "journal",
        sql: include_str!("../../migrations/0008_journal.sql"),
    },
];

/// `deploy/postgres/roles.sql`: every privilege of `outbox_relay` and
/// `outbox_triage`, granted by the tables' owner (`migrate --grant`).
pub const ROLES_SQL: &str = include_str!("../../deploy/postgres/roles.sql");

/// `migrate --grant`, after the migrations: grant [`ROLES_SQL`] in one
/// transaction, as the role of `url` (the tables' owner, `outbox_migrator`
/// in the shipped Job). Idempotent, like the migrations.
pub async fn grant(url: &str, timeout: Duration) -> Result<(), MigrateError> {
    let mut client = connect(url, timeout).await?;
    let failed = |e: tokio_postgres::Error| MigrateError::Grant(pg_error_text(&e));
    let tx = client.transaction().await.map_err(failed)?;
    tx.batch_execute(ROLES_SQL).await.map_err(failed)?;
    tx.commit().await.map_err(failed)
}

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
    /// `migrate --grant`: `deploy/postgres/roles.sql` failed as a whole.
    #[error("granting deploy/postgres/roles.sql failed: {0} (the roles outbox_relay and outbox_triage must exist, and the tables belong to this role)")]
    Grant(String),
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
    /// Each statement of the applied migrations and what was done with it.
    pub steps: Vec<Step>,
}

/// One statement of a migration and what `migrate` does with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub version: i32,
    /// The statement's first line.
    pub statement: String,
    /// None: run; Some(why): skipped, because what it creates is there.
    pub skipped: Option<String>,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.skipped {
            None => write!(f, "migration {}: run: {}", self.version, self.statement),
            Some(why) => write!(f, "migration {}: skip: {} ({why})", self.version, self.statement),
        }
    }
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
    apply(url, timeout, false, log).await
}

/// Apply (or with `dry_run`, only plan) every migration not yet recorded.
pub async fn apply(url: &str, timeout: Duration, dry_run: bool, log: &Logger) -> Result<MigrateReport, MigrateError> {
    let mut client = connect(url, timeout).await?;
    let book = |e: tokio_postgres::Error| MigrateError::Bookkeeping(pg_error_text(&e));
    let tx = client.transaction().await.map_err(book)?;
    let recorded = tx
        .query_typed_one("SELECT to_regclass('outbox_relay_migrations') IS NOT NULL", &[])
        .await
        .map_err(book)?
        .get::<_, bool>(0);
    if !dry_run {
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
    }
    let applied: Vec<(i32, String)> = if recorded || !dry_run {
        tx.query_typed("SELECT version, checksum FROM outbox_relay_migrations", &[])
            .await
            .map_err(book)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    } else {
        Vec::new()
    };
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
        let failed = |e: tokio_postgres::Error| MigrateError::Failed {
            version: m.version,
            name: m.name,
            reason: pg_error_text(&e),
        };
        for stmt in statements(m.sql) {
            let skipped = already_there(&tx, &stmt).await.map_err(|e| match e {
                Refusal::Query(e) => failed(e),
                Refusal::Invalid(reason) => MigrateError::Failed {
                    version: m.version,
                    name: m.name,
                    reason,
                },
            })?;
            if skipped.is_none() && !dry_run {
                tx.batch_execute(&stmt).await.map_err(failed)?;
            }
            let step = Step {
                version: m.version,
                statement: first_line(&stmt),
                skipped,
            };
            if step.skipped.is_some() && !dry_run {
                info!(log, "migration statement skipped: what it creates is already there";
                    "version" => m.version, "statement" => &step.statement, "reason" => step.skipped.as_deref());
            }
            report.steps.push(step);
        }
        if !dry_run {
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
        }
        report.applied.push(m.version);
    }
    if dry_run {
        tx.rollback().await.map_err(book)?;
    } else {
        tx.commit().await.map_err(book)?;
    }
    Ok(report)
}

/// The statements of a SQL file: split at `;` outside quotes, comments and
/// dollar-quoted bodies; comment-only pieces dropped.
pub fn statements(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(b.len(), |n| i + n);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = sql[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // $tag$ … $tag$ (tag: letters, digits, underscore, or empty)
                let tag_end = sql[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map(|n| i + 1 + n);
                match tag_end {
                    Some(e) if b[e] == b'$' => {
                        let tag = &sql[i..=e];
                        i = sql[e + 1..].find(tag).map_or(b.len(), |n| e + 1 + n + tag.len());
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                push_statement(&mut out, &sql[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    push_statement(&mut out, &sql[start.min(b.len())..]);
    out
}

fn push_statement(out: &mut Vec<String>, piece: &str) {
    let has_code = piece
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"));
    if has_code {
        out.push(piece.trim().to_string());
    }
}

/// The first line of a statement that is not a comment.
fn first_line(stmt: &str) -> String {
    stmt.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("--"))
        .unwrap_or("")
        .to_string()
}

/// What a `CREATE … IF NOT EXISTS` statement would create, when it is one
/// the catalog can answer for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creates {
    Table(String),
    /// Index name, table, key columns with `true` for DESC.
    Index(String, String, Vec<(String, bool)>),
}

/// Parse the statements the planner understands; anything else is None
/// (and simply runs: our other statements are idempotent by themselves).
pub fn creates(stmt: &str) -> Option<Creates> {
    let code: String = stmt
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = code.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let is = |at: usize, w: &str| upper.get(at).is_some_and(|u| u == w);
    if is(0, "CREATE") && is(1, "TABLE") && is(2, "IF") && is(3, "NOT") && is(4, "EXISTS") {
        let name = words.get(5)?.split('(').next()?.to_string();
        return Some(Creates::Table(name));
    }
    if is(0, "CREATE") && is(1, "INDEX") && is(2, "IF") && is(3, "NOT") && is(4, "EXISTS") && is(6, "ON") {
        let name = words.get(5)?.to_string();
        let rest = &code[code.find('(')? + 1..code.rfind(')')?];
        let table = words.get(7)?.split('(').next()?.to_string();
        if rest.contains('(') || upper.iter().any(|w| w == "WHERE" || w == "INCLUDE") {
            return None;
        }
        let cols = rest
            .split(',')
            .map(|c| {
                let parts: Vec<&str> = c.split_whitespace().collect();
                match parts.as_slice() {
                    [col] => Some((col.to_string(), false)),
                    [col, dir] if dir.eq_ignore_ascii_case("ASC") => Some((col.to_string(), false)),
                    [col, dir] if dir.eq_ignore_ascii_case("DESC") => Some((col.to_string(), true)),
                    _ => None,
                }
            })
            .collect::<Option<Vec<_>>>()?;
        return Some(Creates::Index(name, table, cols));
    }
    None
}

/// Whether an index with key columns `have` serves as one with `want`: the
/// same columns in the same order, all directions equal or all reversed (a
/// btree scans both ways).
pub fn equivalent(want: &[(String, bool)], have: &[(String, bool)]) -> bool {
    want.len() == have.len()
        && want.iter().zip(have).all(|(w, h)| w.0 == h.0)
        && (want.iter().zip(have).all(|(w, h)| w.1 == h.1) || want.iter().zip(have).all(|(w, h)| w.1 != h.1))
}

/// Why [`already_there`] cannot tell.
enum Refusal {
    Query(tokio_postgres::Error),
    /// What the statement creates exists but cannot serve (one line).
    Invalid(String),
}

impl From<tokio_postgres::Error> for Refusal {
    fn from(e: tokio_postgres::Error) -> Self {
        Refusal::Query(e)
    }
}

/// Why `stmt` need not run (what it creates is already there), or None.
///
/// An INVALID index (left by a failed `CREATE INDEX CONCURRENTLY`, as
/// docs/from-go.md suggests building the claim index by hand) serves no query: one
/// of another name is not equivalent, and one of the very name the
/// statement creates (which `IF NOT EXISTS` would take as done, letting
/// migration 3 drop the old index and leave claims without any) is refused
/// with what to do.
async fn already_there(tx: &tokio_postgres::Transaction<'_>, stmt: &str) -> Result<Option<String>, Refusal> {
    use tokio_postgres::types::Type;
    match creates(stmt) {
        Some(Creates::Table(t)) => {
            let exists: bool = tx
                .query_typed_one("SELECT to_regclass($1) IS NOT NULL", &[(&t, Type::TEXT)])
                .await?
                .get(0);
            Ok(exists.then(|| format!("table {t} exists")))
        }
        Some(Creates::Index(name, table, want)) => {
            // Plain btree indexes of the table: name, key columns, DESC flags.
            let rows = tx
                .query_typed(
                    "SELECT c.relname::text,
                            array(SELECT a.attname::text
                                    FROM generate_subscripts(i.indkey::int2[], 1) AS g(k)
                                    JOIN pg_attribute a ON a.attrelid = i.indrelid
                                                       AND a.attnum = (i.indkey::int2[])[g.k]
                                   WHERE g.k < i.indnkeyatts ORDER BY g.k),
                            array(SELECT ((i.indoption::int2[])[g.k] & 1) = 1
                                    FROM generate_subscripts(i.indoption::int2[], 1) AS g(k)
                                   WHERE g.k < i.indnkeyatts ORDER BY g.k),
                            i.indisvalid AND i.indisready
                       FROM pg_index i
                       JOIN pg_class c ON c.oid = i.indexrelid
                       JOIN pg_am am ON am.oid = c.relam
                      WHERE i.indrelid = to_regclass($1) AND am.amname = 'btree'
                        AND i.indpred IS NULL AND i.indexprs IS NULL",
                    &[(&table, Type::TEXT)],
                )
                .await?;
            for r in rows {
                let (existing, cols, desc, valid): (String, Vec<String>, Vec<bool>, bool) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
                if !valid {
                    if existing == name {
                        return Err(Refusal::Invalid(format!(
                            "index {name} on {table} is INVALID (a CREATE INDEX CONCURRENTLY that failed or is still running): \
                             drop it (DROP INDEX CONCURRENTLY {name}) or rebuild it (REINDEX INDEX CONCURRENTLY {name}), then run migrate again"
                        )));
                    }
                    continue;
                }
                let have: Vec<(String, bool)> = cols.into_iter().zip(desc).collect();
                if equivalent(&want, &have) {
                    let why = if existing == name {
                        format!("index {name} exists")
                    } else {
                        format!("the existing index {existing} on {table} is equivalent")
                    };
                    return Ok(Some(why));
                }
            }
            Ok(None)
        }
        None => Ok(None),
    }
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

    #[test]
    fn statements_split_outside_quotes_comments_and_dollar_bodies() {
        let all: Vec<String> = MIGRATIONS.iter().flat_map(|m| statements(m.sql)).collect();
        assert!(all
            .iter()
            .any(|s| first_line(s).starts_with("CREATE OR REPLACE FUNCTION") && s.ends_with("$$")));
        let sql = "-- a; comment\nSELECT ';'; /* b; */ SELECT $x$ ; $x$;\n-- tail only";
        assert_eq!(
            statements(sql),
            ["-- a; comment\nSELECT ';'", "/* b; */ SELECT $x$ ; $x$"]
        );
        assert_eq!(statements(MIGRATIONS[0].sql).len(), 6);
    }

    #[test]
    fn creates_reads_tables_and_plain_indexes() {
        assert_eq!(
            creates("-- x\nCREATE TABLE IF NOT EXISTS jobs (\n id UUID)"),
            Some(Creates::Table("jobs".into()))
        );
        assert_eq!(
            creates("CREATE INDEX IF NOT EXISTS d_idx ON task_outbox_dead (dead_lettered_at DESC)"),
            Some(Creates::Index(
                "d_idx".into(),
                "task_outbox_dead".into(),
                vec![("dead_lettered_at".into(), true)]
            ))
        );
        assert_eq!(
            creates("CREATE INDEX IF NOT EXISTS r ON task_outbox (run_at, id)"),
            Some(Creates::Index(
                "r".into(),
                "task_outbox".into(),
                vec![("run_at".into(), false), ("id".into(), false)]
            ))
        );
        assert_eq!(creates("CREATE INDEX IF NOT EXISTS p ON t (a) WHERE a > 0"), None);
        assert_eq!(creates("CREATE INDEX IF NOT EXISTS e ON t (lower(a))"), None);
        assert_eq!(creates("DROP INDEX IF EXISTS x"), None);
    }

    #[test]
    fn equivalence_compares_columns_and_direction_not_names() {
        let c = |v: &[(&str, bool)]| v.iter().map(|(n, d)| (n.to_string(), *d)).collect::<Vec<_>>();
        assert!(equivalent(&c(&[("job_id", false)]), &c(&[("job_id", false)])));
        assert!(
            equivalent(&c(&[("at", true)]), &c(&[("at", false)])),
            "a btree scans backwards"
        );
        assert!(equivalent(
            &c(&[("a", false), ("b", true)]),
            &c(&[("a", true), ("b", false)])
        ));
        assert!(!equivalent(
            &c(&[("a", false), ("b", true)]),
            &c(&[("a", false), ("b", false)])
        ));
        assert!(!equivalent(
            &c(&[("run_at", false), ("id", false)]),
            &c(&[("run_at", false)])
        ));
        assert!(!equivalent(
            &c(&[("run_at", false)]),
            &c(&[("run_at", false), ("id", false)])
        ));
        assert!(!equivalent(
            &c(&[("a", false), ("b", false)]),
            &c(&[("b", false), ("a", false)])
        ));
    }
}
