//! What each command needs from Postgres, checked up front: a role that
//! lacks a privilege is told so by name (`role relay lacks DELETE on
//! task_outbox`) at start and by `check-config`, instead of failing on its
//! first tick (or its first dead letter, days later).
//!
//! The lists are the statements' needs, nothing more (docs/postgres.md
//! "Database roles" and `deploy/postgres/roles.sql` grant exactly these):
//! `SELECT … FOR UPDATE` needs UPDATE, a `DELETE … RETURNING` needs
//! SELECT, an INSERT into a table with a serial id needs USAGE on its
//! sequence, and the fresh lane's `pg_sequence_last_value` needs SELECT
//! (or USAGE) on `task_outbox`'s.

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::error::{column, QueryError};

/// One privilege: on a table, or on the `id` sequence of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub object: Object,
    /// A privilege, or several separated by `, ` of which any will do.
    pub privilege: &'static str,
    /// The relay cannot start without it; otherwise only the feature that
    /// uses it fails (counter sync without `jobs`).
    pub required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Table(&'static str),
    IdSequence(&'static str),
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Object::Table(t) => write!(f, "{t}"),
            Object::IdSequence(t) => write!(f, "the id sequence of {t}"),
        }
    }
}

const fn need(object: Object, privilege: &'static str) -> Need {
    Need {
        object,
        privilege,
        required: true,
    }
}

/// `run`: claim, delete, reschedule, dead-letter (and retention's purge),
/// the fresh lane's sequence read, the probes, counter sync.
pub const RUN: &[Need] = &[
    need(Object::Table("task_outbox"), "SELECT"),
    need(Object::Table("task_outbox"), "UPDATE"),
    need(Object::Table("task_outbox"), "DELETE"),
    need(Object::Table("task_outbox_dead"), "SELECT"),
    need(Object::Table("task_outbox_dead"), "INSERT"),
    need(Object::Table("task_outbox_dead"), "DELETE"),
    need(Object::IdSequence("task_outbox_dead"), "USAGE"),
    need(Object::IdSequence("task_outbox"), "SELECT, USAGE"),
    need(Object::Table("outbox_relay_pause"), "SELECT"),
    Need {
        object: Object::Table("jobs"),
        privilege: "SELECT",
        required: false,
    },
    Need {
        object: Object::Table("jobs"),
        privilege: "UPDATE",
        required: false,
    },
];

/// `run` with `journal.keep` set: record deliveries, read them back, and
/// empty a partition at a time (TRUNCATE is checked on the partition).
pub const JOURNAL: &[Need] = &[
    need(Object::Table("outbox_relay_journal"), "SELECT"),
    need(Object::Table("outbox_relay_journal"), "INSERT"),
    need(Object::Table("outbox_relay_journal_0"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_1"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_2"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_3"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_4"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_5"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_6"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_7"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_8"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_9"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_10"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_11"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_12"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_13"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_14"), "TRUNCATE"),
    need(Object::Table("outbox_relay_journal_15"), "TRUNCATE"),
];

/// A privilege the connected role does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub role: String,
    pub need: Need,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let privilege = self.need.privilege.replace(", ", " or ");
        write!(f, "role {} lacks {privilege} on {}", self.role, self.need.object)?;
        if !self.need.required {
            write!(f, " (counter sync will fail)")?;
        }
        Ok(())
    }
}

/// Which of `needs` the connected role lacks. Objects that do not exist
/// are skipped (the schema check reports missing tables).
pub async fn missing(client: &Client, needs: &[Need]) -> Result<Vec<Missing>, QueryError> {
    let kinds: Vec<&str> = needs
        .iter()
        .map(|n| match n.object {
            Object::Table(_) => "table",
            Object::IdSequence(_) => "sequence",
        })
        .collect();
    let tables: Vec<&str> = needs
        .iter()
        .map(|n| match n.object {
            Object::Table(t) | Object::IdSequence(t) => t,
        })
        .collect();
    let privileges: Vec<&str> = needs.iter().map(|n| n.privilege).collect();
    let rows = client
        .query_typed(
            "SELECT current_user::text,
                    CASE WHEN to_regclass(t) IS NULL THEN true
                         WHEN k = 'table' THEN has_table_privilege(t, p)
                         ELSE coalesce(has_sequence_privilege(pg_get_serial_sequence(t, 'id'), p), true)
                    END
               FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS n(k, t, p, i)
              ORDER BY i",
            &[
                (&kinds, Type::TEXT_ARRAY),
                (&tables, Type::TEXT_ARRAY),
                (&privileges, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let mut out = Vec::new();
    for (row, need) in rows.iter().zip(needs) {
        let role: String = column(row, "pg_roles", 0)?;
        let held: bool = column(row, "privileges", 1)?;
        if !held {
            out.push(Missing { role, need: *need });
        }
    }
    Ok(out)
}
