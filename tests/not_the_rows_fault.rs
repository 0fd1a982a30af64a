//! What is not the rows' fault must never dead-letter the outbox (SPEC §3):
//! only an error about the entry itself (WRONGTYPE) counts an attempt.
//! Each case runs with `max_attempts = 2`, so that a fault charged to the
//! rows would dead-letter them within a few ticks, and ends with no dead
//! letter, attempts unchanged, and every row delivered once the cause is
//! gone.
//!
//! Redis down or stalled:
//! - stopped across at least five ticks;
//! - paused (SIGSTOP) so that ticks are abandoned at their deadline.
//!
//! Redis refusing writes, the refusals counted in
//! `outbox_relay_redis_refused_entries_total` and logged with the error's
//! text:
//! - ZADD renamed away (`--rename-command`, common hardening): `ERR Unknown Redis command called from script`;
//! - an ACL user without `zadd`: `ERR The user executing the script can't run this command`
//!   (`NOPERM` when the command is sent on its own);
//! - a proxy in front of Redis that answers writes with `-ERR proxy refused`;
//! - a master that became a replica behind the same address (a managed
//!   Redis failing over behind a DNS name): `READONLY You can't write
//!   against a read only replica` (#29 item 5).
//!
//! The same rule under other faults is checked where those faults live: a
//! Redis restart and a 30 s outage under a producer
//! (`faults::redis_restart_and_30s_outage_cost_no_dead_letters`), long
//! freezes at the shipped supervisor settings (`outages`), a cluster without
//! full coverage (`cluster`), and master switches (`sentinel`).

use crate::common;

use std::time::Duration;

use common::proxy::RespProxy;
use common::*;

const ROWS: i64 = 300;

fn refused_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("outbox_relay_redis_refused_entries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Drive a relay against `relay_redis` until every row has been refused
/// several times its attempt budget, check nothing was charged, `fix`, and
/// check everything arrives in the schedules of the server at `server_url`.
/// The rows are produced once the relay runs and `breaks` has run (a
/// refusal that starts while the relay runs: one present at start may be
/// refused by `run`'s own checks, see `tests/redis_acl.rs`).
async fn refused_until_fixed<B, BFut, F, Fut>(
    relay_redis: String,
    server_url: String,
    error_text: &str,
    breaks: B,
    fix: F,
) where
    B: FnOnce() -> BFut,
    BFut: std::future::Future<Output = ()>,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut relay = RelayProcess::spawn(&relay_env(
        &db,
        &relay_redis,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "50ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "200ms"),
        ],
    ));
    relay.wait_started().await;
    breaks().await;
    seed(&db, ROWS, 3).await;
    let expected = expected_members(&db).await;

    // Every row refused at least 5 times on average: 2 would have
    // dead-lettered all of them when refusals counted as attempts.
    wait_until("rows refused many times over", Duration::from_secs(60), || async {
        let dead = db.count("SELECT count(*) FROM task_outbox_dead").await;
        assert_eq!(
            dead, 0,
            "a refusal that is not the rows' fault dead-lettered {dead} rows"
        );
        match relay.http_get("/metrics").await {
            Some((200, body)) => refused_total(&body) >= (5 * ROWS) as f64,
            _ => false,
        }
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead").await,
        0,
        "no dead letters"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        ROWS,
        "every row waits"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "no attempt was counted"
    );
    // Not healthy, not ready: a Redis that takes no write is an outage to
    // whoever reads /readyz (#38; before, both said 200 while every row
    // waited, and the backlog gauges read 0: postponed rows are not due).
    wait_until(
        "/readyz says the relay cannot deliver",
        Duration::from_secs(30),
        || async { matches!(relay.http_get("/readyz").await, Some((503, body)) if body.contains("DispatchActor")) },
    )
    .await;
    assert_eq!(relay.http_get("/healthz").await.map(|(s, _)| s), Some(503));
    let warned = relay.records("redis refused writes");
    assert!(
        warned
            .iter()
            .any(|r| r["error"].as_str().is_some_and(|e| e.contains(error_text))),
        "a warning names the error ({error_text}); got {warned:#?}"
    );
    assert!(
        warned.len() < 20,
        "the warning is rate-limited, not one per tick: {} lines",
        warned.len()
    );

    fix().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    // Every member arrived, each exactly once. A postponed row is re-sent
    // with its new run_at as the score (later than when it was produced).
    let members = schedule_members(&server_url, &prefix).await;
    assert_eq!(members.len(), expected.len(), "no extra or corrupted members");
    for (job, member, first_score) in expected.values() {
        let score = members
            .get(member)
            .unwrap_or_else(|| panic!("member of job {job} missing: {member}"));
        assert!(score >= first_score, "a postponed row is never scheduled earlier");
    }
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_renamed_zadd_postpones_rows_without_counting_attempts() {
    let mut server = RedisServer::start_with_args(&["--rename-command", "ZADD", "ZADD_hidden_7f3a"]).await;
    let url = server.url();
    // Inside the fence script Redis words it "Unknown Redis command called from script".
    refused_until_fixed(
        url.clone(),
        url,
        "Unknown Redis command",
        || async {},
        || async {
            // The fix: the same server without the rename.
            server.stop();
            server.extra_args.clear();
            server.resume().await;
        },
    )
    .await;
}

#[tokio::test]
async fn an_acl_user_without_zadd_postpones_rows_without_counting_attempts() {
    let server = RedisServer::start().await;
    let mut admin = redis_conn(&server.url()).await;
    let user = "relay_nozadd";
    let acl = |rules: &[&str]| {
        let mut c = redis::cmd("ACL");
        c.arg("SETUSER").arg(user);
        for r in rules {
            c.arg(*r);
        }
        c
    };
    let _: () = acl(&["on", ">s3cret-pw", "~*", "&*", "+@all", "-zadd"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let relay_url = format!("redis://{user}:s3cret-pw@127.0.0.1:{}/0", server.port);
    // At start the missing command is named, and the relay does not run.
    let db = TestDb::new().await;
    let env = relay_env(&db, &relay_url, &key_prefix(), &[]);
    let o = relay_command(&["run"], &env).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("+zadd"), "{err}");
    // Revoked while the relay runs: refused entries are postponed. Inside
    // the fence script Redis reports the ACL refusal as "ERR The user
    // executing the script can't run this command".
    let _: () = acl(&["+zadd"]).query_async(&mut admin).await.expect("grant zadd");
    let mut revoker = redis_conn(&server.url()).await;
    refused_until_fixed(
        relay_url,
        server.url(),
        "can't run this command",
        || async move {
            let _: () = acl(&["-zadd"]).query_async(&mut revoker).await.expect("revoke zadd");
        },
        || async {
            let _: () = acl(&["+zadd"]).query_async(&mut admin).await.expect("grant zadd");
        },
    )
    .await;
}

#[tokio::test]
async fn a_proxys_own_error_postpones_rows_without_counting_attempts() {
    let server = RedisServer::start().await;
    let proxy = RespProxy::start(server.port).await;
    proxy.refuse(true);
    refused_until_fixed(
        proxy.url(),
        server.url(),
        "proxy refused",
        || async {},
        || async {
            proxy.refuse(false);
        },
    )
    .await;
}

/// `REPLICAOF host port` (or `NO ONE` with `None`) on the server at `port`.
async fn replica_of(port: u16, primary: Option<u16>) {
    let mut conn = redis_conn(&format!("redis://127.0.0.1:{port}/0")).await;
    let mut cmd = redis::cmd("REPLICAOF");
    match primary {
        Some(p) => cmd.arg("127.0.0.1").arg(p),
        None => cmd.arg("NO").arg("ONE"),
    };
    let _: () = cmd.query_async(&mut conn).await.expect("REPLICAOF");
}

/// The relay's address keeps pointing at a server that was demoted in a
/// failover (its replica promoted, itself made a replica of it): every
/// write answers READONLY until it is master again. Not the rows' fault.
#[tokio::test]
async fn a_master_demoted_behind_its_address_postpones_rows_without_counting_attempts() {
    let server = RedisServer::start().await;
    let other = RedisServer::start_replica_of(server.port).await;
    let (a, b) = (server.port, other.port);
    refused_until_fixed(
        server.url(),
        server.url(),
        "READONLY",
        || async move {
            replica_of(b, None).await;
            replica_of(a, Some(b)).await;
        },
        || async move {
            replica_of(a, None).await;
            replica_of(b, Some(a)).await;
        },
    )
    .await;
}

/// A Redis that goes on refusing (READONLY: a real replica, whose PING
/// still answers) past the longest hold, at the shipped defaults: the
/// relay holds its claims 2 s, 4 s, 8 s, 16 s, then 30 s at a time, stays
/// unready, and is never restarted as wedged (a hold longer than the
/// sweep's wedge limit, 27.5 s here, once was), nor exits.
#[tokio::test]
async fn a_lasting_refusal_is_held_without_restarts() {
    let server = RedisServer::start().await;
    let primary = RedisServer::start().await;
    replica_of(server.port, Some(primary.port)).await;
    let db = TestDb::new().await;
    let prefix = key_prefix();
    seed(&db, 100, 2).await;
    let mut relay = RelayProcess::spawn(&shipped_env(&db.url, &server.url(), &prefix));
    relay.wait_started().await;
    let held = |ms: u64| {
        relay
            .records("redis refused every row of the batch")
            .iter()
            .filter(|l| l["hold_ms"].as_u64() == Some(ms))
            .count()
    };
    wait_until("two holds of 30 s", Duration::from_secs(150), || async {
        held(30_000) >= 2
    })
    .await;
    assert!(relay.is_running(), "{:#?}", relay.lines());
    let restarts = relay.records("actor failed; restarting it with fresh state");
    assert!(
        restarts.iter().all(|r| r["actor"] != "SweepActor"),
        "the sweep is held, not wedged: {restarts:#?}"
    );
    relay.wait_http("/readyz", 503, Duration::from_secs(5)).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn outage_costs_no_attempts_and_everything_drains_after() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut redis = RedisServer::start().await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "200ms"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "1s"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    redis.stop();
    seed(&db, 1_000, 5).await;
    let expected = expected_members(&db).await;
    // Ticks, not log lines: the warning is throttled to one per 10 s.
    wait_until("at least 5 ticks hit the outage", Duration::from_secs(60), || async {
        let scrape = relay.http_get("/metrics").await.map(|(_, b)| b).unwrap_or_default();
        metric_value(&scrape, "outbox_relay_redis_unavailable_ticks_total", &[]).is_some_and(|n| n >= 5.0)
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "no attempt was charged"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let why = relay.records("redis unavailable")[0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!why.is_empty(), "the warning says why Redis is unavailable");

    redis.resume().await;
    wait_until(
        "backlog drains after Redis returns",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead").await,
        0,
        "zero dead letters"
    );
    assert_all_delivered(&redis.url(), &prefix, &expected).await;
    assert!(relay.is_running());
    relay.stop().await;
}

#[tokio::test]
async fn a_stalled_redis_abandons_ticks_at_the_deadline_without_charging_rows() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "500ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__MAX_RESTARTS", "100"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_MAX", "200ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    redis.pause();
    seed(&db, 500, 5).await;
    let expected = expected_members(&db).await;
    wait_until(
        "the sweep counts ticks abandoned at their deadline",
        Duration::from_secs(60),
        || {
            let exceeded = relay
                .health_lines("SweepActor")
                .iter()
                .filter_map(|r| r["deadline_exceeded"].as_u64())
                .max()
                .unwrap_or(0);
            async move { exceeded >= 3 }
        },
    )
    .await;
    assert!(relay.count("sweep tick failed") >= 3);
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "no row was bumped"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);

    redis.unpause();
    wait_until(
        "backlog drains once Redis answers again",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    assert_all_delivered(&redis.url(), &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}
