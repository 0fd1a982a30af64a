//! `/metrics` as Prometheus and an operator see it: valid for the real
//! `promtool`, counters equal to what happened, probe gauges that follow the
//! backlog (and leave a gap when a probe fails), and a dashboard that only
//! queries metrics the binary exports.

use crate::common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use redis::AsyncCommands;

/// Scrape until `pred` holds; returns that scrape. Panics after `timeout`.
async fn scrape_until(relay: &RelayProcess, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = scrape(relay).await;
        if pred(&text) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run the real `promtool check metrics`; returns (exit code, output).
fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/services.sh installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), all)
}

#[tokio::test]
async fn scrape_is_valid_counts_match_and_the_dashboard_fits() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = seed(&db, 3_000, 10).await;
    let poisoned = jobs[4];
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .set(format!("{}sched:{poisoned}", &*prefix), "x")
        .await
        .expect("SET");
    let job = uuid::Uuid::new_v4();
    db.client()
        .await
        .execute(
            "INSERT INTO jobs (id, status, running_tasks) VALUES ($1, 'running', 2)",
            &[&job],
        )
        .await
        .expect("job");
    let _: () = conn
        .hset(format!("{}running", &*prefix), job.to_string(), 9)
        .await
        .expect("HSET");

    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "200ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "300ms"),
            ("OUTBOX_RELAY_METRICS__PROBE_INTERVAL", "200ms"),
            ("OUTBOX_RELAY_COUNTER_SYNC__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_METRICS__APP", "relay-under-test"),
            ("OUTBOX_RELAY_METRICS__ENVIRONMENT", "ci"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until(
        "drained, poisoned rows dead-lettered",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 300);

    let text = scrape_until(
        &relay,
        "probes have seen the drained outbox",
        Duration::from_secs(30),
        |t| {
            metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(0.0)
                && metric_value(t, "outbox_relay_dead_letter_rows", &[]) == Some(300.0)
                && metric_value(t, "outbox_relay_running_tasks_skew_count", &[]).is_some_and(|c| c >= 1.0)
        },
    )
    .await;

    // Counters equal what happened.
    let rows = |outcome| metric_value(&text, "outbox_relay_sweep_rows_total", &[("outcome", outcome)]);
    assert_eq!(rows("dispatched"), Some(2_700.0));
    assert_eq!(
        rows("retried"),
        Some(300.0),
        "each poisoned row failed once before the cap"
    );
    assert_eq!(rows("dead_lettered"), Some(300.0));
    assert!(metric_value(&text, "outbox_relay_sweep_ticks_total", &[("result", "ok")]).is_some_and(|v| v > 0.0));
    assert!(metric_value(&text, "outbox_relay_sweep_duration_seconds_count", &[]).is_some_and(|v| v > 0.0));
    assert!(
        metric_value(&text, "outbox_relay_claim_duration_seconds_count", &[("found", "rows")]).is_some_and(|v| v > 0.0),
        "claims that found rows are timed"
    );
    assert_eq!(metric_value(&text, "outbox_relay_listen_active", &[]), Some(1.0));
    assert_eq!(
        metric_value(&text, "outbox_relay_listen_leader", &[]),
        Some(1.0),
        "a lone relay answers notifications"
    );
    assert_eq!(metric_value(&text, "outbox_relay_redis_up", &[]), Some(1.0));
    assert!(metric_value(&text, "outbox_relay_redis_ping_seconds", &[]).is_some());
    assert_eq!(
        metric_value(&text, "outbox_relay_actor_healthy", &[("actor", "SweepActor")]),
        Some(1.0)
    );
    assert!(metric_value(&text, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0));
    assert!(metric_value(&text, "process_cpu_seconds_total", &[]).is_some());
    assert!(metric_value(&text, "process_open_fds", &[]).is_some());
    // Every sample carries app and environment from config.
    for (name, labels, _) in samples(&text) {
        assert!(
            labels.contains("app=\"relay-under-test\"") && labels.contains("environment=\"ci\""),
            "{name}{{{labels}}}"
        );
    }

    // The real promtool: no parse error and no lint finding at all.
    let (code, out) = promtool(&text);
    assert_eq!(code, 0, "promtool exit {code}: {out}");
    assert!(out.trim().is_empty(), "promtool findings: {out}");

    // Every metric the dashboard queries is exported.
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        exported.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    // A metric with labels has no series in a scrape before its first
    // event (outbox_relay_redis_refused_entries_total{code}): the catalogue,
    // which the registry is built from, names it all the same.
    use outbox_relay::telemetry::catalogue::{Kind, CATALOGUE};
    let series = |kind: Kind| -> &'static [&'static str] {
        if kind == Kind::Histogram {
            &["_bucket", "_sum", "_count"]
        } else {
            &[""]
        }
    };
    for def in CATALOGUE {
        for suffix in series(def.kind) {
            exported.insert(format!("{}{suffix}", def.name));
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../dashboards/outbox-relay.json")).expect("dashboard JSON");
    let mut exprs: Vec<String> = Vec::new();
    collect_queries(&dashboard, &mut exprs);
    assert!(exprs.len() >= 15, "dashboard queries: {exprs:#?}");
    let mut referenced = BTreeSet::new();
    for e in &exprs {
        for token in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if token.starts_with("outbox_relay_") || token.starts_with("process_") {
                referenced.insert(token.to_string());
            }
        }
    }
    let missing: Vec<&String> = referenced.iter().filter(|r| !exported.contains(*r)).collect();
    assert!(
        missing.is_empty(),
        "dashboard refers to metrics the relay does not export: {missing:?}"
    );
    // Every metric the relay exports has a panel (a histogram through its
    // buckets, sum or count).
    for def in CATALOGUE {
        let shown = series(def.kind)
            .iter()
            .any(|suffix| referenced.contains(&format!("{}{suffix}", def.name)));
        assert!(shown, "the dashboard should show {}", def.name);
    }
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains(&"app") && vars.contains(&"environment"), "{vars:?}");
    relay.stop().await;
}

/// Every `expr` of a panel target and every templating query.
fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map {
                match (k.as_str(), val) {
                    ("expr", serde_json::Value::String(s)) | ("definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => collect_queries(val, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_queries(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn backlog_gauges_follow_the_outbox_and_failed_probes_leave_gaps() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut redis = RedisServer::start().await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_METRICS__PROBE_INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__MAX_RESTARTS", "100"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    redis.stop();
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at, created_at)
         SELECT gen_random_uuid(), gen_random_uuid(), i, 'h', '/x', 1, 's', now(), now() - interval '120 seconds'
           FROM generate_series(1, 250) i;
         INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at, created_at)
         SELECT gen_random_uuid(), gen_random_uuid(), i, 'h', '/x', 1, 's', now() + interval '1 hour', now() - interval '3 days'
           FROM generate_series(1, 40) i;",
    )
    .await
    .expect("seed");

    // One probe round reads Postgres and pings Redis at once: a round whose
    // ping answered just before the kill may read the rows inserted just
    // after it. Wait for a round that saw both.
    let text = scrape_until(&relay, "gauges show the stuck backlog", Duration::from_secs(30), |t| {
        metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(250.0)
            && metric_value(t, "outbox_relay_redis_up", &[]) == Some(0.0)
    })
    .await;
    let age = metric_value(&text, "outbox_relay_oldest_age_seconds", &[]).expect("age");
    assert!(
        (119.0..600.0).contains(&age),
        "age of due rows only, by created_at: {age}"
    );
    assert_eq!(metric_value(&text, "outbox_relay_redis_up", &[]), Some(0.0));
    assert_eq!(
        metric_value(&text, "outbox_relay_redis_ping_seconds", &[]),
        None,
        "a failed ping leaves a gap"
    );

    redis.resume().await;
    scrape_until(
        &relay,
        "gauges return to 0 after the drain",
        Duration::from_secs(60),
        |t| {
            metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(0.0)
                && metric_value(t, "outbox_relay_oldest_age_seconds", &[]) == Some(0.0)
                && metric_value(t, "outbox_relay_redis_up", &[]) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE run_at > now()").await,
        40
    );

    // The outbox probe fails (database refuses connections): its gauges vanish.
    let admin = pg_connect(&admin_url()).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name))
        .await
        .expect("disallow");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name],
        )
        .await
        .expect("terminate");
    scrape_until(&relay, "outbox gauges leave a gap", Duration::from_secs(30), |t| {
        metric_value(t, "outbox_relay_backlog_rows", &[]).is_none()
            && metric_value(t, "outbox_relay_dead_letter_rows", &[]).is_none()
    })
    .await;
    admin
        .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name))
        .await
        .expect("allow");
    relay.stop().await;
}

/// The outbox probe's time from now until it has run `probes` more times
/// (at most `limit`): (seconds spent probing, probes run, the window).
/// Counted in probes, not seconds: a probe that a loaded machine slows
/// rests longer after it (20 times its duration), so a fixed window could
/// hold fewer probes than the test needs.
async fn probe_cost(relay: &RelayProcess, probes: f64, limit: Duration) -> (f64, f64, Duration) {
    let totals = |t: &str| {
        samples(t)
            .into_iter()
            .fold((0.0, 0.0), |(sum, count), (name, _, v)| match name.as_str() {
                "outbox_relay_outbox_probe_duration_seconds_sum" => (sum + v, count),
                "outbox_relay_outbox_probe_duration_seconds_count" => (sum, count + v),
                _ => (sum, count),
            })
    };
    let before = totals(&scrape(relay).await);
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = totals(&scrape(relay).await);
        if now.1 - before.1 >= probes || started.elapsed() >= limit {
            return (now.0 - before.0, now.1 - before.1, started.elapsed());
        }
    }
}

/// The outbox probe counts by walking the whole table (about 1 s of a
/// server core for 5,000,000 rows, every `probe_interval` per relay
/// before): after a probe that took `d` the next waits at least 20 `d`, so
/// probing keeps Postgres busy at most a twentieth of the time however big
/// the outbox. 300,000 paused rows and a 200 ms interval: without the rest
/// the probe ran every round, 0.3-0.5 of the time.
#[tokio::test]
async fn the_outbox_probe_rests_in_proportion_to_what_it_costs() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    common::cli(&db, &["pause", "--reason", "probe cost"]);
    seed(&db, 300_000, 10).await;
    let env = relay_env(
        &db,
        &shared_redis_url(),
        &prefix,
        &[("OUTBOX_RELAY_METRICS__PROBE_INTERVAL", "200ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    scrape_until(
        &relay,
        "the probe counted the paused rows",
        Duration::from_secs(60),
        |t| metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(300_000.0),
    )
    .await;

    // Three probes: a window that starts as one does holds at most three
    // probes and two rests of 20 times their length (3/43 of the time).
    let (busy, probes, window) = probe_cost(&relay, 3.0, Duration::from_secs(240)).await;
    let duty = busy / window.as_secs_f64();
    eprintln!("probe: {probes} probes, {busy:.3} s of {window:?}: duty {duty:.3}");
    assert!(probes >= 3.0, "the probe still runs: {probes} probes in {window:?}");
    // Nor does it rest longer than its cost says: three probes come within
    // about 20 times what they cost (a rest is 20 times the probe before
    // it), with room for one probe before the window that cost more.
    let bound = 40.0 * busy + 5.0;
    assert!(
        window.as_secs_f64() <= bound,
        "the probe rested longer than its cost: {probes} probes, {busy:.3} s busy, in {window:?} (at most {bound:.1} s)"
    );
    assert!(
        duty <= 0.1,
        "the probe kept Postgres busy {duty:.3} of the time ({probes} probes, {busy:.3} s in {window:?})"
    );
    // Resting, it still counts (a count a loaded machine let run past the
    // 200 ms round is cut off, and that round's gauges are empty: wait for
    // the next full count).
    scrape_until(&relay, "a full count after the rests", Duration::from_secs(120), |t| {
        metric_value(t, "outbox_relay_postgres_up", &[]) == Some(1.0)
            && metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(300_000.0)
    })
    .await;
    relay.stop().await;
}

/// A count that Postgres cancels at the probe's statement timeout is an
/// answer: with `task_outbox` locked (an `ALTER TABLE` waiting, a
/// `LOCK TABLE`) the outbox gauges leave a gap and the warning names the
/// lock, but `postgres_up` stays 1, so the alerts do not page "Postgres
/// not writable" for a lock (before: 0, `OutboxRelayPostgresNotWritable`).
/// At the shipped probe interval and tick timeout (a 5 s round).
#[tokio::test]
async fn a_locked_outbox_leaves_gaps_but_postgres_up() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let env = relay_env(&db, &shared_redis_url(), &prefix, &[]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    scrape_until(&relay, "a probe read the outbox", Duration::from_secs(30), |t| {
        metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(0.0)
            && metric_value(t, "outbox_relay_postgres_up", &[]) == Some(1.0)
    })
    .await;

    let mut locker = db.client().await;
    let tx = locker.transaction().await.expect("BEGIN");
    tx.batch_execute("LOCK TABLE task_outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the outbox");
    let text = scrape_until(&relay, "the outbox gauges leave a gap", Duration::from_secs(60), |t| {
        metric_value(t, "outbox_relay_backlog_rows", &[]).is_none()
    })
    .await;
    assert_eq!(
        metric_value(&text, "outbox_relay_postgres_up", &[]),
        Some(1.0),
        "Postgres answered: it is up"
    );
    assert!(
        metric_value(
            &text,
            "outbox_relay_outbox_probe_duration_seconds_count",
            &[("result", "cut_off")]
        )
        .is_some_and(|n| n >= 1.0),
        "the probe counts itself cut off"
    );
    wait_until("the warning names the lock", Duration::from_secs(30), || async {
        relay
            .lines()
            .iter()
            .any(|l| l.contains("outbox probe failed") && l.contains("a lock on task_outbox"))
    })
    .await;
    tx.rollback().await.expect("release the lock");
    scrape_until(&relay, "the gauges come back", Duration::from_secs(90), |t| {
        metric_value(t, "outbox_relay_backlog_rows", &[]) == Some(0.0)
    })
    .await;
    relay.stop().await;
}

/// `outbox_relay_delivery_lag_seconds` counts every delivered row once,
/// from `created_at` and from `run_at`, by the database's clock: rows
/// created 40 s ago and due 2 s ago land above those marks, never below.
#[tokio::test]
async fn delivery_lag_counts_every_delivered_row_from_created_and_from_due() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    db.client()
        .await
        .batch_execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at, created_at)
             SELECT gen_random_uuid(), gen_random_uuid(), i, 'h', '/lag/' || i, 1, 's',
                    now() - interval '2 seconds', now() - interval '40 seconds'
               FROM generate_series(1, 500) i",
        )
        .await
        .expect("rows");
    let mut relay = RelayProcess::spawn(&relay_env(&db, &redis_url, &prefix, &[]));
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let text = scrape_until(&relay, "every delivered row observed", Duration::from_secs(30), |t| {
        metric_value(t, "outbox_relay_delivery_lag_seconds_count", &[("from", "created")]) == Some(500.0)
    })
    .await;
    let bucket = |from, le| {
        metric_value(
            &text,
            "outbox_relay_delivery_lag_seconds_bucket",
            &[("from", from), ("le", le)],
        )
    };
    assert_eq!(
        metric_value(&text, "outbox_relay_delivery_lag_seconds_count", &[("from", "due")]),
        Some(500.0)
    );
    assert_eq!(bucket("created", "30"), Some(0.0), "created 40 s ago: none under 30 s");
    assert_eq!(bucket("created", "600"), Some(500.0));
    assert_eq!(bucket("due", "1"), Some(0.0), "due 2 s ago: none under 1 s");
    assert_eq!(bucket("due", "600"), Some(500.0));
    assert_eq!(bucket("due", "0.001"), Some(0.0));
    relay.stop().await;
}
