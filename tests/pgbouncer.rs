//! Two relays behind a real pgbouncer in transaction pooling mode, with
//! counter sync, under a steady insert load for 20 s: no prepared-statement
//! errors (42P05 / 26000 / 08P01), every row delivered, counters synced.
//! And the Kubernetes ConfigMap's configuration as shipped (its batch,
//! concurrency and intervals, polling) behind pgbouncer as the
//! `outbox_relay` role, through a lock held past two tick deadlines.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands;
use uuid::Uuid;

/// The shared Postgres's port, from the admin URL.
fn shared_pg_port() -> u16 {
    admin_url()
        .rsplit_once(':')
        .and_then(|(_, r)| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

/// A private pgbouncer on a free port, pooling to the shared Postgres.
struct PgBouncer {
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl PgBouncer {
    async fn start() -> PgBouncer {
        PgBouncer::start_to(shared_pg_port()).await
    }

    /// A pgbouncer whose server connections go to 127.0.0.1:`pg_port`.
    async fn start_to(pg_port: u16) -> PgBouncer {
        let port = free_port();
        let dir = scratch_dir("outbox-pgbouncer");
        let pg_host = "127.0.0.1";
        std::fs::write(
            dir.join("userlist.txt"),
            "\"root\" \"\"\n\"postgres\" \"\"\n\"outbox_relay\" \"\"\n",
        )
        .expect("userlist");
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={pg_host} port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 auth_type = trust\nauth_file = {d}/userlist.txt\npool_mode = transaction\ndefault_pool_size = 2\n\
                 max_client_conn = 200\nunix_socket_dir =\nlogfile = {d}/pgbouncer.log\n\
                 ignore_startup_parameters = extra_float_digits\n",
                d = dir.display()
            ),
        )
        .expect("pgbouncer.ini");
        let child = PgBouncer::spawn(&dir);
        let b = PgBouncer { port, child, dir };
        b.wait_accepting().await;
        b
    }

    fn spawn(dir: &std::path::Path) -> Child {
        // pgbouncer refuses to run as root; let it drop to postgres then.
        let mut cmd = Command::new("pgbouncer");
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if is_root {
            Command::new("chmod")
                .args(["-R", "a+rwX", dir.to_str().expect("utf-8")])
                .status()
                .expect("chmod");
            cmd.args(["-u", "postgres"]);
        }
        cmd.arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (scripts/services.sh installs it)")
    }

    async fn wait_accepting(&self) {
        let port = self.port;
        wait_until("pgbouncer accepts connections", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    /// SIGSTOP / SIGCONT: frozen, its sockets open, nothing answers.
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} pgbouncer");
    }

    /// Kill it (every client connection cut) and start it again on its port.
    async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = PgBouncer::spawn(&self.dir);
        self.wait_accepting().await;
    }

    fn url(&self, db: &TestDb) -> String {
        self.url_as("root", db)
    }

    fn url_as(&self, role: &str, db: &TestDb) -> String {
        format!("postgres://{role}@127.0.0.1:{}/{}", self.port, db.name)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What pgbouncer said is the first thing a failure needs: it is
            // gone with the scratch directory otherwise.
            let exited = self.child.try_wait().ok().flatten();
            let log = std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "pgbouncer on port {} {}; its last log lines:\n{}",
                self.port,
                exited.map_or("was still running".to_string(), |s| format!("had exited: {s}")),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn two_relays_behind_pgbouncer_transaction_pooling() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let bouncer = PgBouncer::start().await;
    let jobs: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let producer = db.client().await;
    for j in &jobs {
        producer
            .execute("INSERT INTO jobs (id, status) VALUES ($1, 'running')", &[j])
            .await
            .expect("job");
    }
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_DATABASE__URL", &bouncer.url(&db)),
            ("OUTBOX_RELAY_COUNTER_SYNC__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "100"),
        ],
    );
    let mut a = RelayProcess::spawn(&env);
    let mut b = RelayProcess::spawn(&env);
    a.wait_started().await;
    b.wait_started().await;

    // Steady load for 20 s: 50 rows every 100 ms, and moving counters.
    let hash = format!("{}running", &*prefix);
    let mut conn = redis_conn(&redis_url).await;
    let started = Instant::now();
    let mut produced = 0i64;
    let mut round = 0i64;
    while started.elapsed() < Duration::from_secs(20) {
        producer
            .execute(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
                 SELECT gen_random_uuid(), ($1::uuid[])[1 + i % 5], i, 'h', '/p/' || i, 1, 's', now()
                   FROM generate_series(1, 50) i",
                &[&jobs],
            )
            .await
            .expect("produce");
        produced += 50;
        round += 1;
        for (k, j) in jobs.iter().enumerate() {
            let _: () = conn
                .hset(&hash, j.to_string(), (round + k as i64) % 17)
                .await
                .expect("HSET");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    wait_drained(&db, Duration::from_secs(60)).await;
    assert_eq!(schedule_members(&redis_url, &prefix).await.len() as i64, produced);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    wait_until("counters synced through pgbouncer", Duration::from_secs(30), || async {
        let mut conn = redis_conn(&redis_url).await;
        let mut all = true;
        for j in &jobs {
            let want: i32 = conn.hget(&hash, j.to_string()).await.unwrap_or(-1);
            let have: i32 = db
                .client()
                .await
                .query_one("SELECT running_tasks FROM jobs WHERE id = $1", &[j])
                .await
                .map(|r| r.get(0))
                .unwrap_or(-2);
            all &= want == have;
        }
        all
    })
    .await;
    for relay in [&a, &b] {
        let bad: Vec<String> = relay
            .lines()
            .into_iter()
            .filter(|l| {
                l.contains("42P05") || l.contains("26000") || l.contains("08P01") || l.contains("prepared statement")
            })
            .collect();
        assert!(bad.is_empty(), "prepared-statement errors behind pgbouncer: {bad:#?}");
        // relay_env listens on the direct URL: heard end to end.
        assert_eq!(relay.metric("outbox_relay_listen_active", &[]).await, Some(1.0));
        assert!(relay.records("LISTEN hears nothing").is_empty());
        assert!(relay.count("sweep tick settled") > 0);
    }
    a.stop().await;
    b.stop().await;
}

/// `deploy/kubernetes/configmap.yaml`'s `relay.toml`, as shipped.
fn configmap_toml() -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/configmap.yaml"))
        .expect("configmap.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("configmap yaml");
    doc["data"]["relay.toml"].as_str().expect("data.relay.toml").to_string()
}

/// The ConfigMap's configuration, behind pgbouncer in transaction pooling
/// as the least-privilege `outbox_relay` role, with the Secret's variables
/// (`DATABASE_URL`, `REDIS_URL`). Only the HTTP port is the test's (the
/// ConfigMap's 0.0.0.0:9464 is per pod). Another session holds ACCESS
/// EXCLUSIVE on task_outbox for more than two tick deadlines: ticks time
/// out through pgbouncer, nothing is half-applied, and everything drains
/// once the lock goes.
#[tokio::test]
async fn the_configmap_behind_pgbouncer_as_outbox_relay() {
    let db = TestDb::new().await;
    db.url_as("outbox_relay").await;
    let bouncer = PgBouncer::start().await;
    let redis = RedisServer::start().await;
    let dir = scratch_dir("outbox-configmap");
    let config = dir.join("relay.toml");
    std::fs::write(&config, configmap_toml()).expect("write relay.toml");
    seed(&db, 20_000, 10).await;
    let expected = expected_members(&db).await;

    let mut locker = db.client().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE task_outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let env: Vec<(String, String)> = vec![
        ("OUTBOX_RELAY_CONFIG".into(), config.display().to_string()),
        ("DATABASE_URL".into(), bouncer.url_as("outbox_relay", &db)),
        ("REDIS_URL".into(), redis.url()),
        ("OUTBOX_RELAY_HTTP__LISTEN".into(), format!("127.0.0.1:{}", free_port())),
    ];
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let started = relay.records("outbox-relay starting");
    assert_eq!(started[0]["batch_size"], 1000, "the ConfigMap's batch: {}", started[0]);
    wait_until("two ticks time out on the lock", Duration::from_secs(60), || async {
        relay
            .records("sweep tick failed")
            .iter()
            .filter(|r| r["deadline"] == true)
            .count()
            >= 2
    })
    .await;
    assert!(relay.is_running(), "the relay survives the lock");
    lock.rollback().await.expect("release the lock");

    wait_drained_by(&db, Duration::from_secs(120), &relay).await;
    assert_all_delivered(&redis.url(), "hover:", &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    // The ConfigMap listens through DATABASE_URL ("auto"), here pgbouncer in
    // transaction pooling, where LISTEN hears nothing: one warning naming
    // the fix, the gauge at 0, polling (the drain above). Checked once the
    // lock is gone: while ticks wait on it they hold pgbouncer's two server
    // connections, and the listener's LISTEN and check wait for one too (it
    // retries, with `LISTEN connection failed` warnings).
    wait_until("the deaf listener is reported", Duration::from_secs(60), || async {
        !relay.records("LISTEN hears nothing").is_empty()
    })
    .await;
    let deaf = relay.records("LISTEN hears nothing");
    assert_eq!(deaf[0]["level"], "warn");
    assert!(
        deaf[0]["fix"]
            .as_str()
            .is_some_and(|f| f.contains("database.listen_url")),
        "{}",
        deaf[0]
    );
    assert_eq!(relay.metric("outbox_relay_listen_active", &[]).await, Some(0.0));
    assert_eq!(
        relay.records("LISTEN hears nothing").len(),
        1,
        "one warning, not one per check"
    );
    // check-config and status say so too, with the fix.
    for (args, want) in [
        (&["check-config"][..], "# postgres: listen: deaf:"),
        (&["status"][..], "listen (new rows wake): deaf:"),
    ] {
        let out = relay_command(args, &env).output().expect("run the CLI");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.starts_with(want));
        assert!(
            line.is_some_and(|l| l.contains("database.listen_url")),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for code in ["42P05", "26000", "08P01", "25P02"] {
        assert!(
            relay.lines().iter().all(|l| !l.contains(code)),
            "SQLSTATE {code}: {:#?}",
            relay.lines()
        );
    }
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// pgbouncer hung (SIGSTOP for longer than two tick deadlines: its
/// sockets stay open, nothing answers) and then stopped and started again
/// (every client connection cut) while the relay drains through it: the
/// relay rides out both by itself, counts no attempt, and delivers every
/// row. The fault matrix's pgbouncer row (docs/RELIABILITY.md).
#[tokio::test]
async fn a_hung_then_restarted_pgbouncer_is_ridden_out() {
    let db = TestDb::new().await;
    let mut bouncer = PgBouncer::start().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 20_000, 10).await;
    let expected = expected_members(&db).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_DATABASE__URL", &bouncer.url(&db)),
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "200"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the drain is under way", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await < 20_000
    })
    .await;
    bouncer.signal("STOP");
    wait_until(
        "ticks time out on the hung pgbouncer",
        Duration::from_secs(60),
        || async { relay.count("sweep tick failed") >= 2 },
    )
    .await;
    let left = db.count("SELECT count(*) FROM task_outbox").await;
    bouncer.signal("CONT");
    wait_until("the drain goes on after the thaw", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await < left
    })
    .await;
    bouncer.restart().await;
    wait_drained_by(&db, Duration::from_secs(120), &relay).await;
    assert!(relay.is_running(), "{:#?}", relay.lines());
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(
        relay
            .metric("outbox_relay_sweep_rows_total", &[("outcome", "retried")])
            .await,
        Some(0.0),
        "no attempt counted"
    );
    relay.stop().await;
}

/// A TCP forwarder from a free port to `upstream` whose new connections
/// can be made to wait before they are forwarded: a server slow to accept.
struct SlowAccept {
    port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowAccept {
    async fn start(upstream: u16) -> SlowAccept {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind the forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let wait = Duration::from_millis(delay.load(std::sync::atomic::Ordering::SeqCst));
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        SlowAccept { port, delay_ms, task }
    }

    fn delay_new_connections(&self, by: Duration) {
        self.delay_ms
            .store(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SlowAccept {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Statements cut off by their deadline through pgbouncer are cancelled
/// without killing it, when forwarding the cancel takes longer than the
/// relay waits for it: pgbouncer 1.18 (Debian bookworm's) exits (`FATAL …
/// bad client state` / `bad server state`) when the cancel request's
/// connection, or the connection being cancelled, closes before it has
/// forwarded the cancel, and it forwards it over a new server connection.
/// Seen in CI: the ConfigMap test's pgbouncer died under its lock waits.
#[tokio::test]
async fn cancels_slower_than_the_wait_do_not_kill_pgbouncer() {
    let db = TestDb::new().await;
    let slow = SlowAccept::start(shared_pg_port()).await;
    let mut bouncer = PgBouncer::start_to(slow.port).await;
    let pg = outbox_relay::db::pool(&bouncer.url(&db), 2, Duration::from_secs(10)).expect("pool");
    let mut locker = db.client().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE task_outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    for round in 0..3 {
        // Two statements wait on the lock, on pgbouncer's two server
        // connections. (One queued for a server connection is not
        // cancelled by pgbouncer 1.18: "cancel request for idle client";
        // it runs once a server connection is free.)
        let mut conns = Vec::new();
        for _ in 0..2 {
            let conn = pg
                .pool
                .get_owned()
                .await
                .unwrap_or_else(|e| panic!("round {round}: a connection through pgbouncer: {e}"));
            conns.push(conn);
        }
        for conn in &mut conns {
            let cut = tokio::time::timeout(
                Duration::from_millis(200),
                conn.batch_execute("BEGIN; SELECT count(*) FROM task_outbox"),
            )
            .await;
            assert!(cut.is_err(), "round {round}: the statement waits on the lock");
        }
        // Forwarding a cancel now takes 2.5 s (pgbouncer opens a new server
        // connection for it), more than the relay waits for it.
        slow.delay_new_connections(Duration::from_millis(2500));
        for conn in &mut conns {
            pg.cancel_statement(conn).await;
        }
        drop(conns);
        // The cancelled statements stop waiting on the lock; with pgbouncer
        // gone they would wait on (a backend blocked on a lock does not
        // notice its client leave).
        let waiting = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
            db.name
        );
        let since = Instant::now();
        while db.count(&waiting).await > 0 {
            if let Ok(Some(status)) = bouncer.child.try_wait() {
                panic!("round {round}: pgbouncer exited ({status}) cancelling statements");
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "round {round}: the cancelled statements still wait on the lock after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slow.delay_new_connections(Duration::ZERO);
    }
    lock.rollback().await.expect("release the lock");
    let client = pg.pool.get().await.expect("pgbouncer still serves");
    client
        .batch_execute("SELECT 1")
        .await
        .expect("SELECT 1 through pgbouncer");
    assert!(matches!(bouncer.child.try_wait(), Ok(None)), "pgbouncer is running");
}
