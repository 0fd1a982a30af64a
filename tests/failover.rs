//! Postgres failovers: a streaming standby promoted while the relay drains
//! (a libpq multi-host URL with `target_session_attrs=read-write` finds the
//! new primary), and sessions that land on a server that takes no writes
//! (SQLSTATE 25006), which are a dependency's fault, never a row's.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// The rows still in the outbox, read on `url` (any server that answers,
/// a standby included).
async fn outbox_rows(url: &str) -> Option<i64> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .ok()?
    .ok()?;
    tokio::spawn(conn);
    let row = tokio::time::timeout(
        Duration::from_secs(5),
        client.query_one("SELECT count(*) FROM task_outbox", &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(row.get(0))
}

/// The listener heard its own check again after a failover: active, and
/// checked end to end a second time (on the new primary).
async fn listener_moved(relay: &RelayProcess) {
    wait_until(
        "the listener hears on the new primary",
        Duration::from_secs(60),
        || async {
            relay.metric("outbox_relay_listen_active", &[]).await == Some(1.0)
                && relay.records("listening for new outbox rows; checked end to end").len() >= 2
        },
    )
    .await;
}

/// Wait (up to 180 s after `promoted`) until the outbox on the new primary
/// (`url`) is empty, the relay running all along; how long after the
/// promotion the first of the `left` rows was delivered.
async fn drained_on_new_primary(relay: &mut RelayProcess, url: &str, left: i64, promoted: Instant) -> Duration {
    let mut resumed = None;
    loop {
        assert!(relay.is_running(), "exited after the promotion: {:#?}", relay.lines());
        let now = outbox_rows(url).await;
        if resumed.is_none() && now.is_some_and(|n| n < left) {
            resumed = Some(promoted.elapsed());
        }
        if now == Some(0) {
            return resumed.unwrap_or_else(|| promoted.elapsed());
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(180),
            "not drained on the new primary ({now:?} of {left} rows left): {:#?}",
            relay.lines()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The primary stops (`pg_ctl stop -m fast`: every session cut, its WAL
/// sent to the standby) while the relay drains 60,000 rows at the shipped
/// defaults; ten seconds later the standby is promoted. The relay stays up
/// and unready meanwhile, moves its pools and its listener to the new
/// primary through the multi-host URL, and delivers every row once:
/// nothing lost, nothing dead-lettered, no attempt counted.
#[tokio::test]
async fn a_standby_promoted_mid_drain_is_followed_and_nothing_is_lost() {
    const ROWS: i64 = 60_000;
    let primary = PrivatePostgres::start().await;
    let standby = primary.standby().await;
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", primary.port, standby.port);
    let admin = format!("postgres://root@{hosts}/postgres?target_session_attrs=read-write");
    let db = TestDb::new_on(&admin).await;
    assert!(db.url.contains(&hosts) && db.url.ends_with("target_session_attrs=read-write"));
    let on_standby = format!("postgres://root@127.0.0.1:{}/{}", standby.port, db.name);
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, ROWS, 40).await;
    let expected = expected_members(&db).await;

    let mut relay = RelayProcess::spawn(&shipped_env(&db.url, &redis_url, &prefix));
    relay.wait_started().await;
    assert_eq!(
        relay.records("outbox-relay starting")[0]["database"].as_str(),
        Some(format!("postgres://root@{hosts}/{}?target_session_attrs=read-write", db.name).as_str()),
        "the start line shows every host"
    );
    wait_until("the drain is under way", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await < ROWS
    })
    .await;
    primary.stop();
    let stopped = Instant::now();
    // A fast stop sends the standby every commit first: what it holds is
    // what was left when the primary went.
    let left = outbox_rows(&on_standby).await.expect("count on the standby");
    assert!(
        left > 0,
        "the drain ended before the failover ({ROWS} rows): make the backlog larger"
    );

    // No writable primary: up, unready, nothing written anywhere.
    let opened_before = relay
        .metric("outbox_relay_connections_opened_total", &[("service", "postgres")])
        .await
        .expect("connections opened");
    relay.wait_http("/readyz", 503, Duration::from_secs(30)).await;
    wait_until("outbox_relay_postgres_up is 0", Duration::from_secs(30), || async {
        relay.metric("outbox_relay_postgres_up", &[]).await == Some(0.0)
    })
    .await;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        assert!(relay.is_running(), "exited without a primary: {:#?}", relay.lines());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(outbox_rows(&on_standby).await, Some(left), "the standby took no write");

    standby.promote();
    let promoted = Instant::now();
    let resumed = drained_on_new_primary(&mut relay, &on_standby, left, promoted).await;
    println!(
        "delivery stopped for {:.1} s: {:.1} s without a primary (the test's wait), then {:.1} s from `pg_ctl promote` to the first row delivered on the new primary; {left} of {ROWS} rows were left at the failover",
        (promoted - stopped + resumed).as_secs_f64(),
        (promoted - stopped).as_secs_f64(),
        resumed.as_secs_f64(),
    );

    assert_all_delivered(&redis_url, &prefix, &expected).await;
    let c = pg_connect(&on_standby).await;
    let dead: i64 = c
        .query_one("SELECT count(*) FROM task_outbox_dead", &[])
        .await
        .expect("dead rows")
        .get(0);
    assert_eq!(dead, 0, "nothing dead-lettered");
    // The counter moves when the relay has its tick's COMMIT back, a moment
    // after the rows are gone for every other session: wait for it (CI once
    // scraped in between).
    wait_until(
        "the dispatched counter covers every row",
        Duration::from_secs(30),
        || async {
            relay
                .metric("outbox_relay_sweep_rows_total", &[("outcome", "dispatched")])
                .await
                .is_some_and(|n| n >= ROWS as f64)
        },
    )
    .await;
    let text = scrape(&relay).await;
    let rows = |outcome| metric_value(&text, "outbox_relay_sweep_rows_total", &[("outcome", outcome)]);
    assert_eq!(rows("retried"), Some(0.0), "no attempt counted");
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    wait_until(
        "outbox_relay_postgres_up is 1 again",
        Duration::from_secs(30),
        || async { relay.metric("outbox_relay_postgres_up", &[]).await == Some(1.0) },
    )
    .await;
    assert!(
        relay
            .metric("outbox_relay_connections_opened_total", &[("service", "postgres")])
            .await
            .is_some_and(|n| n > opened_before),
        "the pools reconnected to the new primary"
    );
    // The listener followed: it hears its own check on the new primary.
    listener_moved(&relay).await;
    seed(&db, 100, 2).await;
    let more = expected_members(&db).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &more).await;
    relay.stop().await;
}

/// The primary hangs instead of stopping (every process SIGSTOPped: the
/// kernel still accepts its TCP connections, nothing answers; a paused VM,
/// a partition) and the standby is promoted, at the shipped defaults. The
/// relay reaches the new primary within `sweep.tick_timeout` (5 s) plus a
/// few seconds and delivers every row: each host of the multi-host URL
/// gets its own bound for the whole connection (start-up, authentication,
/// the read-write check), as libpq's `connect_timeout`. Before, the hung
/// first host took every attempt's whole budget and the second was never
/// tried: nothing was delivered for as long as the test waited. The
/// listener follows, and a relay started while the old primary hangs
/// starts.
#[tokio::test]
async fn a_hung_primary_is_passed_over_for_the_promoted_standby() {
    const ROWS: i64 = 30_000;
    const TICK_TIMEOUT: Duration = Duration::from_secs(5);
    let primary = PrivatePostgres::start().await;
    let standby = primary.standby().await;
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", primary.port, standby.port);
    let admin = format!("postgres://root@{hosts}/postgres?target_session_attrs=read-write");
    let db = TestDb::new_on(&admin).await;
    let on_standby = format!("postgres://root@127.0.0.1:{}/{}", standby.port, db.name);
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, ROWS, 40).await;
    let expected = expected_members(&db).await;
    let env = shipped_env(&db.url, &redis_url, &prefix);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the drain is under way", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await < ROWS * 9 / 10
    })
    .await;

    let frozen = primary.freeze();
    standby.promote();
    let promoted = Instant::now();
    let left = outbox_rows(&on_standby).await.expect("count on the new primary");
    assert!(
        left > 0,
        "the drain ended before the failover ({ROWS} rows): make the backlog larger"
    );
    let resumed = drained_on_new_primary(&mut relay, &on_standby, left, promoted).await;
    println!(
        "{:.1} s from `pg_ctl promote` to the first row delivered past the hung primary ({left} of {ROWS} rows left)",
        resumed.as_secs_f64()
    );
    assert!(
        resumed < TICK_TIMEOUT + Duration::from_secs(15),
        "the promoted standby was reached {resumed:?} after the promotion, more than tick_timeout plus a few seconds"
    );
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    let dead = pg_connect(&on_standby)
        .await
        .query_one("SELECT count(*) FROM task_outbox_dead", &[])
        .await
        .expect("dead rows")
        .get::<_, i64>(0);
    assert_eq!(dead, 0, "nothing dead-lettered");

    // The listener moved too: it hears its own check on the new primary.
    listener_moved(&relay).await;
    // A relay started now (the old primary still hangs) starts and is
    // ready: its start-up checks and its pools pass over the hung host.
    // (The test's own helpers connect without a timeout: past this point
    // they read the new primary only.)
    let mut late = RelayProcess::spawn(&env);
    late.wait_started().await;
    late.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    late.stop().await;
    relay.stop().await;
    drop(frozen);
}

/// The server turns read-only under the relay (`default_transaction_read_only`
/// set and reloaded, as on a server set read-only behind an unchanged
/// address): the pooled sessions' claims fail with SQLSTATE 25006. That is
/// the server's fault, never a row's: no row is touched, no attempt
/// counted; the sweep replaces its sessions at once (before, it counted
/// failed ticks up to its error budget first, and new sessions landed on
/// the same read-only server), says it is unready and why, and delivers
/// everything once the server takes writes again.
#[tokio::test]
async fn sessions_on_a_read_only_server_are_a_dependency_fault_and_are_replaced() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let relay_url = db.url_as("outbox_relay").await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut relay = RelayProcess::spawn(&shipped_env(&relay_url, &redis_url, &prefix));
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;

    // The test's own sessions (root) still write; the relay's do not.
    let admin = db.client().await;
    // (ALTER SYSTEM runs alone: a multi-statement string is one transaction.)
    for sql in [
        "ALTER ROLE root SET default_transaction_read_only = off",
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect(sql);
    }
    seed(&db, 500, 5).await;
    let expected = expected_members(&db).await;
    wait_until(
        "the sweep replaces its read-only sessions",
        Duration::from_secs(60),
        || async {
            relay
                .records("actor failed; restarting it with fresh state")
                .iter()
                .any(|r| r["actor"] == "SweepActor" && r["error"].as_str().is_some_and(|e| e.contains("25006")))
        },
    )
    .await;
    relay.wait_http("/readyz", 503, Duration::from_secs(60)).await;
    let restarts = relay.records("actor failed; restarting it with fresh state");
    let first = restarts
        .iter()
        .find(|r| r["actor"] == "SweepActor")
        .expect("a sweep restart");
    assert_eq!(first["cause"], "dependency", "{first}");
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("takes no writes") && e.contains("25006")),
        "the first failure replaces the sessions, naming the read-only server: {first}"
    );
    // Its new sessions are refused at connect: no claim runs on the server.
    wait_until("new sessions are refused", Duration::from_secs(60), || async {
        relay.lines().iter().any(|l| l.contains("does not allow writes"))
    })
    .await;
    assert!(relay.is_running(), "{:#?}", relay.lines());
    // The probe's session answers, but the server takes no writes: that is
    // a Postgres the relay cannot use, and the gauge says so (it stayed 1
    // while the probe's reads worked, #38 code-read item 3).
    wait_until("outbox_relay_postgres_up is 0", Duration::from_secs(60), || async {
        relay.metric("outbox_relay_postgres_up", &[]).await == Some(0.0)
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, 500);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(
        relay
            .metric("outbox_relay_sweep_rows_total", &[("outcome", "retried")])
            .await,
        Some(0.0)
    );

    for sql in [
        "ALTER SYSTEM RESET default_transaction_read_only",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect(sql);
    }
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    wait_until(
        "outbox_relay_postgres_up is 1 again",
        Duration::from_secs(60),
        || async { relay.metric("outbox_relay_postgres_up", &[]).await == Some(1.0) },
    )
    .await;
    relay.stop().await;
}

/// Run `outbox-relay ARGS` with `env`; its exit status must be 0 and none of
/// its output may hold `secret`. Returns stdout.
fn command_ok(args: &[&str], env: &[(String, String)], secret: &str) -> String {
    let out = relay_command(args, env).output().expect("run outbox-relay");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{args:?} failed:\n{stdout}\n{stderr}");
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "{args:?} printed the password:\n{stdout}\n{stderr}"
    );
    stdout
}

/// Both libpq forms that list several hosts, with the standby first (only
/// `target_session_attrs=read-write` finds the primary) and a password:
/// `migrate`, `check-config`, `run` and every other command work through
/// them, and what they print shows every host and never the password.
#[tokio::test]
async fn every_command_takes_a_multi_host_url_in_both_libpq_forms() {
    let primary = PrivatePostgres::start().await;
    let standby = primary.standby().await;
    let (s, p) = (standby.port, primary.port);
    let redis_url = shared_redis_url();
    for form in ["url", "key=value"] {
        let db = TestDb::empty_on(&primary.url()).await;
        let (url, secret, shown) = match form {
            "url" => (
                format!(
                    "postgres://root:s3cret-url@127.0.0.1:{s},127.0.0.1:{p}/{}?target_session_attrs=read-write",
                    db.name
                ),
                "s3cret-url",
                format!("127.0.0.1:{s},127.0.0.1:{p}"),
            ),
            _ => (
                format!(
                    "host=127.0.0.1,127.0.0.1 port={s},{p} user=root password=s3cret-kv dbname={} target_session_attrs=read-write",
                    db.name
                ),
                "s3cret-kv",
                format!("host=127.0.0.1,127.0.0.1 port={s},{p}"),
            ),
        };
        let prefix = key_prefix();
        let env = shipped_env(&url, &redis_url, &prefix);

        command_ok(&["migrate"], &env, secret);
        let text = command_ok(&["check-config"], &env, secret);
        assert!(text.contains(&shown), "{form}: check-config shows every host:\n{text}");
        assert!(
            text.contains("# postgres: reachable, outbox schema present"),
            "{form}:\n{text}"
        );

        create_ledger(&db).await;
        let jobs = new_jobs(4);
        produce(&db.client().await, &jobs, 400).await.expect("produce");
        let mut relay = RelayProcess::spawn(&env);
        relay.wait_started().await;
        let start = &relay.records("outbox-relay starting")[0];
        assert!(
            start["database"]
                .as_str()
                .is_some_and(|d| d.contains(&shown) && !d.contains(secret)),
            "{form}: {start}"
        );
        wait_drained(&db, Duration::from_secs(60)).await;
        relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
        assert!(
            relay.lines().iter().all(|l| !l.contains(secret)),
            "{form}: the relay printed the password"
        );
        relay.stop().await;

        let v: serde_json::Value = serde_json::from_str(&command_ok(
            &["verify", "--ledger", "produced", "--since", "1h", "--json"],
            &env,
            secret,
        ))
        .expect("verify --json");
        assert_eq!(v["delivered"], 400, "{form}: {v}");
        let status: serde_json::Value =
            serde_json::from_str(&command_ok(&["status", "--json"], &env, secret)).expect("status --json");
        assert_eq!(status["backlog"], 0, "{form}: {status}");
        command_ok(&["pause", "--json"], &env, secret);
        command_ok(&["resume", "--json"], &env, secret);
        command_ok(&["dead-letter", "list", "--json"], &env, secret);
        running_job(&db, &jobs[0]).await;
        let cancelled: serde_json::Value = serde_json::from_str(&command_ok(
            &["cancel-job", &jobs[0].to_string(), "--json"],
            &env,
            secret,
        ))
        .expect("cancel-job --json");
        assert_eq!(cancelled["job_id"], jobs[0].to_string(), "{form}: {cancelled}");
    }
}
