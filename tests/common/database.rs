//! A database of its own per test (`TestDb`: created, migrated, dropped),
//! on the shared server at `OUTBOX_TEST_PG` or a private one; the Go
//! sweeper's schema and the shipped roles as fixtures.

use super::*;

pub fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own, migrated, dropped at the end of the test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The server's maintenance URL (where the database is created and dropped).
    admin: String,
    /// It has the Go sweeper's schema (`create_go_schema`).
    pub go: bool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::new_on(&admin_url()).await
    }

    /// A fresh, migrated database on the server behind `admin`. With
    /// `OUTBOX_TEST_SCHEMA=go` the database first gets the Go sweeper's
    /// tables (`tests/data/go_schema.sql`: TEXT ids in the outbox, UUID ids
    /// in the dead table, TEXT `jobs.id`, checks and foreign keys), and
    /// `migrate` adds what it lacks, as a user adopting the relay would do.
    pub async fn new_on(admin: &str) -> TestDb {
        let mut db = TestDb::empty_on(admin).await;
        if go_schema() {
            db.create_go_schema().await;
        }
        db.migrate().await;
        db
    }

    /// A database with the Go sweeper's schema, migrated, whatever
    /// `OUTBOX_TEST_SCHEMA` says.
    pub async fn go() -> TestDb {
        let mut db = TestDb::empty().await;
        db.create_go_schema().await;
        db.migrate().await;
        db
    }

    /// The Go sweeper's tables (`tests/data/go_schema.sql`), not migrated.
    pub async fn create_go_schema(&mut self) {
        self.go = true;
        self.client()
            .await
            .batch_execute(&format!(
                "{GO_SCHEMA};
                 -- Runs 1..1000 for the lighthouse rows `produce` writes.
                 INSERT INTO lighthouse_runs (job_id) SELECT 'fixture' FROM generate_series(1, 1000);"
            ))
            .await
            .expect("create the Go schema");
    }

    async fn migrate(&self) {
        let report = outbox_relay::db::migrate::migrate(
            &self.url,
            Duration::from_secs(10),
            &outbox_relay::telemetry::logging::discard(),
        )
        .await
        .expect("migrate test database");
        let every: Vec<i32> = outbox_relay::db::migrate::MIGRATIONS
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(report.applied, every);
    }

    /// A database without the outbox schema.
    pub async fn empty() -> TestDb {
        TestDb::empty_on(&admin_url()).await
    }

    pub async fn empty_on(base: &str) -> TestDb {
        let name = unique("outbox_test");
        let admin = pg_connect(base).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        // The admin URL's parameters (a multi-host URL's
        // target_session_attrs) are kept.
        let (path, query) = base.split_once('?').map_or((base, None), |(p, q)| (p, Some(q)));
        let url = match (path.rfind('/'), query) {
            (Some(i), None) => format!("{}/{name}", &path[..i]),
            (Some(i), Some(q)) => format!("{}/{name}?{q}", &path[..i]),
            (None, _) => panic!("admin url has no database: {base}"),
        };
        TestDb {
            name,
            url,
            admin: base.to_string(),
            go: false,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&self.url).await
    }

    /// This database's URL as `role` (`outbox_relay`, `outbox_triage`, or
    /// any other name: a role without grants), after making sure the
    /// shipped roles exist and hold exactly what `deploy/postgres/roles.sql`
    /// grants them here. Roles are cluster-wide and created once.
    pub async fn url_as(&self, role: &str) -> String {
        for r in ["outbox_relay", "outbox_triage", role] {
            self.ensure_role(r).await;
        }
        self.client()
            .await
            .batch_execute(&roles_sql())
            .await
            .expect("grant roles");
        self.role_url(role)
    }

    /// Create the login role `role` (no superuser, no grants) unless it
    /// exists. Roles are cluster-wide; parallel tests may race to create one.
    pub async fn ensure_role(&self, role: &str) {
        pg_connect(&self.admin)
            .await
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                     CREATE ROLE {role} LOGIN;
                   END IF;
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                 END $$"
            ))
            .await
            .expect("create role");
    }

    /// This database's URL with `role` as the user (nothing granted).
    pub fn role_url(&self, role: &str) -> String {
        let mut u = url::Url::parse(&self.url).expect("test db url");
        u.set_username(role).expect("set role");
        u.to_string()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client().await.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// Give the outbox's first row (lowest id) these `SET` assignments, e.g.
    /// `run_at = '-infinity'`.
    pub async fn set_first_row(&self, assignments: &str) {
        let sql = format!("UPDATE task_outbox SET {assignments} WHERE id = (SELECT min(id) FROM task_outbox)");
        self.client().await.execute(&sql, &[]).await.expect(&sql);
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin = self.admin.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                // Bounded: a server a failed test left frozen or stopped
                // must not hang the test binary.
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(30), async {
                        if let Ok((c, conn)) = tokio_postgres::connect(&admin, NoTls).await {
                            tokio::spawn(conn);
                            let _ = c.batch_execute(&sql).await;
                        }
                    })
                    .await;
                });
            }
        })
        .join();
    }
}

/// The Go sweeper's production schema (SPEC §3), as a fixture.
pub const GO_SCHEMA: &str = include_str!("../data/go_schema.sql");

/// Whether this run's databases have the Go sweeper's schema
/// (`OUTBOX_TEST_SCHEMA=go`; scripts/test runs the data tests both ways).
pub fn go_schema() -> bool {
    std::env::var("OUTBOX_TEST_SCHEMA").is_ok_and(|v| v == "go")
}

/// The shipped grants, `deploy/postgres/roles.sql`.
pub fn roles_sql() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/postgres/roles.sql"))
        .expect("deploy/postgres/roles.sql")
}

/// Wait until a statement starting with `starts_with` waits for a lock in
/// `db` (another session holds what it needs): the race a test sets up.
/// Only `db`'s sessions count: another test's relay may wait on a lock of
/// its own with the same statement at the same time.
pub async fn wait_lock_waiter(db: &TestDb, starts_with: &str, what: &str) {
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '{starts_with}%' AND wait_event_type = 'Lock'");
    wait_until(what, Duration::from_secs(30), || async { db.count(&sql).await == 1 }).await;
}
