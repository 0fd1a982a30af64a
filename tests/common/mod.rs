//! Shared fixtures of the integration tests: a fresh database per test, a
//! unique Redis key prefix, a private `redis-server` when a test needs to
//! stop Redis, the relay as a real subprocess, and `wait_until`.
//!
//! Everything talks to real services: Postgres at `OUTBOX_TEST_PG`
//! (default `postgres://root@127.0.0.1:5432/test`) and Redis at
//! `OUTBOX_TEST_REDIS` (default `redis://127.0.0.1:6379/0`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio_postgres::NoTls;

pub mod browser;
mod certs;
pub mod cluster;
mod data;
mod postgres;
pub mod proxy;
mod redis_servers;
mod relay;
pub mod web;

// Every test binary includes `common`, and each uses only part of it.
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use data::*;
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use redis_servers::*;
#[allow(unused_imports)]
pub use relay::*;

pub const RELAY_BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// The binary the tests run: this build's, or `OUTBOX_RELAY_TEST_BIN` (an
/// older build, to show that a new test fails where the behaviour is broken).
pub fn relay_bin() -> String {
    std::env::var("OUTBOX_RELAY_TEST_BIN").unwrap_or_else(|_| RELAY_BIN.to_string())
}

pub fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

pub fn shared_redis_url() -> String {
    std::env::var("OUTBOX_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn unique(tag: &str) -> String {
    format!("{tag}_{}", uuid::Uuid::new_v4().simple())
}

/// Poll `cond` every 20ms until it holds or `timeout` passes; panics with
/// `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `db`'s outbox is empty (every row delivered or dead-lettered).
pub async fn wait_drained(db: &TestDb, timeout: Duration) {
    wait_until("the outbox is empty", timeout, || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
}

/// [`wait_drained`], and on a timeout the relay's lines (health lines
/// left out) in the failure: what a drain that stalled was doing.
pub async fn wait_drained_by(db: &TestDb, timeout: Duration, relay: &RelayProcess) {
    let until = std::time::Instant::now() + timeout;
    loop {
        let left = db.count("SELECT count(*) FROM task_outbox").await;
        if left == 0 {
            return;
        }
        if std::time::Instant::now() >= until {
            let lines: Vec<String> = relay
                .lines()
                .into_iter()
                .filter(|l| !l.contains("\"actor health\""))
                .collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            panic!(
                "timed out after {}s waiting for the outbox to drain ({left} rows left); the relay's last lines:\n{}",
                timeout.as_secs(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// The docs' `ACL SETUSER <user> …` line (docs/redis.md "Redis ACL", once
/// README's), exactly as written but for `password`, as command arguments.
pub fn readme_acl(user: &str, password: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/redis.md")).expect("docs/redis.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with(&format!("ACL SETUSER {user} ")))
        .unwrap_or_else(|| panic!("docs/redis.md has no `ACL SETUSER {user}` line"));
    line.split_whitespace()
        .skip(1)
        .map(|w| w.replace("PASSWORD", password))
        .collect()
}

/// The shipped grants, `deploy/postgres/roles.sql`.
pub fn roles_sql() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/postgres/roles.sql"))
        .expect("deploy/postgres/roles.sql")
}

/// A unique key prefix on the shared Redis, so tests never see each other's
/// keys; its keys are deleted when it is dropped.
pub struct Prefix(pub String);

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let pattern = format!("{}*", self.0);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                let Ok(client) = redis::Client::open(shared_redis_url()) else {
                    return;
                };
                let Ok(mut conn) = client.get_multiplexed_async_connection_with_config(&patient()).await else {
                    return;
                };
                let keys: Vec<String> = conn.keys(&pattern).await.unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<i64, _> = conn.del(keys).await;
                }
            });
        })
        .join();
    }
}

pub fn key_prefix() -> Prefix {
    Prefix(format!("{}:", unique("t")))
}

/// A unique prefix with a hash tag, `{t…}:`: docs/redis.md's advice for Redis
/// Cluster (every key of the relay in one slot). Data tests that touch a
/// key's layout (the cancel fence) run under both kinds.
pub fn tagged_key_prefix() -> Prefix {
    Prefix(format!("{{{}}}:", unique("t")))
}

pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// A test's own Redis connections wait as long as a loaded machine needs:
/// redis-rs answers "timed out" after 500 ms by default, which a ZRANGE of
/// 30,000 members decoded by a debug build while the machine builds or
/// runs other tests can exceed (a console_browser run failed so).
pub fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)))
}

/// All members of every `{prefix}sched:*` key, member → score.
pub async fn schedule_members(url: &str, prefix: &str) -> HashMap<String, f64> {
    let mut conn = redis_conn(url).await;
    let keys: Vec<String> = conn.keys(format!("{prefix}sched:*")).await.expect("KEYS");
    let mut all = HashMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut conn).await.expect("TYPE");
        if kind != "zset" {
            continue;
        }
        let pairs: Vec<(String, f64)> = conn.zrange_withscores(&k, 0, -1).await.expect("ZRANGE");
        all.extend(pairs);
    }
    all
}

/// A free TCP port on loopback.
/// A port nothing listens on now, never handed out before by this test
/// process: the kernel gives a port just released to the next bind(0)
/// again, so two tests starting servers at once could otherwise both be
/// told the same port, and one server would fail to start.
pub fn free_port() -> u16 {
    free_port_where(|_| true)
}

/// A port for a Redis Cluster node: it and its cluster bus port (+10000)
/// are free and neither was handed out before (a node whose bus port is
/// taken by another test's server exits at start).
pub fn free_cluster_port() -> u16 {
    free_port_where(|p| p <= 55_535 && bindable(p + 10_000))
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn free_port_where(ok: impl Fn(u16) -> bool) -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let bus = port.checked_add(10_000);
        if !given.contains(&port) && bus.is_none_or(|b| !given.contains(&b)) && ok(port) {
            given.push(port);
            if let Some(b) = bus {
                // Kept out of later picks too: a cluster node may use it.
                given.push(b);
            }
            return port;
        }
    }
    panic!("no free port found in 1000 tries");
}

/// A new empty directory under the system temp dir, named `{stem}-{uuid}`.
pub fn scratch_dir(stem: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{stem}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir under the temp dir");
    dir
}

/// A cheap pseudo-random number in `range` (no extra dependency).
pub fn jitter(range: std::ops::Range<i64>) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as i64)
        .unwrap_or(0);
    range.start + nanos % (range.end - range.start)
}

/// Sample values of a scrape: "name{labels}" → value, labels in scrape order.
pub fn samples(scrape: &str) -> Vec<(String, String, f64)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), rest.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            Some((name, labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of `name` whose labels contain every `want` pair.
pub fn metric_value(scrape: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(scrape)
        .into_iter()
        .find(|(n, labels, _)| n == name && want.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
        .map(|(_, _, v)| v)
}

pub async fn scrape(relay: &RelayProcess) -> String {
    match relay.http_get("/metrics").await {
        Some((200, body)) => body,
        other => {
            let lines = relay.lines();
            let tail = &lines[lines.len().saturating_sub(20)..];
            panic!("/metrics answered {other:?}; the relay's last lines: {tail:#?}")
        }
    }
}

/// Wait until a statement starting with `starts_with` waits for a lock in
/// `db` (another session holds what it needs): the race a test sets up.
pub async fn wait_lock_waiter(db: &TestDb, starts_with: &str, what: &str) {
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '{starts_with}%' AND wait_event_type = 'Lock'");
    wait_until(what, Duration::from_secs(30), || async { db.count(&sql).await == 1 }).await;
}

/// `INFO memory`'s `used_memory` and `maxmemory` on `conn`'s server.
pub async fn redis_memory(conn: &mut redis::aio::MultiplexedConnection) -> (f64, f64) {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await.expect("INFO");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':')?.parse::<f64>().ok())
            .expect("INFO field")
    };
    (field("used_memory"), field("maxmemory"))
}

/// Fill the server behind `conn` with strings of 256 KiB (a whole one
/// would count twice, in the query buffer too, and meet OOM) until
/// `used_memory` is `share` of its `maxmemory`, as another tenant of the
/// same Redis would; only keys `keep` accepts (a cluster node takes only
/// keys of its slots). Returns the keys written.
pub async fn fill_redis_to(
    conn: &mut redis::aio::MultiplexedConnection,
    share: f64,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0.. {
        let (used, max) = redis_memory(conn).await;
        if used >= max * share {
            break;
        }
        let key = format!("filler:{i}");
        if !keep(&key) {
            continue;
        }
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(vec![b'x'; 256 * 1024])
            .query_async(conn)
            .await
            .expect("SET filler");
        keys.push(key);
    }
    keys
}

/// Every `.rs` file under `dir`, depth first, in name order (the source
/// scanners of architecture, code_size and reference_cli).
pub fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}
