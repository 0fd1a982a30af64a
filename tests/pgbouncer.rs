//! Two relays behind a real pgbouncer in transaction pooling mode, with
//! counter sync, under a steady insert load for 20 s: no prepared-statement
//! errors (42P05 / 26000 / 08P01), every row delivered, counters synced.
//! And the Kubernetes ConfigMap's configuration as shipped (its batch,
//! concurrency and intervals, polling) behind pgbouncer as the
//! `outbox_relay` role, through a lock held past two tick deadlines.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands;
use uuid::Uuid;

/// A private pgbouncer on a free port, pooling to the shared Postgres.
struct PgBouncer {
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl PgBouncer {
    async fn start() -> PgBouncer {
        let port = free_port();
        let dir = scratch_dir("outbox-pgbouncer");
        let admin = admin_url();
        let (pg_host, pg_port) = (
            "127.0.0.1",
            admin
                .rsplit_once(':')
                .and_then(|(_, r)| r.split('/').next())
                .unwrap_or("5432"),
        );
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
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (scripts/services.sh installs it)");
        let b = PgBouncer { port, child, dir };
        wait_until("pgbouncer accepts connections", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        b
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
