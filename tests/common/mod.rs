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
pub mod cluster;
pub mod proxy;
pub mod web;

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

/// The shipped grants, `deploy/postgres/roles.sql`.
/// README's `ACL SETUSER <user> …` line (README "Redis ACL"), exactly as
/// written but for `password`, as command arguments.
pub fn readme_acl(user: &str, password: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with(&format!("ACL SETUSER {user} ")))
        .unwrap_or_else(|| panic!("README has no `ACL SETUSER {user}` line"));
    line.split_whitespace()
        .skip(1)
        .map(|w| w.replace("PASSWORD", password))
        .collect()
}

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
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
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

/// A unique prefix with a hash tag, `{t…}:`: README's advice for Redis
/// Cluster (every key of the relay in one slot). Data tests that touch a
/// key's layout (the cancel fence) run under both kinds.
pub fn tagged_key_prefix() -> Prefix {
    Prefix(format!("{{{}}}:", unique("t")))
}

pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
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

/// Replication settings for every test redis-server: a replica loads what
/// its primary sends straight from the socket (no RDB file, which servers
/// sharing a directory would overwrite under each other: a replica could
/// load another shard's data) and a primary starts that transfer at once
/// instead of waiting 5 s for more replicas.
pub const REDIS_REPLICATION_ARGS: &[&str] = &["--repl-diskless-load", "swapdb", "--repl-diskless-sync-delay", "0"];

/// A private `redis-server` the test can stop and start.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// The server's own directory: its AOF when durable, and where a
    /// replica puts the RDB it receives (servers must never share one).
    dir: std::path::PathBuf,
    /// AOF with fsync always.
    durable: bool,
    /// Port of the primary this server replicates.
    replica_of: Option<u16>,
    /// A TLS port beside the plain one (certificate from [`server_cert`]).
    pub tls_port: Option<u16>,
    /// More `redis-server` arguments (e.g. `--rename-command`), applied at
    /// every (re)start: change them, `stop`, `resume`.
    pub extra_args: Vec<String>,
}

impl RedisServer {
    /// Start one on a free port, in a directory of its own.
    async fn launch(durable: bool, replica_of: Option<u16>) -> RedisServer {
        Self::launch_with(durable, replica_of, false).await
    }

    async fn launch_with(durable: bool, replica_of: Option<u16>, tls: bool) -> RedisServer {
        let dir = scratch_dir("outbox-redis");
        let tls_port = tls.then(|| {
            server_cert(&dir, &dir.join("server.key"), &dir.join("server.crt"));
            free_port()
        });
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            dir,
            durable,
            replica_of,
            tls_port,
            extra_args: Vec::new(),
        };
        s.resume().await;
        s
    }

    /// A server that also speaks TLS on [`RedisServer::tls_url`], with a
    /// certificate for 127.0.0.1 from the CA in [`RedisServer::ca_file`];
    /// the plain port stays open for the test's own checks.
    pub async fn start_with_tls() -> RedisServer {
        Self::launch_with(false, None, true).await
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.tls_port.expect("a TLS port"))
    }

    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.crt")
    }

    pub async fn start() -> RedisServer {
        Self::launch(false, None).await
    }

    /// A server started with more arguments (see [`RedisServer::extra_args`]).
    pub async fn start_with_args(args: &[&str]) -> RedisServer {
        let mut s = Self::launch(false, None).await;
        s.stop();
        s.extra_args = args.iter().map(|a| a.to_string()).collect();
        s.resume().await;
        s
    }

    /// A replica of the server at `primary` (`--replicaof`); `resume`
    /// brings it back as a replica again.
    pub async fn start_replica_of(primary: u16) -> RedisServer {
        Self::launch(false, Some(primary)).await
    }

    /// A server that keeps every write on disk (AOF, fsync always), so a
    /// restart — even `kill -9` — loses nothing it acknowledged.
    pub async fn start_durable() -> RedisServer {
        Self::launch(true, None).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)start the server on its port and wait until it answers PING.
    pub async fn resume(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(REDIS_REPLICATION_ARGS)
            .arg("--dir")
            .arg(&self.dir);
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(primary) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if let Some(tls_port) = self.tls_port {
            cmd.args(["--tls-port", &tls_port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.crt"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.dir.join("ca.crt"));
        }
        cmd.args(&self.extra_args);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let url = self.url();
        wait_until("private redis-server answers PING", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                match redis::Client::open(url.as_str()) {
                    Ok(c) => match c.get_multiplexed_async_connection().await {
                        Ok(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok(),
                        Err(_) => false,
                    },
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    /// Freeze the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaw a paused server (SIGCONT).
    pub fn unpause(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} redis-server");
    }

    /// Kill the server (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Sentinel (`redis-server FILE --sentinel`, FILE its own writable
/// config) monitoring one master as `mymaster`, quorum 1, that it takes for
/// down after 1 s.
pub struct RedisSentinel {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
    /// Its own `requirepass`, if any.
    password: Option<String>,
}

impl RedisSentinel {
    pub const MASTER: &'static str = "mymaster";

    pub async fn start(master_port: u16) -> RedisSentinel {
        Self::start_with_passwords(master_port, None, None).await
    }

    /// With `requirepass sentinel` and `sentinel auth-pass mymaster master`.
    pub async fn start_with_passwords(master_port: u16, sentinel: Option<&str>, master: Option<&str>) -> RedisSentinel {
        let extra = master
            .map(|p| format!("sentinel auth-pass {} {p}\n", Self::MASTER))
            .unwrap_or_default();
        Self::start_with_config(master_port, sentinel, &extra).await
    }

    /// Monitoring the master at `master_port` (plain or TLS, as `extra`
    /// says), with its own `requirepass` and more config lines. A master
    /// is down after 3 s without an answer: with 1 s, a CI rehearsal on a
    /// busy machine saw the just-promoted replica miss its pings for a
    /// second (it was syncing the returning old master) and Sentinel fail
    /// back over to the old master, restarted empty.
    pub async fn start_with_config(master_port: u16, sentinel: Option<&str>, extra: &str) -> RedisSentinel {
        let dir = scratch_dir("outbox-sentinel");
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                 sentinel monitor {m} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {m} 3000\n\
                 sentinel failover-timeout {m} 10000\n",
                dir.display(),
                dir.join("sentinel.log").display(),
                m = Self::MASTER
            ) + &sentinel.map(|p| format!("requirepass {p}\n")).unwrap_or_default()
                + extra,
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let s = RedisSentinel {
            port,
            child,
            dir,
            password: sentinel.map(str::to_string),
        };
        let url = s.url();
        wait_until("the sentinel answers", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                match redis::Client::open(url.as_str()) {
                    Ok(c) => c.get_multiplexed_async_connection().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        s
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The last `lines` lines of this sentinel's log (what it decided and
    /// when: +sdown, +switch-master, +convert-to-slave, +tilt), for a
    /// failing test to print.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The master's port as this sentinel names it now.
    pub async fn master_port(&self) -> Option<u16> {
        let mut c = redis_conn(&self.url()).await;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(Self::MASTER)
            .query_async::<Option<(String, u16)>>(&mut c)
            .await
            .ok()
            .flatten()
            .map(|(_, port)| port)
    }

    /// How many replicas of the master this sentinel knows.
    pub async fn replicas(&self) -> usize {
        let mut c = redis_conn(&self.url()).await;
        redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(Self::MASTER)
            .query_async::<Vec<redis::Value>>(&mut c)
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay binary running as a subprocess, its stdout (JSON log lines) captured.
pub struct RelayProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Where its /healthz and /readyz answer.
    pub http_port: u16,
}

/// Environment for a relay against `db` and `redis_url` with `prefix`, fast
/// ticks, LISTEN on, JSON logs at debug level; `extra` overrides or adds keys.
pub fn relay_env(db: &TestDb, redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("OUTBOX_RELAY_DATABASE__URL".into(), db.url.clone()),
        // LISTEN/NOTIFY on, as in production: wake-ups and the fresh lane
        // run in every test (a test may point it elsewhere or clear it).
        ("OUTBOX_RELAY_DATABASE__LISTEN_URL".into(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".into(), redis_url.into()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".into(), prefix.into()),
        ("OUTBOX_RELAY_SWEEP__INTERVAL".into(), "50ms".into()),
        ("OUTBOX_RELAY_LOG__FORMAT".into(), "json".into()),
        ("OUTBOX_RELAY_LOG__LEVEL".into(), "debug".into()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// Environment for a relay with the shipped defaults: only where the
/// services are and its own key prefix, nothing tuned for the test (no
/// config file either: the built-in defaults are `config/default.toml`'s).
pub fn shipped_env(db_url: &str, redis_url: &str, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("OUTBOX_RELAY_DATABASE__URL".into(), db_url.into()),
        ("OUTBOX_RELAY_REDIS__URL".into(), redis_url.into()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".into(), prefix.into()),
    ]
}

/// [`relay_env`] connecting (and listening) as `db_url`, e.g. one of
/// [`TestDb::url_as`].
pub fn relay_env_as(
    db: &TestDb,
    db_url: &str,
    redis_url: &str,
    prefix: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = relay_env(db, redis_url, prefix, extra);
    for (k, v) in env.iter_mut() {
        if k == "OUTBOX_RELAY_DATABASE__URL" || k == "OUTBOX_RELAY_DATABASE__LISTEN_URL" {
            *v = db_url.to_string();
        }
    }
    env
}

/// A command for the relay binary with a clean environment (no stray
/// `OUTBOX_RELAY_*`, `DATABASE_URL` or `REDIS_URL` from the caller) and no
/// config file, so only `env` decides.
pub fn relay_command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl RelayProcess {
    /// Start `outbox-relay run`; unless `env` names one, the HTTP endpoint
    /// gets a free port of its own so relays can run side by side.
    pub fn spawn(env: &[(String, String)]) -> RelayProcess {
        let mut env = env.to_vec();
        let http_port = match env.iter().find(|(k, _)| k == "OUTBOX_RELAY_HTTP__LISTEN") {
            Some((_, v)) => v
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port in OUTBOX_RELAY_HTTP__LISTEN"),
            None => {
                let port = free_port();
                env.push(("OUTBOX_RELAY_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
                port
            }
        };
        let mut child = relay_command(&["run"], &env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outbox-relay");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("OUTBOX_TEST_ECHO").is_some() {
                        eprintln!("relay: {line}");
                    }
                    sink.lock().expect("log lines").push(line);
                }
            });
        }
        RelayProcess {
            child,
            lines,
            http_port,
        }
    }

    /// `GET path` on the relay's HTTP endpoint: (status, body), or None
    /// when nothing answers.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        self.http_request("GET", path).await
    }

    /// `method path` on the relay's HTTP port: the status and the whole
    /// response after the status line (headers and body).
    pub async fn http_request(&self, method: &str, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .ok()?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = if method == "GET" {
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        } else {
            text
        };
        Some((status, body))
    }

    /// `outbox_relay_sweep_ticks_total{result="ok"}` now (0 before the
    /// first scrape answers).
    pub async fn ok_ticks(&self) -> f64 {
        match self.http_get("/metrics").await {
            Some((200, body)) => {
                metric_value(&body, "outbox_relay_sweep_ticks_total", &[("result", "ok")]).unwrap_or(0.0)
            }
            _ => 0.0,
        }
    }

    /// The value of metric `name` with `labels` in a scrape now (None when
    /// nothing answers or the series is absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.http_get("/metrics").await {
            Some((200, body)) => metric_value(&body, name, labels),
            _ => None,
        }
    }

    /// Wait until `GET path` answers `status` (e.g. `/readyz` 200).
    pub async fn wait_http(&self, path: &str, status: u16, timeout: Duration) {
        wait_until(&format!("{path} answers {status}"), timeout, || async {
            self.http_get(path).await.is_some_and(|(s, _)| s == status)
        })
        .await;
    }

    /// Parsed `actor health` lines for `actor`, oldest first.
    pub fn health_lines(&self, actor: &str) -> Vec<serde_json::Value> {
        self.records("actor health")
            .into_iter()
            .filter(|r| r["actor"] == actor)
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lines").clone()
    }

    /// Parsed JSON log records whose `msg` contains `needle`.
    pub fn records(&self, needle: &str) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["msg"].as_str().is_some_and(|m| m.contains(needle)))
            .collect()
    }

    /// Every JSON log record at `level` (`error`, `warn`, …), whatever its message.
    pub fn at_level(&self, level: &str) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["level"] == level)
            .collect()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.records(needle).len()
    }

    /// Wait until the relay logged its start-up line (it is then ticking).
    pub async fn wait_started(&mut self) {
        wait_until("relay logs its start-up line", Duration::from_secs(30), || {
            let started = self.count("outbox-relay starting") > 0;
            let exited = self.child.try_wait().ok().flatten();
            if let Some(status) = exited {
                panic!("relay exited early with {status}: {:#?}", self.lines());
            }
            async move { started }
        })
        .await;
        // And its HTTP endpoint answers: a port taken between `free_port`
        // and the relay's bind (an outgoing connection can get it) shows
        // here with the relay's own words, not later as a failed scrape.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.http_get("/healthz").await.is_some() {
                return;
            }
            if let Some(status) = self.child.try_wait().ok().flatten() {
                panic!("relay exited early with {status}: {:#?}", self.lines());
            }
            if std::time::Instant::now() > deadline {
                panic!("relay's HTTP endpoint never answered: {:#?}", self.lines());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Wait for the process to exit; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > timeout {
                panic!("relay did not exit within {timeout:?}; log: {:#?}", self.lines());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and expect a clean exit 0.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "relay exited with {status}; log: {:#?}", self.lines());
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Seed `rows` due rows spread over `jobs` jobs; returns the job ids.
/// Field values vary (priority, task_type, lighthouse_run_id, source_url)
/// so the encoding is exercised, not just one shape.
pub async fn seed(db: &TestDb, rows: i64, jobs: i64) -> Vec<uuid::Uuid> {
    let job_ids: Vec<uuid::Uuid> = (0..jobs).map(|_| uuid::Uuid::new_v4()).collect();
    seed_for(db, rows, &job_ids).await;
    job_ids
}

/// A `jobs` row for `job`, status `running` (what `cancel-job` needs).
pub async fn running_job(db: &TestDb, job: &uuid::Uuid) {
    db.client()
        .await
        .batch_execute(&format!("INSERT INTO jobs (id, status) VALUES ('{job}', 'running')"))
        .await
        .expect("a running job");
}

/// The job's schedule key made a string: every ZADD of its rows fails with
/// WRONGTYPE, so those rows stay (retried) and a delete claim puts them back.
/// A maintenance guard on `task_outbox_dead`: every INSERT raises
/// `task_outbox_dead is under maintenance` (the trigger function
/// `maintenance()` can guard other tables too).
pub async fn guard_dead_table(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'task_outbox_dead is under maintenance'; END $$;
             CREATE TRIGGER maintenance BEFORE INSERT ON task_outbox_dead
                FOR EACH ROW EXECUTE FUNCTION maintenance();",
        )
        .await
        .expect("the dead table's maintenance guard");
}

pub async fn poison_job(redis_url: &str, prefix: &str, job: &uuid::Uuid) {
    let mut conn = redis_conn(redis_url).await;
    let _: () = conn
        .set(format!("{prefix}sched:{job}"), "not a sorted set")
        .await
        .expect("SET");
}

/// [`seed`] for jobs chosen beforehand: a test that poisons a job's
/// schedule while a relay runs poisons it first, or the relay may deliver
/// the job's rows before the poison lands.
pub async fn seed_for(db: &TestDb, rows: i64, job_ids: &[uuid::Uuid]) {
    // Our schema takes any task_type and run id, so the seed covers the
    // encoder's cases (empty task_type, a crawl row with a run id). The Go
    // schema checks task_type (crawl | lighthouse) and routing (lighthouse
    // rows need a run in lighthouse_runs, crawl rows none): runs 1..1000
    // exist there (see `create_go_schema`).
    let (task_type, run_id) = if db.go {
        (
            "CASE WHEN i % 11 = 0 THEN 'lighthouse' ELSE 'crawl' END",
            "CASE WHEN i % 11 = 0 THEN 1 + i % 1000 END",
        )
    } else {
        (
            "CASE WHEN i % 5 = 0 THEN '' ELSE 'crawl' END",
            "CASE WHEN i % 11 = 0 THEN i * 1000 END",
        )
    };
    db.client()
        .await
        .execute(
            &format!(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count,
                                          source_type, source_url, run_at, task_type, lighthouse_run_id)
                 SELECT gen_random_uuid(), ($1::uuid[])[1 + (i % array_length($1::uuid[], 1))], i::int,
                        'host' || (i % 7) || '.example.com', '/page/' || i, (i % 1000) / 7.0, (i % 4)::int,
                        CASE WHEN i % 2 = 0 THEN 'sitemap' ELSE 'link' END,
                        CASE WHEN i % 3 = 0 THEN '' ELSE 'https://example.com/src/' || i END,
                        now() - (i % 5000) * interval '1 millisecond',
                        {task_type}, {run_id}
                   FROM generate_series(1, $2::int8) AS i"
            ),
            &[&job_ids, &rows],
        )
        .await
        .expect("seed outbox rows");
}

/// The member and score every outbox row should end up as, computed here
/// independently of the relay's encoder: task_id → (key suffix job_id, member, score).
pub async fn expected_members(db: &TestDb) -> HashMap<String, (String, String, f64)> {
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT task_id::text, job_id::text, page_id, host, path, priority, retry_count, source_type,
                    source_url, task_type, lighthouse_run_id,
                    floor(extract(epoch FROM run_at) * 1000)::float8
               FROM task_outbox",
            &[],
        )
        .await
        .expect("read outbox");
    rows.iter()
        .map(|r| {
            let task_id: String = r.get(0);
            let job_id: String = r.get(1);
            let task_type: String = r.get(9);
            let member = format!(
                "{}|{}|{}|{}|{}|{:.4}|{}|{}|{}|{}|{}",
                task_id,
                job_id,
                r.get::<_, i32>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, f64>(5),
                r.get::<_, i32>(6),
                r.get::<_, String>(7),
                r.get::<_, String>(8),
                if task_type.is_empty() {
                    "crawl".to_string()
                } else {
                    task_type
                },
                r.get::<_, Option<i64>>(10).unwrap_or(0),
            );
            (task_id, (job_id, member, r.get::<_, f64>(11)))
        })
        .collect()
}

/// Assert every expected member is present in `{prefix}sched:{job_id}` with its score.
pub async fn assert_all_delivered(redis_url: &str, prefix: &str, expected: &HashMap<String, (String, String, f64)>) {
    let mut conn = redis_conn(redis_url).await;
    let mut by_job: HashMap<&str, Vec<(&str, f64)>> = HashMap::new();
    for (job, member, score) in expected.values() {
        by_job.entry(job.as_str()).or_default().push((member.as_str(), *score));
    }
    for (job, want) in by_job {
        let key = format!("{prefix}sched:{job}");
        let have: HashMap<String, f64> = conn
            .zrange_withscores::<_, Vec<(String, f64)>>(&key, 0, -1)
            .await
            .expect("ZRANGE")
            .into_iter()
            .collect();
        for (member, score) in want {
            match have.get(member) {
                Some(s) => assert_eq!(*s, score, "score of {member} in {key}"),
                None => panic!("member missing from {key}: {member}"),
            }
        }
    }
}

/// `n` fresh job ids.
pub fn new_jobs(n: usize) -> Vec<uuid::Uuid> {
    (0..n).map(|_| uuid::Uuid::new_v4()).collect()
}

/// Rows of the ledger no longer in the outbox (delivered or dead-lettered).
pub async fn delivered_so_far(db: &TestDb) -> i64 {
    db.count("SELECT (SELECT count(*) FROM produced) - (SELECT count(*) FROM task_outbox)")
        .await
}

/// The ledger of produced rows (`produced`): the same columns as the outbox,
/// written by [`produce`] in the same statement as the outbox rows.
pub async fn create_ledger(db: &TestDb) {
    db.client()
        .await
        .batch_execute("CREATE TABLE produced AS SELECT * FROM task_outbox WITH NO DATA")
        .await
        .expect("create ledger");
}

/// Produce `rows` due rows over `jobs`, into the outbox and the ledger at
/// once (one statement, so both or neither), like a real producer would.
pub async fn produce(
    client: &tokio_postgres::Client,
    jobs: &[uuid::Uuid],
    rows: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "WITH r AS (
                 SELECT gen_random_uuid() AS task_id, ($1::uuid[])[1 + (i % array_length($1::uuid[], 1))] AS job_id,
                        i::int AS page_id, 'host' || (i % 7) || '.example.com' AS host, '/p/' || i AS path,
                        (i % 100) / 3.0 AS priority, (i % 3)::int AS retry_count, 'sitemap' AS source_type,
                        'https://example.com/s' AS source_url, now() AS run_at,
                        CASE WHEN i % 4 = 0 THEN 'lighthouse' ELSE 'crawl' END AS task_type,
                        -- Runs 1..1000 exist in the Go schema's lighthouse_runs (see TestDb::new_on).
                        CASE WHEN i % 4 = 0 THEN 1 + i::int8 % 1000 END AS lighthouse_run_id
                   FROM generate_series(1, $2::int8) AS i
             ), o AS (
                 INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count, source_type,
                                          source_url, run_at, task_type, lighthouse_run_id)
                 SELECT task_id, job_id, page_id, host, path, priority, retry_count, source_type, source_url, run_at,
                        task_type, lighthouse_run_id FROM r
             )
             INSERT INTO produced (task_id, job_id, page_id, host, path, priority, retry_count, source_type,
                                   source_url, run_at, attempts, created_at, task_type, lighthouse_run_id)
             SELECT task_id, job_id, page_id, host, path, priority, retry_count, source_type, source_url, run_at, 0,
                    now(), task_type, lighthouse_run_id FROM r",
            &[&jobs, &rows],
        )
        .await
        .map(|_| ())
}

/// A producer inserting `batch` rows every `every` until stopped; it rides
/// out database restarts by reconnecting.
pub struct Producer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<u64>,
}

impl Producer {
    pub fn start(url: String, jobs: Vec<uuid::Uuid>, batch: i64, every: Duration) -> Producer {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut committed = 0u64;
            let mut client: Option<tokio_postgres::Client> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match tokio_postgres::connect(&url, NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                if let Some(c) = &client {
                    if produce(c, &jobs, batch).await.is_ok() {
                        committed += batch as u64;
                    }
                }
                tokio::time::sleep(every).await;
            }
            committed
        });
        Producer { stop, handle }
    }

    /// Stop producing; returns the rows committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await.expect("producer task")
    }
}

/// Check the invariant over the ledger.
pub async fn verify_ledger(db: &TestDb, redis_url: &str, prefix: &str) -> outbox_relay::verify::VerifyReport {
    let mut conn = redis_conn(redis_url).await;
    verify_ledger_on(db, &mut conn, prefix).await
}

/// Check the invariant over the ledger through any Redis connection (a cluster one too).
pub async fn verify_ledger_on<C: redis::aio::ConnectionLike + Send>(
    db: &TestDb,
    conn: &mut C,
    prefix: &str,
) -> outbox_relay::verify::VerifyReport {
    let client = db.client().await;
    let produced = outbox_relay::verify::ledger_rows(&client, "produced", None)
        .await
        .expect("ledger rows");
    outbox_relay::verify::verify(&client, conn, prefix, &produced)
        .await
        .expect("verify")
}

/// Resident set size of a process, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A private PostgreSQL cluster (initdb + pg_ctl on a free port) that a test
/// may restart without disturbing the shared server. Runs as `postgres`
/// when the tests run as root (Postgres refuses to run as root).
pub struct PrivatePostgres {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    /// `-c ssl=on`, with a certificate from [`server_cert`].
    tls: bool,
}

impl PrivatePostgres {
    fn pg_bin() -> std::path::PathBuf {
        let mut versions: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql (Debian's postgresql package)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
    }

    fn as_owner(&self, program: &str) -> Command {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let path = self.bin.join(program);
        if is_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub async fn start() -> PrivatePostgres {
        Self::start_with(false).await
    }

    /// A private server that also accepts TLS, with a certificate for
    /// `127.0.0.1` (and no other name) signed by a CA of its own
    /// ([`PrivatePostgres::ca_file`]), made with the `openssl` command.
    pub async fn start_with_tls() -> PrivatePostgres {
        Self::start_with(true).await
    }

    /// The PEM file of the CA that signed the server's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.crt")
    }

    async fn start_with(tls: bool) -> PrivatePostgres {
        let dir = scratch_dir("outbox-pg");
        let pg = PrivatePostgres {
            port: free_port(),
            dir,
            bin: Self::pg_bin(),
            tls,
        };
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&pg.dir)
            .status();
        let status = pg
            .as_owner("initdb")
            .args(["-D"])
            .arg(pg.dir.join("data"))
            .args(["-A", "trust", "-U", "root", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        if tls {
            let data = pg.dir.join("data");
            server_cert(&pg.dir, &data.join("server.key"), &data.join("server.crt"));
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.key"))
                .arg(data.join("server.crt"))
                .status();
            let _ = Command::new("chmod").arg("600").arg(data.join("server.key")).status();
        }
        pg.ctl(&["start"]);
        pg.wait_ready().await;
        pg
    }

    fn ctl(&self, action: &[&str]) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 -c ssl={}",
            self.port,
            self.dir.display(),
            if self.tls { "on" } else { "off" }
        );
        let status = self
            .as_owner("pg_ctl")
            .args(action)
            .args(["-m", "fast", "-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("log"))
            .args(["-o", &opts])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action:?} failed");
    }

    async fn wait_ready(&self) {
        let url = self.url();
        wait_until("private postgres accepts connections", Duration::from_secs(60), || {
            let url = url.clone();
            async move { tokio_postgres::connect(&url, NoTls).await.is_ok() }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    /// Put `lines` first in `pg_hba.conf` and reload (through `admin`, a
    /// session that the new rules still let in).
    pub async fn hba_first(&self, lines: &str, admin: &tokio_postgres::Client) {
        let path = self.dir.join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        std::fs::write(&path, format!("{lines}\n{old}")).expect("write pg_hba.conf");
        admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    }

    /// `pg_ctl restart -m fast`: every session is cut, the server comes back.
    pub async fn restart(&self) {
        self.ctl(&["restart"]);
        self.wait_ready().await;
    }

    /// `pg_ctl stop -m fast`: every session is cut, nothing answers on the port.
    pub fn stop(&self) {
        self.ctl(&["stop"]);
    }

    /// SIGSTOP every process of the server (postmaster and backends): it
    /// is frozen, not stopped; no socket is closed, nothing answers, as
    /// with a paused VM or a network black hole. It thaws (SIGCONT) when
    /// the guard is dropped, also when the test fails meanwhile.
    pub fn freeze(&self) -> Frozen<'_> {
        self.signal_all("STOP");
        Frozen(self)
    }

    fn signal_all(&self, sig: &str) {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
            .expect("postmaster.pid");
        // The children first, so none is forked meanwhile by a running postmaster.
        let _ = Command::new("pkill").args([&format!("-{sig}"), "-P", &pid]).status();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// A streaming standby of this server (`pg_basebackup -R -X stream`)
    /// on a port of its own, started and accepting read-only sessions.
    pub async fn standby(&self) -> PrivatePostgres {
        let standby = PrivatePostgres {
            port: free_port(),
            dir: scratch_dir("outbox-pg-standby"),
            bin: self.bin.clone(),
            tls: self.tls,
        };
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&standby.dir)
            .status();
        let out = standby
            .as_owner("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "root", "-D"])
            .arg(standby.dir.join("data"))
            .args(["-R", "-X", "stream", "--no-sync"])
            .output()
            .expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        standby.ctl(&["start"]);
        standby.wait_ready().await;
        standby
    }

    /// `pg_ctl promote -w`: a standby becomes a primary that takes writes.
    pub fn promote(&self) {
        let status = self
            .as_owner("pg_ctl")
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl promote");
        assert!(status.success(), "pg_ctl promote failed");
    }

    /// Start it again after [`PrivatePostgres::stop`].
    pub async fn start_again(&self) {
        self.ctl(&["start"]);
        self.wait_ready().await;
    }
}

/// A frozen [`PrivatePostgres`]; dropping it thaws the server.
pub struct Frozen<'a>(&'a PrivatePostgres);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal_all("CONT");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A test that failed while the server was frozen: thaw it, or the
        // clean-up (the test database's DROP, pg_ctl stop) waits forever.
        if let Some(pid) = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
        {
            let _ = Command::new("pkill").args(["-CONT", "-P", &pid]).status();
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        let _ = self
            .as_owner("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(cmd: &mut Command) {
    let out = cmd.output().expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA of its own in `dir` (`ca.crt`, returned) and a server key and
/// certificate it signed, for `127.0.0.1` and no other name. It is good for
/// client authentication too: the nodes of a TLS cluster present it to
/// each other on the cluster bus.
pub fn server_cert(dir: &std::path::Path, key: &std::path::Path, crt: &std::path::Path) -> std::path::PathBuf {
    let ca = make_ca(dir, "ca");
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("write server.ext");
    let csr = dir.join("server.csr");
    openssl(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
            ])
            .arg(key)
            .arg("-out")
            .arg(&csr),
    );
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(ca.with_extension("key"))
            .args(["-CAcreateserial", "-out"])
            .arg(crt)
            .arg("-extfile")
            .arg(&ext),
    );
    ca
}

/// A fresh self-signed CA in `dir`: `{name}.crt` (returned) and `{name}.key`.
pub fn make_ca(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN=outbox-relay test {name}"), "-keyout"])
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(&crt),
    );
    crt
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
