//! `outbox-relay pause` / `resume`: three relays draining one outbox obey a
//! pause from their next tick, with no restart. Once the ticks in flight at
//! the pause have ended, no row is delivered and no attempt counted; the
//! relays stay healthy and say they are paused (health line, `/readyz`, a
//! metric, `status`). A job can be paused alone. After `resume` everything
//! drains and the invariant holds.

use crate::common;

use std::time::Duration;

use common::*;

/// Rows in the jobs' schedules (ZCARD summed).
async fn scheduled(redis_url: &str, prefix: &str, jobs: &[uuid::Uuid]) -> i64 {
    let mut conn = redis_conn(redis_url).await;
    let mut total = 0;
    for j in jobs {
        let n: i64 = redis::cmd("ZCARD")
            .arg(format!("{prefix}sched:{j}"))
            .query_async(&mut conn)
            .await
            .expect("ZCARD");
        total += n;
    }
    total
}

/// Wait until every relay has committed `n` more ticks than `before`: the
/// ticks that were in flight before have ended (a relay runs at most
/// `sweep.concurrency` drain ticks and one fresh tick at once).
async fn more_ticks(relays: &[RelayProcess], before: &[f64], n: f64) -> Vec<f64> {
    for (r, b) in relays.iter().zip(before) {
        wait_until("the relay committed more ticks", Duration::from_secs(60), || async {
            r.ok_ticks().await >= b + n
        })
        .await;
    }
    let mut now = Vec::new();
    for r in relays {
        now.push(r.ok_ticks().await);
    }
    now
}

fn cli(env: &[(String, String)], args: &[&str]) -> serde_json::Value {
    let o = relay_command(args, env).output().expect("relay command");
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{args:?} JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

#[tokio::test]
async fn three_relays_obey_pause_and_resume_within_a_tick() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = new_jobs(8);
    produce(&db.client().await, &jobs, 100_000).await.expect("produce");

    let relay_url = db.url_as("outbox_relay").await;
    let triage = vec![
        (
            "OUTBOX_RELAY_DATABASE__URL".to_string(),
            db.url_as("outbox_triage").await,
        ),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis_url.clone()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ];
    let env = relay_env_as(
        &db,
        &relay_url,
        &redis_url,
        &prefix,
        &[
            // Small batches: the drain is still running when the pause lands.
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "100"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_METRICS__PROBE_INTERVAL", "200ms"),
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
        ],
    );
    let mut relays: Vec<RelayProcess> = (0..3).map(|_| RelayProcess::spawn(&env)).collect();
    for r in relays.iter_mut() {
        r.wait_started().await;
    }
    wait_until("the drain has begun", Duration::from_secs(30), || async {
        delivered_so_far(&db).await > 0
    })
    .await;

    let v = cli(&triage, &["pause", "--reason", "incident 42", "--json"]);
    assert_eq!((&v["scope"], &v["changed"]), (&"*".into(), &true.into()), "{v}");
    let mut before = Vec::new();
    for r in &relays {
        before.push(r.ok_ticks().await);
    }
    // Every tick in flight at the pause has ended after four more per relay.
    let ticks = more_ticks(&relays, &before, 4.0).await;
    let (outbox, zset) = (
        db.count("SELECT count(*) FROM task_outbox").await,
        scheduled(&redis_url, &prefix, &jobs).await,
    );
    assert!(outbox > 0, "the drain was still running when the pause landed");
    // Relays keep ticking, and claim nothing.
    more_ticks(&relays, &ticks, 4.0).await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        outbox,
        "no row settled while paused"
    );
    assert_eq!(
        scheduled(&redis_url, &prefix, &jobs).await,
        zset,
        "no ZADD while paused"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "paused rows keep their attempts"
    );

    // Paused, healthy, and saying so.
    for r in &relays {
        wait_until("the health line says paused", Duration::from_secs(10), || {
            let said = r
                .health_lines("SweepActor")
                .iter()
                .any(|l| l["paused"] == "all" && l["status"] == "healthy");
            async move { said }
        })
        .await;
        let (code, body) = r.http_get("/readyz").await.expect("/readyz");
        assert_eq!(code, 200, "a paused relay stays ready: {body}");
        assert!(body.contains("\"paused\":\"all\""), "{body}");
        let m = scrape(r).await;
        assert_eq!(metric_value(&m, "outbox_relay_paused", &[]), Some(1.0));
        assert_eq!(r.http_get("/healthz").await.map(|(c, _)| c), Some(200));
    }
    let st = cli(&triage, &["status", "--json"]);
    assert_eq!(st["paused"][0]["scope"], "*", "{st}");
    assert_eq!(st["paused"][0]["reason"], "incident 42", "{st}");
    assert_eq!(st["paused"][0]["paused_by"], "outbox_triage", "{st}");
    let again = cli(&triage, &["pause", "--json"]);
    assert_eq!(again["changed"], false, "{again}");

    // One job paused alone: the others drain, its rows wait untouched.
    let held = jobs[3];
    let held_rows = db
        .count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{held}'"))
        .await;
    let v = cli(&triage, &["pause", "--job", &held.to_string(), "--json"]);
    assert_eq!(v["scope"], held.to_string(), "{v}");
    let v = cli(&triage, &["resume", "--json"]);
    assert_eq!((&v["scope"], &v["changed"]), (&"*".into(), &true.into()), "{v}");
    wait_until("every other job drained", Duration::from_secs(120), || async {
        db.count(&format!("SELECT count(*) FROM task_outbox WHERE job_id <> '{held}'"))
            .await
            == 0
    })
    .await;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM task_outbox WHERE job_id = '{held}' AND attempts = 0"
        ))
        .await,
        held_rows,
        "the paused job's rows wait, attempts untouched"
    );
    for r in &relays {
        wait_until("the metric shows one paused job", Duration::from_secs(10), || async {
            let m = scrape(r).await;
            metric_value(&m, "outbox_relay_paused_jobs", &[]) == Some(1.0)
                && metric_value(&m, "outbox_relay_paused", &[]) == Some(0.0)
        })
        .await;
    }

    let v = cli(&triage, &["resume", "--job", &held.to_string(), "--json"]);
    assert_eq!(v["changed"], true, "{v}");
    wait_drained(&db, Duration::from_secs(120)).await;
    let report = verify_ledger(&db, &redis_url, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.produced, 100_000);
    assert_eq!(report.dead_lettered, 0);
    for r in relays {
        r.stop().await;
    }
}

/// `*` is the pause table's name for everything: `pause --job '*'` (a TEXT
/// job id, the Go schema) is refused with one line, and pauses nothing.
#[tokio::test]
async fn a_job_named_star_is_refused_not_everything_paused() {
    let db = TestDb::go().await;
    let env = vec![("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone())];
    for verb in ["pause", "resume"] {
        let o = relay_command(&[verb, "--job", "*"], &env)
            .output()
            .expect("relay command");
        assert!(!o.status.success(), "{verb} --job '*' must be refused");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("every job"), "{err}");
    }
    assert_eq!(db.count("SELECT count(*) FROM outbox_relay_pause").await, 0);
}
