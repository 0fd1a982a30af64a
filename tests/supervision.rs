//! Supervision that really restarts: lost connections and panics restart the
//! failing actor with fresh state, work continues and nothing is lost; a
//! dependency that stays dead makes the process exit non-zero, naming the
//! actor; health lines and /healthz tell the truth throughout.

use crate::common;

use std::time::Duration;

use common::*;

fn max_restarts(relay: &RelayProcess, actor: &str) -> u64 {
    relay
        .health_lines(actor)
        .iter()
        .filter_map(|r| r["restarts"].as_u64())
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn terminated_backends_restart_the_sweep_and_nothing_is_lost() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 60_000, 20).await;
    let expected = expected_members(&db).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "200"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the drain is under way", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await < 59_000
    })
    .await;

    let admin = pg_connect(&admin_url()).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'outbox-relay') t",
            &[&db.name],
        )
        .await
        .expect("terminate backends")
        .get(0);
    assert!(killed >= 1, "the relay had a backend to kill");

    wait_until(
        "a health line shows the sweep restarted",
        Duration::from_secs(30),
        || {
            let restarted = max_restarts(&relay, "SweepActor") >= 1;
            async move { restarted }
        },
    )
    .await;
    wait_drained(&db, Duration::from_secs(120)).await;
    assert!(relay.is_running());
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_panicking_handler_is_restarted_and_work_continues() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 2_000, 5).await;
    let expected = expected_members(&db).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_FAULT_INJECT", "sweep.tick:2"),
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let failures = relay.records("actor failed; restarting it");
    assert_eq!(failures.len(), 2, "two injected panics, two restarts: {failures:#?}");
    assert!(failures
        .iter()
        .all(|r| r["actor"] == "SweepActor" && r["error"].as_str().is_some_and(|e| e.contains("injected fault"))));
    wait_until("a health line shows the restarts", Duration::from_secs(10), || {
        let n = max_restarts(&relay, "SweepActor");
        async move { n >= 2 }
    })
    .await;
    assert!(relay.is_running(), "the process survives a panicking handler");
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_dependency_that_stays_dead_leaves_the_process_running_degraded_and_unready() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    // A tiny intensity and error budget: before, the Postgres outage below
    // made the process exit within seconds ("restart intensity exceeded").
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SUPERVISOR__MAX_RESTARTS", "2"),
            ("OUTBOX_RELAY_SUPERVISOR__RESTART_WINDOW", "60s"),
            ("OUTBOX_RELAY_SUPERVISOR__ERROR_BUDGET", "2"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_MAX", "500ms"),
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;

    // "Postgres stopped", for this relay only: its database stops
    // accepting connections and its sessions are cut.
    let admin = pg_connect(&admin_url()).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name))
        .await
        .expect("disallow connections");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name],
        )
        .await
        .expect("terminate backends");

    wait_until(
        "more restarts than max_restarts, all for the dependency",
        Duration::from_secs(60),
        || {
            assert!(relay.is_running(), "the process exited: {:#?}", relay.lines());
            let restarts = relay
                .records("actor failed; restarting it")
                .iter()
                .filter(|r| r["cause"] == "dependency")
                .count();
            async move { restarts > 4 }
        },
    )
    .await;
    assert!(relay.records("restart intensity exceeded").is_empty());
    let (code, body) = relay.http_get("/readyz").await.expect("/readyz answers");
    assert_eq!(code, 503, "not ready while Postgres is down: {body}");
    let (code, _) = relay.http_get("/healthz").await.expect("/healthz answers");
    assert_eq!(code, 503);

    admin
        .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name))
        .await
        .expect("allow connections again");
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    seed(&db, 500, 5).await;
    let expected = expected_members(&db).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    relay.stop().await;
}

#[tokio::test]
async fn own_faults_past_the_restart_intensity_make_the_process_exit_naming_the_actor() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            // A tick handler that panics every time: the relay's own fault.
            ("OUTBOX_FAULT_INJECT", "sweep.tick:1000000"),
            ("OUTBOX_RELAY_SUPERVISOR__MAX_RESTARTS", "2"),
            ("OUTBOX_RELAY_SUPERVISOR__RESTART_WINDOW", "60s"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "non-zero exit; log {:#?}", relay.lines());
    let gave_up = relay.records("restart intensity exceeded");
    assert_eq!(gave_up.len(), 1, "{:#?}", relay.lines());
    assert_eq!(gave_up[0]["actor"], "SweepActor");
    assert_eq!(gave_up[0]["level"], "error");
    assert!(gave_up[0]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("injected fault")));
    assert!(relay
        .lines()
        .iter()
        .any(|l| l.starts_with("outbox-relay: error: SweepActor kept failing")));
}

#[tokio::test]
async fn healthz_follows_redis_and_readyz_waits_for_both_pools() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut redis = RedisServer::start().await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__MAX_RESTARTS", "100"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_MAX", "200ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    wait_until("/healthz answers 200", Duration::from_secs(30), || async {
        relay.http_get("/healthz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (_, body) = relay.http_get("/healthz").await.expect("healthz");
    let v: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    assert_eq!(v["status"], "healthy");
    let actors: Vec<&str> = v["actors"]
        .as_array()
        .expect("actors")
        .iter()
        .filter_map(|a| a["actor"].as_str())
        .collect();
    assert_eq!(
        actors,
        [
            "SweepActor",
            "DispatchActor",
            "DeadLetterActor",
            "CounterSyncActor",
            "MetricsActor",
            "JournalActor"
        ]
    );

    redis.stop();
    wait_until(
        "/healthz turns 503 while Redis is down",
        Duration::from_secs(30),
        || async { relay.http_get("/healthz").await.is_some_and(|(s, _)| s == 503) },
    )
    .await;
    let (_, body) = relay.http_get("/healthz").await.expect("healthz");
    let v: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    let dispatch = v["actors"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["actor"] == "DispatchActor").cloned())
        .expect("dispatch in body");
    assert_ne!(dispatch["status"], "healthy", "{v}");

    redis.resume().await;
    wait_until(
        "/healthz is 200 again after Redis returns",
        Duration::from_secs(60),
        || async { relay.http_get("/healthz").await.is_some_and(|(s, _)| s == 200) },
    )
    .await;
    relay.stop().await;
}

/// A panic at a fault point in each of the six actors — in handlers, in
/// the callback that takes an I/O result, in a timer-driven round —
/// restarts exactly that actor, which then goes back to healthy work.
#[tokio::test]
async fn a_panic_in_any_actor_restarts_that_actor_and_work_goes_on() {
    for (point, actor) in [
        ("sweep.tick", "SweepActor"),
        ("sweep.settled", "SweepActor"),
        ("dispatch.batch", "DispatchActor"),
        ("dead_letter.report", "DeadLetterActor"),
        ("counter_sync.round", "CounterSyncActor"),
        ("metrics.probe", "MetricsActor"),
        ("journal.watch", "JournalActor"),
    ] {
        let db = TestDb::new().await;
        let prefix = key_prefix();
        let redis_url = shared_redis_url();
        seed(&db, 300, 3).await;
        // One row that can never be encoded: it is dead-lettered, which is
        // what reaches the DeadLetterActor.
        db.client()
            .await
            .batch_execute(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
                 VALUES (gen_random_uuid(), gen_random_uuid(), 1, 'h', '/a|b', 1, 's', now())",
            )
            .await
            .expect("poison row");
        let env = relay_env(
            &db,
            &redis_url,
            &prefix,
            &[
                ("OUTBOX_FAULT_INJECT", &format!("{point}:1")),
                ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
                ("OUTBOX_RELAY_HEALTH__INTERVAL", "200ms"),
                ("OUTBOX_RELAY_COUNTER_SYNC__INTERVAL", "200ms"),
                ("OUTBOX_RELAY_METRICS__PROBE_INTERVAL", "200ms"),
            ],
        );
        let mut relay = RelayProcess::spawn(&env);
        relay.wait_started().await;
        wait_until(
            &format!("{actor} restarted after the panic at {point} and is healthy"),
            Duration::from_secs(30),
            || async {
                let Some((_, body)) = relay.http_get("/healthz").await else {
                    return false;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                    return false;
                };
                v["actors"].as_array().is_some_and(|all| {
                    all.iter()
                        .any(|a| a["actor"] == actor && a["restarts"] == 1 && a["status"] == "healthy")
                })
            },
        )
        .await;
        wait_drained(&db, Duration::from_secs(30)).await;
        assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 1, "{point}");
        let failures = relay.records("actor failed; restarting it");
        assert_eq!(failures.len(), 1, "{point}: {failures:#?}");
        assert_eq!(failures[0]["actor"], actor, "{point}");
        assert_eq!(failures[0]["cause"], "own", "{point}");
        assert!(
            failures[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("injected fault")),
            "{point}: {failures:#?}"
        );
        relay.stop().await;
    }
}

/// A tick that never ends (a bug, not a dependency): the sweep shows no
/// sign of work at all, so the watchdog calls it wedged, the sweep fails
/// as an own fault (counted toward the restart intensity), is restarted
/// with fresh state, and the drain finishes.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_wedged_sweep_is_restarted_as_an_own_fault_and_the_drain_finishes() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 2_000, 5).await;
    let expected = expected_members(&db).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_FAULT_WEDGE", "sweep.tick:hang"),
            // One lane, so the hung tick leaves the sweep with no sign of
            // work at all (a second lane would drain meanwhile; a wedged
            // lane beside a working one is not detected, see the watchdog).
            ("OUTBOX_RELAY_SWEEP__CONCURRENCY", "1"),
            // Cadence 700 ms: wedged after 3.5 s of silence.
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "500ms"),
            ("OUTBOX_RELAY_SWEEP__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let noticed = relay.records("actor wedged: no sign of work");
    assert_eq!(noticed.len(), 1, "{noticed:#?}");
    assert_eq!(noticed[0]["actor"], "SweepActor");
    let failures = relay.records("actor failed; restarting it");
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert_eq!(failures[0]["actor"], "SweepActor");
    assert_eq!(failures[0]["cause"], "own", "a wedge is the relay's own fault");
    assert!(
        failures[0]["error"].as_str().is_some_and(|e| e.starts_with("wedged")),
        "{failures:#?}"
    );
    assert!(relay.is_running());
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    relay.stop().await;
}

/// One lane hangs while the other keeps draining: the actor as a whole
/// shows work all along, so the watchdog cannot see it; the sweep's own
/// lane check finds a tick running past its deadline plus a grace and
/// restarts the actor as an own fault, which brings the lane back.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_wedged_lane_beside_a_working_one_is_restarted() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 2_000, 5).await;
    let expected = expected_members(&db).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_FAULT_WEDGE", "sweep.tick:hang"),
            ("OUTBOX_RELAY_SWEEP__CONCURRENCY", "2"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "500ms"),
            ("OUTBOX_RELAY_SWEEP__INTERVAL", "200ms"),
            ("OUTBOX_RELAY_SUPERVISOR__BACKOFF_BASE", "100ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    // The other lane drains everything meanwhile.
    wait_drained(&db, Duration::from_secs(60)).await;
    wait_until("the wedged lane is noticed", Duration::from_secs(30), || {
        let seen = !relay.records("actor failed; restarting it").is_empty();
        async move { seen }
    })
    .await;
    let failures = relay.records("actor failed; restarting it");
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert_eq!(failures[0]["actor"], "SweepActor");
    assert_eq!(failures[0]["cause"], "own", "a wedged lane is the relay's own fault");
    assert!(
        failures[0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("wedged lane")),
        "{failures:#?}"
    );
    assert!(
        relay.records("actor wedged: no sign of work").is_empty(),
        "the actor kept showing work, so the watchdog had nothing to see"
    );
    // Restarted with both lanes: a new row is delivered.
    let mut more = expected.clone();
    let before = more.len();
    seed(&db, 10, 1).await;
    more.extend(expected_members(&db).await);
    assert_eq!(more.len(), before + 10);
    wait_drained(&db, Duration::from_secs(30)).await;
    assert!(relay.is_running());
    assert_all_delivered(&redis_url, &prefix, &more).await;
    relay.stop().await;
}

/// The dispatch thread itself is stuck: the actor cannot even take the
/// watchdog's message, so nothing in the process can restart it. The
/// process exits non-zero, naming the actor, for the runtime to restart.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_stuck_actor_thread_makes_the_process_exit_naming_the_actor() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 100, 1).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_FAULT_WEDGE", "dispatch.batch:block"),
            // Dispatch cadence max(health.interval, sweep.interval) + tick = 1 s.
            ("OUTBOX_RELAY_HEALTH__INTERVAL", "300ms"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "500ms"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{}", relay.lines().join("\n"));
    let gave_up = relay.records("actor wedged and not answering");
    assert_eq!(gave_up.len(), 1, "{}", relay.lines().join("\n"));
    assert_eq!(gave_up[0]["actor"], "DispatchActor");
    assert_eq!(gave_up[0]["level"], "critical");
}
