//! The shape of the tables the relay works on, read from the catalog at
//! start.
//!
//! The relay must run unchanged on the Go sweeper's production database,
//! whose id columns differ from ours (SPEC §3): `task_outbox.task_id` and
//! `job_id` are TEXT there, `task_outbox_dead`'s are still UUID, `jobs.id`
//! is TEXT. Postgres has no `text = uuid` operator (42883) and no
//! assignment cast from text to uuid (42804), so every statement that
//! compares or copies an id casts it to the type of the column it meets;
//! [`Schema`] says which. A value that cannot be cast (a TEXT task id that
//! is not a UUID, bound for a UUID column) is caught before the statement
//! with [`IdType::accepts`], so it never fails a statement that carries
//! other rows.
//!
//! [`read`] also reports what the relay cannot work with (a missing table
//! or column, an id of another type), one problem per line.

use tokio_postgres::GenericClient;

use super::error::{column, pg_error_text, QueryError};

/// The type of an id column, as far as the relay cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdType {
    Uuid,
    /// `text` or `character varying`.
    Text,
}

impl IdType {
    /// The SQL type name to cast to: `$1::uuid`, `task_id::text`.
    pub fn sql(self) -> &'static str {
        match self {
            IdType::Uuid => "uuid",
            IdType::Text => "text",
        }
    }

    /// Whether a column of this type takes `value` (for UUID: a subset of
    /// what Postgres's `uuid_in` accepts, so a value passed here never
    /// fails the cast: 32 hex digits, either plain or in the 8-4-4-4-12
    /// form, in either case, optionally in braces).
    pub fn accepts(self, value: &str) -> bool {
        match self {
            IdType::Text => true,
            IdType::Uuid => uuid_shaped(value),
        }
    }

    /// `value` as a column of this type gives it back (`uuid::text` is the
    /// lower-case hyphenated form), or None when the column cannot take it.
    pub fn stored_form(self, value: &str) -> Option<String> {
        match self {
            IdType::Text => Some(value.to_string()),
            IdType::Uuid if uuid_shaped(value) => {
                let hex: String = value
                    .chars()
                    .filter(char::is_ascii_hexdigit)
                    .map(|c| c.to_ascii_lowercase())
                    .collect();
                Some(format!(
                    "{}-{}-{}-{}-{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32]
                ))
            }
            IdType::Uuid => None,
        }
    }

    fn from_catalog(type_name: &str) -> Option<IdType> {
        match type_name {
            "uuid" => Some(IdType::Uuid),
            "text" | "character varying" => Some(IdType::Text),
            _ => None,
        }
    }
}

impl std::fmt::Display for IdType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.sql())
    }
}

fn uuid_shaped(value: &str) -> bool {
    let inner = match value.strip_prefix('{') {
        Some(rest) => match rest.strip_suffix('}') {
            Some(inner) => inner,
            None => return false,
        },
        None => value,
    };
    let b = inner.as_bytes();
    match b.len() {
        32 => b.iter().all(u8::is_ascii_hexdigit),
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

/// How a sweep tick claims its rows (see `db::outbox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimMode {
    /// The claim deletes the rows (`DELETE … RETURNING` in the tick's
    /// transaction) and the rows that must stay are put back: one statement
    /// per delivered batch.
    Delete,
    /// `SELECT … FOR UPDATE`, then a `DELETE` of what was delivered: for an
    /// outbox the relay could not put a row back into exactly. Holds why.
    Lock(String),
}

impl std::fmt::Display for ClaimMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimMode::Delete => f.write_str("delete"),
            ClaimMode::Lock(why) => write!(f, "lock ({why})"),
        }
    }
}

/// The id column types of the three tables, and the checks that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    pub outbox_task_id: IdType,
    pub outbox_job_id: IdType,
    pub dead_task_id: IdType,
    pub dead_job_id: IdType,
    pub jobs_id: IdType,
    /// `task_outbox` has a check on `lighthouse_run_id` (the Go schema's
    /// routing check: `lighthouse` rows need a run id), so a dead
    /// `lighthouse` row whose run was deleted (the dead table's foreign
    /// key sets it NULL) cannot be requeued.
    pub outbox_checks_lighthouse_run: bool,
    /// How ticks claim: [`ClaimMode::Delete`] unless a row could not be put
    /// back exactly (columns the relay does not know, no INSERT privilege
    /// on `task_outbox`, a partitioned or inherited table).
    pub claim: ClaimMode,
    /// `task_outbox`'s shape as [`OUTBOX_SHAPE_SQL`] reads it at start:
    /// every delete-claiming tick that puts rows back reads it again in
    /// its settle round trip, before the put-back, and falls back to the
    /// locking claim when it changed (a column added, a type changed,
    /// INSERT revoked, a foreign key added). Ticks that deliver every row
    /// put nothing back and skip it (a catalog read, ~0.17 ms of the
    /// server's time on each tick otherwise).
    pub outbox_shape: String,
}

/// The shape of `task_outbox` a delete claim depends on, as one line:
/// its columns and their types, whether the role may INSERT, and how many
/// foreign keys it has. A catalog lookup; read after the claim in the
/// same transaction, whose lock on the table keeps any ALTER TABLE out
/// until the tick ends.
pub const OUTBOX_SHAPE_SQL: &str = "SELECT
    (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
       FROM pg_attribute a WHERE a.attrelid = 'task_outbox'::regclass AND a.attnum > 0 AND NOT a.attisdropped)
    || '; insert: ' || has_table_privilege('task_outbox', 'INSERT')::text
    || '; foreign keys: ' || (SELECT count(*) FROM pg_constraint
                               WHERE conrelid = 'task_outbox'::regclass AND contype = 'f')::text";

impl Default for Schema {
    /// The relay's own schema (`migrations/`): every id a UUID.
    fn default() -> Self {
        Schema {
            outbox_task_id: IdType::Uuid,
            outbox_job_id: IdType::Uuid,
            dead_task_id: IdType::Uuid,
            dead_job_id: IdType::Uuid,
            jobs_id: IdType::Uuid,
            outbox_checks_lighthouse_run: false,
            claim: ClaimMode::Delete,
            outbox_shape: String::new(),
        }
    }
}

impl Schema {
    /// Why `task_id` / `job_id` of an outbox row cannot be stored in
    /// `task_outbox_dead`, naming the column; None when both can.
    pub fn dead_letter_refusal(&self, task_id: &str, job_id: &str) -> Option<String> {
        for (column, ty, value) in [
            ("task_id", self.dead_task_id, task_id),
            ("job_id", self.dead_job_id, job_id),
        ] {
            if !ty.accepts(value) {
                return Some(format!(
                    "{column} {value:?} cannot be stored in task_outbox_dead.{column} ({ty})"
                ));
            }
        }
        None
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "task_outbox(task_id {}, job_id {}), task_outbox_dead(task_id {}, job_id {}), jobs(id {}); claim: {}",
            self.outbox_task_id, self.outbox_job_id, self.dead_task_id, self.dead_job_id, self.jobs_id, self.claim
        )
    }
}

/// Columns the relay reads or writes, per table.
const OUTBOX_COLUMNS: &[&str] = &[
    "id",
    "task_id",
    "job_id",
    "page_id",
    "host",
    "path",
    "priority",
    "retry_count",
    "source_type",
    "source_url",
    "run_at",
    "attempts",
    "created_at",
    "task_type",
    "lighthouse_run_id",
];
const DEAD_EXTRA: &[&str] = &["original_id", "dead_lettered_at", "last_error"];
const JOBS_COLUMNS: &[&str] = &["id", "status", "running_tasks"];

/// Read the schema; `Err` holds every problem found, one line each.
pub async fn read(client: &impl GenericClient) -> Result<Schema, Vec<String>> {
    let columns = read_columns(client).await.map_err(|e| vec![e.text()])?;
    let mut problems = Vec::new();
    let find = |table: &str, col: &str| {
        columns
            .iter()
            .find(|(t, c, _)| t == table && c == col)
            .map(|(_, _, ty)| ty.as_str())
    };
    let mut required = |table: &str, cols: &[&str]| {
        if !columns.iter().any(|(t, _, _)| t == table) {
            problems.push(format!(
                "table {table} is missing; run `outbox-relay migrate` (or create it)"
            ));
            return;
        }
        for col in cols {
            if find(table, col).is_none() {
                problems.push(format!("column {table}.{col} is missing"));
            }
        }
    };
    required("task_outbox", OUTBOX_COLUMNS);
    required("task_outbox_dead", &[OUTBOX_COLUMNS, DEAD_EXTRA].concat()[..]);
    required("jobs", JOBS_COLUMNS);
    required("outbox_relay_pause", &["scope"]);
    let mut id = |table: &str, col: &str| match find(table, col) {
        Some(ty) => IdType::from_catalog(ty).unwrap_or_else(|| {
            problems.push(format!(
                "column {table}.{col} has type {ty}; the relay works with uuid or text ids"
            ));
            IdType::Text
        }),
        None => IdType::Text,
    };
    let schema = Schema {
        outbox_task_id: id("task_outbox", "task_id"),
        outbox_job_id: id("task_outbox", "job_id"),
        dead_task_id: id("task_outbox_dead", "task_id"),
        dead_job_id: id("task_outbox_dead", "job_id"),
        jobs_id: id("jobs", "id"),
        outbox_checks_lighthouse_run: false,
        claim: ClaimMode::Delete,
        outbox_shape: String::new(),
    };
    // Put-back binds timestamptz: a `timestamp` column would take it
    // through the session's time zone (inexact around DST changes).
    let zoneless: Vec<&str> = ["run_at", "created_at"]
        .into_iter()
        .filter(|c| find("task_outbox", c).is_some_and(|ty| ty != "timestamp with time zone"))
        .collect();
    let unknown: Vec<&str> = columns
        .iter()
        .filter(|(t, c, _)| t == "task_outbox" && !OUTBOX_COLUMNS.contains(&c.as_str()))
        .map(|(_, c, _)| c.as_str())
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    let checks = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint
                             WHERE conrelid = to_regclass('task_outbox') AND contype = 'c'
                               AND pg_get_constraintdef(oid) LIKE '%lighthouse_run_id%'),
                    has_table_privilege('task_outbox', 'INSERT'),
                    (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('task_outbox')) = 'r'
                      AND NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = to_regclass('task_outbox')),
                    (SELECT string_agg(conname::text, ', ' ORDER BY conname) FROM pg_constraint
                      WHERE conrelid = to_regclass('task_outbox') AND contype = 'f')",
            &[],
        )
        .await
        .map_err(|e| vec![pg_error_text(&e)])?;
    let flag = |i| column::<bool>(&checks, "pg_class", i).map_err(|e| vec![e.to_string()]);
    let (lighthouse_check, can_insert, plain_table) = (flag(0)?, flag(1)?, flag(2)?);
    let foreign_keys = column::<Option<String>>(&checks, "pg_constraint", 3).map_err(|e| vec![e.to_string()])?;
    let shape = client
        .query_typed_one(OUTBOX_SHAPE_SQL, &[])
        .await
        .map_err(|e| vec![pg_error_text(&e)])?;
    let shape = column::<Option<String>>(&shape, "pg_attribute", 0).map_err(|e| vec![e.to_string()])?;
    let table = OutboxTable {
        unknown_columns: &unknown,
        zoneless_columns: &zoneless,
        can_insert,
        plain_table,
        foreign_keys: foreign_keys.as_deref(),
    };
    Ok(Schema {
        outbox_checks_lighthouse_run: lighthouse_check,
        claim: claim_mode(&table),
        outbox_shape: shape.unwrap_or_default(),
        ..schema
    })
}

/// What the claim mode depends on.
struct OutboxTable<'a> {
    unknown_columns: &'a [&'a str],
    zoneless_columns: &'a [&'a str],
    can_insert: bool,
    plain_table: bool,
    /// Names of `task_outbox`'s foreign keys, if any.
    foreign_keys: Option<&'a str>,
}

/// Delete claims put rows back by inserting them: only when the relay knows
/// every column (an unknown one would come back empty) and can write each
/// exactly, may insert, the table is one plain table (a `ctid` names a row
/// only within one), and has no foreign key: the put-back INSERT checks
/// foreign keys again, taking a lock on the referenced row after the
/// claim's row locks, the reverse of a cascading delete of that row (or a
/// `cancel-job` that deletes the job); the two can deadlock.
fn claim_mode(t: &OutboxTable<'_>) -> ClaimMode {
    if !t.unknown_columns.is_empty() {
        ClaimMode::Lock(format!(
            "task_outbox has columns the relay does not know: {}",
            t.unknown_columns.join(", ")
        ))
    } else if !t.zoneless_columns.is_empty() {
        ClaimMode::Lock(format!(
            "task_outbox.{} is timestamp without time zone; rows could not be put back exactly",
            t.zoneless_columns.join(", task_outbox.")
        ))
    } else if !t.can_insert {
        ClaimMode::Lock("the role lacks INSERT on task_outbox (deploy/postgres/roles.sql grants it)".into())
    } else if !t.plain_table {
        ClaimMode::Lock("task_outbox is partitioned or has child tables".into())
    } else if let Some(fks) = t.foreign_keys {
        ClaimMode::Lock(format!(
            "task_outbox has foreign keys ({fks}); putting rows back could deadlock with a cascading delete"
        ))
    } else {
        ClaimMode::Delete
    }
}

/// (table, column, type name) of the relay's tables, as the search path
/// resolves them (the same tables the relay's statements name).
async fn read_columns(client: &impl GenericClient) -> Result<Vec<(String, String, String)>, QueryError> {
    let rows = client
        .query_typed(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, NULL)
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE a.attrelid IN (to_regclass('task_outbox'), to_regclass('task_outbox_dead'), to_regclass('jobs'),
                                   to_regclass('outbox_relay_pause'))
                AND a.attnum > 0 AND NOT a.attisdropped",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                column(r, "pg_attribute", 0)?,
                column(r, "pg_attribute", 1)?,
                column(r, "pg_attribute", 2)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_deletes_only_where_a_row_goes_back_exactly_and_safely() {
        let plain = OutboxTable {
            unknown_columns: &[],
            zoneless_columns: &[],
            can_insert: true,
            plain_table: true,
            foreign_keys: None,
        };
        assert_eq!(claim_mode(&plain), ClaimMode::Delete);
        let lock = |t: OutboxTable<'_>| match claim_mode(&t) {
            ClaimMode::Lock(why) => why,
            ClaimMode::Delete => panic!("delete claim"),
        };
        assert!(lock(OutboxTable {
            unknown_columns: &["tenant"],
            ..plain
        })
        .contains("tenant"));
        assert!(lock(OutboxTable {
            zoneless_columns: &["run_at"],
            ..plain
        })
        .contains("task_outbox.run_at"));
        assert!(lock(OutboxTable {
            can_insert: false,
            ..plain
        })
        .contains("INSERT"));
        assert!(lock(OutboxTable {
            plain_table: false,
            ..plain
        })
        .contains("partitioned"));
        assert!(lock(OutboxTable {
            foreign_keys: Some("task_outbox_run_fk"),
            ..plain
        })
        .contains("task_outbox_run_fk"));
    }

    #[test]
    fn uuid_columns_take_only_what_uuid_in_takes() {
        for ok in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ] {
            assert!(IdType::Uuid.accepts(ok), "{ok}");
        }
        for bad in [
            "",
            "not-a-uuid",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99_9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\u{e9}",
        ] {
            assert!(!IdType::Uuid.accepts(bad), "{bad}");
        }
        assert!(IdType::Text.accepts("anything | at all"));
    }

    #[test]
    fn stored_form_is_what_the_column_gives_back() {
        assert_eq!(
            IdType::Uuid
                .stored_form("{A0EEBC999C0B4EF8BB6D6BB9BD380A11}")
                .as_deref(),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(IdType::Uuid.stored_form("job-7"), None);
        assert_eq!(IdType::Text.stored_form("Job-7").as_deref(), Some("Job-7"));
    }

    #[test]
    fn a_dead_letter_refusal_names_the_column() {
        let go = Schema {
            outbox_task_id: IdType::Text,
            outbox_job_id: IdType::Text,
            ..Schema::default()
        };
        let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(go.dead_letter_refusal(uuid, uuid), None);
        let why = go.dead_letter_refusal("task-1", uuid).expect("refused");
        assert!(why.contains("task_outbox_dead.task_id (uuid)"), "{why}");
        let why = go.dead_letter_refusal(uuid, "job-1").expect("refused");
        assert!(why.contains("task_outbox_dead.job_id (uuid)"), "{why}");
        let text_dead = Schema {
            dead_task_id: IdType::Text,
            dead_job_id: IdType::Text,
            ..go
        };
        assert_eq!(text_dead.dead_letter_refusal("task-1", "job-1"), None);
    }
}
