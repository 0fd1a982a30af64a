//! The fault suite: break things while work flows, then check the outbox
//! invariant over every produced row (delivered with the exact member, or
//! dead-lettered; nothing lost, nothing corrupted, nothing left due).
//! The relay always runs as a real subprocess; a producer inserts rows (and
//! their ledger copies) continuously while the fault happens.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands;
use uuid::Uuid;

async fn outbox_rows(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM task_outbox").await
}

/// Wait until the relay(s) drained everything, then check the invariant.
async fn drain_and_verify(
    db: &TestDb,
    redis_url: &str,
    prefix: &str,
    produced: u64,
) -> outbox_relay::verify::VerifyReport {
    wait_until("outbox drained", Duration::from_secs(180), || async {
        outbox_rows(db).await == 0
    })
    .await;
    let report = verify_ledger(db, redis_url, prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.pending_due, 0);
    assert_eq!(report.produced as u64, produced, "ledger and producer agree");
    report
}

#[tokio::test]
async fn kill_9_five_times_mid_drain_loses_nothing() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let js = new_jobs(50);
    let c = db.client().await;
    for _ in 0..4 {
        produce(&c, &js, 45_000).await.expect("seed");
    }
    let producer = Producer::start(db.url.clone(), js.clone(), 200, Duration::from_millis(50));
    let env = relay_env(&db, &redis_url, &prefix, &[("OUTBOX_RELAY_LOG__LEVEL", "info")]);
    for round in 0..5 {
        let mut relay = RelayProcess::spawn(&env);
        relay.wait_started().await;
        // A random moment: after a random amount of progress.
        let target = delivered_so_far(&db).await + jitter(3_000..25_000);
        wait_until("some progress before the kill", Duration::from_secs(60), || async {
            delivered_so_far(&db).await >= target
        })
        .await;
        relay.signal("KILL");
        let status = relay.wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success(), "round {round}: killed");
    }
    let relay = RelayProcess::spawn(&env);
    let produced = producer.stop().await + 180_000;
    assert!(produced >= 180_000);
    let report = drain_and_verify(&db, &redis_url, &prefix, produced).await;
    assert_eq!(report.delivered as u64, produced, "{report:#?}");
    relay.stop().await;
}

#[tokio::test]
async fn postgres_restart_mid_drain_needs_no_manual_step() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let js = new_jobs(10);
    produce(&db.client().await, &js, 30_000).await.expect("seed");
    let producer = Producer::start(db.url.clone(), js.clone(), 100, Duration::from_millis(50));
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "200"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("drain under way", Duration::from_secs(60), || async {
        delivered_so_far(&db).await > 2_000
    })
    .await;

    pg.restart().await;
    let after_restart = delivered_so_far(&db).await;
    wait_until(
        "the relay delivers again after the restart",
        Duration::from_secs(60),
        || async { delivered_so_far(&db).await > after_restart + 2_000 },
    )
    .await;
    assert!(relay.is_running(), "no manual step: the same process carries on");
    let produced = producer.stop().await + 30_000;
    let report = drain_and_verify(&db, &redis_url, &prefix, produced).await;
    assert_eq!(report.dead_lettered, 0);
    relay.stop().await;
}

#[tokio::test]
async fn redis_restart_and_30s_outage_cost_no_dead_letters() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let mut redis = RedisServer::start_durable().await;
    let js = new_jobs(10);
    produce(&db.client().await, &js, 10_000).await.expect("seed");
    let producer = Producer::start(db.url.clone(), js.clone(), 50, Duration::from_millis(50));
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "1s"),
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("drain under way", Duration::from_secs(60), || async {
        delivered_so_far(&db).await > 1_000
    })
    .await;

    // A restart (kill -9 and start again; the AOF keeps what was acknowledged).
    redis.stop();
    redis.resume().await;
    let before = delivered_so_far(&db).await;
    wait_until("delivering after the restart", Duration::from_secs(60), || async {
        delivered_so_far(&db).await > before + 500
    })
    .await;

    // A 30 s outage while the producer keeps going.
    redis.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(outbox_rows(&db).await > 0, "a backlog built up during the outage");
    redis.resume().await;
    let back = Instant::now();
    wait_until(
        "backlog drains after Redis returns",
        Duration::from_secs(60),
        || async {
            db.count("SELECT count(*) FROM task_outbox WHERE run_at <= now() - interval '1 second'")
                .await
                == 0
        },
    )
    .await;
    eprintln!("backlog drained {:?} after Redis returned", back.elapsed());
    let produced = producer.stop().await + 10_000;
    let report = drain_and_verify(&db, &redis.url(), &prefix, produced).await;
    assert_eq!(report.dead_lettered, 0, "the outage is not the rows' fault");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert!(relay.is_running());
    relay.stop().await;
}

#[tokio::test]
async fn sigterm_under_load_exits_promptly_and_a_restart_finishes() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let js = new_jobs(20);
    produce(&db.client().await, &js, 60_000).await.expect("seed");
    let producer = Producer::start(db.url.clone(), js.clone(), 200, Duration::from_millis(50));
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("drain under way", Duration::from_secs(60), || async {
        delivered_so_far(&db).await > 5_000
    })
    .await;
    let sent = Instant::now();
    relay.signal("TERM");
    let status = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "within tick_timeout + 1s: {:?}",
        sent.elapsed()
    );

    let relay = RelayProcess::spawn(&env);
    let produced = producer.stop().await + 60_000;
    drain_and_verify(&db, &redis_url, &prefix, produced).await;
    relay.stop().await;
}

#[tokio::test]
async fn the_survivor_takes_over_a_killed_relays_rows() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let js = new_jobs(20);
    produce(&db.client().await, &js, 60_000).await.expect("seed");
    let producer = Producer::start(db.url.clone(), js.clone(), 200, Duration::from_millis(50));
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "300"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );
    let mut a = RelayProcess::spawn(&env);
    let mut b = RelayProcess::spawn(&env);
    a.wait_started().await;
    b.wait_started().await;
    wait_until("both relays at work", Duration::from_secs(60), || async {
        delivered_so_far(&db).await > 5_000
    })
    .await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10)).await;
    let produced = producer.stop().await + 60_000;
    drain_and_verify(&db, &redis_url, &prefix, produced).await;
    assert!(b.is_running());
    b.stop().await;
}

#[tokio::test]
async fn poison_rows_are_dead_lettered_precisely_and_good_rows_flow() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let js = new_jobs(6);
    let wrongtype_job = Uuid::new_v4();
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .set(format!("{}sched:{wrongtype_job}", &*prefix), "not a zset")
        .await
        .expect("SET");
    let c = db.client().await;
    produce(&c, &js, 2_000).await.expect("good rows");
    let long_path = format!("/{}", "very-long-segment/".repeat(12_000));
    let weird = "naïve café — 日本語 🚀 \u{FFFD}\u{200B} ÿþ";
    // Poison: WRONGTYPE job, separators, non-finite priorities; plus odd but valid rows.
    c.execute(
        "WITH r AS (
             SELECT * FROM (VALUES
                 (gen_random_uuid(), $1::uuid, 1, 'h', '/wrongtype-1', 1.0::float8, 'link'),
                 (gen_random_uuid(), $1::uuid, 2, 'h', '/wrongtype-2', 1.0::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 3, 'h', '/a|b', 1.0::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 4, 'h|x', '/ok', 1.0::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 5, 'h', '/nan', 'NaN'::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 6, 'h', '/inf', 'Infinity'::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 7, 'h', '/-inf', '-Infinity'::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 8, 'h', $3::text, 1e300::float8, 'link'),
                 (gen_random_uuid(), $2::uuid, 9, $4::text, $4::text, -0.00005::float8, $4::text)
             ) AS t(task_id, job_id, page_id, host, path, priority, source_type)
         ), o AS (
             INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             SELECT task_id, job_id, page_id, host, path, priority, source_type, now() FROM r
         )
         INSERT INTO produced (task_id, job_id, page_id, host, path, priority, retry_count, source_type, source_url,
                               run_at, attempts, created_at, task_type, lighthouse_run_id)
         SELECT task_id, job_id, page_id, host, path, priority, 0, source_type, '', now(), 0, now(), 'crawl', NULL FROM r",
        &[&wrongtype_job, &js[0], &long_path, &weird],
    )
    .await
    .expect("poison rows");
    let producer = Producer::start(db.url.clone(), js.clone(), 100, Duration::from_millis(50));
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "200ms"),
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "500ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("poison rows dead-lettered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox_dead").await == 7
    })
    .await;
    let produced = producer.stop().await + 2_009;
    let report = drain_and_verify(&db, &redis_url, &prefix, produced).await;
    assert_eq!(report.dead_lettered, 7, "{report:#?}");
    assert_eq!(
        report.delivered as u64,
        produced - 7,
        "good and odd-but-valid rows all delivered"
    );

    let errors: Vec<(String, String)> = c
        .query("SELECT path, last_error FROM task_outbox_dead ORDER BY page_id", &[])
        .await
        .expect("dead rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expect = [
        ("/wrongtype-1", "WRONGTYPE"),
        ("/wrongtype-2", "WRONGTYPE"),
        ("/a|b", "field path contains the separator"),
        ("/ok", "field host contains the separator"),
        ("/nan", "field priority is not a finite number (NaN)"),
        ("/inf", "field priority is not a finite number (inf)"),
        ("/-inf", "field priority is not a finite number (-inf)"),
    ];
    for ((path, err), (want_path, want_err)) in errors.iter().zip(expect) {
        assert_eq!(path, want_path);
        assert!(err.contains(want_err), "{path}: {err}");
    }
    assert!(
        relay.records("actor failed").is_empty(),
        "healthy throughout: {:#?}",
        relay.records("actor failed")
    );
    assert!(
        relay.health_lines("SweepActor").iter().all(|l| l["restarts"] == 0),
        "no sweep restart"
    );
    assert!(relay.http_get("/healthz").await.is_some_and(|(s, _)| s == 200));
    relay.stop().await;
}
