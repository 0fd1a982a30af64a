//! LISTEN is on by default (`database.listen_url = "auto"`: through
//! `database.url`'s server) and checked end to end: at the shipped defaults
//! against a direct Postgres the listener hears its own NOTIFY
//! (`outbox_relay_listen_active` 1) and new rows wake the sweep; `"off"`
//! polls only. The deaf listener behind pgbouncer is in tests/pgbouncer.rs.

use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

#[tokio::test]
async fn shipped_defaults_listen_and_new_rows_wake_the_sweep() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut relay = RelayProcess::spawn(&shipped_env(&db.url, &redis_url, &prefix));
    relay.wait_started().await;
    let started = relay.records("outbox-relay starting");
    assert_eq!(
        started[0]["listen"].as_str(),
        Some(db.url.as_str()),
        "auto listens through database.url: {}",
        started[0]
    );
    wait_until("outbox_relay_listen_active is 1", Duration::from_secs(30), || async {
        relay.metric("outbox_relay_listen_active", &[]).await == Some(1.0)
    })
    .await;
    // The line may reach this test's reader of the relay's output a moment
    // after the gauge is scraped.
    wait_until("the listener says it listens", Duration::from_secs(10), || async {
        !relay
            .records("listening for new outbox rows; checked end to end")
            .is_empty()
    })
    .await;
    assert_eq!(
        relay.records("listening for new outbox rows; checked end to end").len(),
        1
    );
    assert!(relay.records("LISTEN hears nothing").is_empty(), "{:#?}", relay.lines());
    let out = relay_command(&["check-config"], &shipped_env(&db.url, &redis_url, &prefix))
        .output()
        .expect("check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# postgres: listen: active"), "{text}");

    // Rows committed one statement at a time: each statement's NOTIFY
    // wakes the sweep (the counter moves), and every row arrives. Counted
    // from the lead's line (taking the lead wakes the sweep once).
    wait_until("the relay leads the listeners", Duration::from_secs(30), || async {
        !relay.records("this relay answers new-row notifications").is_empty()
    })
    .await;
    let woken_before = woken(&relay).await;
    commit_one_by_one(&db, 20).await;
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 20);
    wait_until("the notifications woke the sweep", Duration::from_secs(10), || async {
        woken(&relay).await > woken_before
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn listen_off_polls_only() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut env = shipped_env(&db.url, &redis_url, &prefix);
    env.push(("OUTBOX_RELAY_DATABASE__LISTEN_URL".into(), "off".into()));
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    assert_eq!(relay.records("outbox-relay starting")[0]["listen"], "off");
    seed(&db, 50, 2).await;
    wait_drained(&db, Duration::from_secs(30)).await;
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 50);
    assert_eq!(relay.metric("outbox_relay_listen_active", &[]).await, Some(0.0));
    assert!(relay.records("listening for new outbox rows").is_empty());
    assert_eq!(woken(&relay).await, 0.0);
    relay.stop().await;
}

/// Several relays on one database: one answers notifications (it holds the
/// listen lead), the others poll and drain; when it stops, another takes
/// the lead and answers from then on.
#[tokio::test]
async fn one_relay_answers_notifications_and_another_takes_over_when_it_stops() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let env = shipped_env(&db.url, &redis_url, &prefix);
    let mut a = RelayProcess::spawn(&env);
    let mut b = RelayProcess::spawn(&env);
    a.wait_started().await;
    b.wait_started().await;
    let follows = |r: &RelayProcess| !r.records("another relay answers new-row notifications").is_empty();
    wait_until(
        "one relay holds the lead, the other follows",
        Duration::from_secs(30),
        || async {
            let (x, y) = (lead(&a).await, lead(&b).await);
            (x == Some(1.0) && y == Some(0.0) && follows(&b)) || (x == Some(0.0) && y == Some(1.0) && follows(&a))
        },
    )
    .await;
    let (leader, follower) = if lead(&a).await == Some(1.0) { (a, b) } else { (b, a) };
    wait_until("the lead says it answers", Duration::from_secs(10), || async {
        !leader.records("this relay answers new-row notifications").is_empty()
    })
    .await;
    assert_eq!(leader.records("this relay answers new-row notifications").len(), 1);
    assert_eq!(
        follower.records("another relay answers new-row notifications").len(),
        1,
        "{:#?}",
        follower.lines()
    );
    // Both heard their own check: listening works on both.
    assert_eq!(follower.metric("outbox_relay_listen_active", &[]).await, Some(1.0));

    leader.stop().await;
    wait_until("the other relay takes the lead", Duration::from_secs(30), || async {
        follower.metric("outbox_relay_listen_leader", &[]).await == Some(1.0)
    })
    .await;
    let woken_before = woken(&follower).await;
    commit_one_by_one(&db, 10).await;
    wait_until("the new lead's sweep is woken", Duration::from_secs(10), || async {
        woken(&follower).await > woken_before
    })
    .await;
    follower.stop().await;
}

/// The lead gives the lead up when it cannot deliver (#38 code-read item
/// 2): its Redis refuses every write (here a proxy in its path answering
/// `-ERR`: a node turned replica, an ACL change), its dispatch is
/// unhealthy, and within a liveness round it releases the lock; the other
/// relay takes the lead and answers new rows. Before, it kept the lead and
/// every other relay learnt of new rows only at its quiet poll.
#[tokio::test]
async fn a_lead_that_cannot_deliver_hands_the_lead_over() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let server = RedisServer::start().await;
    let proxy = common::proxy::RespProxy::start(server.port).await;
    let mut a = RelayProcess::spawn(&shipped_env(&db.url, &proxy.url(), &prefix));
    a.wait_started().await;
    wait_until("the first relay holds the lead", Duration::from_secs(30), || async {
        lead(&a).await == Some(1.0)
    })
    .await;
    let mut b = RelayProcess::spawn(&shipped_env(&db.url, &server.url(), &prefix));
    b.wait_started().await;
    wait_until("the second relay follows", Duration::from_secs(30), || async {
        !b.records("another relay answers new-row notifications").is_empty()
    })
    .await;

    proxy.refuse(true);
    seed(&db, 200, 2).await;
    wait_until(
        "the relay that cannot deliver gives up the lead",
        Duration::from_secs(60),
        || async { lead(&a).await == Some(0.0) && lead(&b).await == Some(1.0) },
    )
    .await;
    assert_eq!(
        a.records("this relay gives up the listen lead").len(),
        1,
        "{:#?}",
        a.lines()
    );
    wait_drained(&db, Duration::from_secs(120)).await;
    let woken_before = woken(&b).await;
    commit_one_by_one(&db, 10).await;
    wait_until("the new lead's sweep is woken", Duration::from_secs(10), || async {
        woken(&b).await > woken_before
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// While the listener hears, idle lanes poll only every
/// `sweep.listen_poll_interval` (an hour here): rows inserted not yet due,
/// rows put back for a retry and rows held by a pause that is lifted must
/// each wake the relay when they come due. Without those wake-ups each of
/// them would wait for the hour's poll.
#[tokio::test]
async fn what_comes_due_wakes_a_listening_relay_without_polling() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut env = shipped_env(&db.url, &redis_url, &prefix);
    env.push(("OUTBOX_RELAY_SWEEP__LISTEN_POLL_INTERVAL".into(), "1h".into()));
    env.push(("OUTBOX_RELAY_SWEEP__BASE_BACKOFF".into(), "300ms".into()));
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("this relay leads", Duration::from_secs(30), || async {
        lead(&relay).await == Some(1.0)
    })
    .await;
    let c = db.client().await;
    let insert = |job: uuid::Uuid, rows: i32, delay_ms: i32| {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
                 SELECT gen_random_uuid(), $1, i, 'h', '/p', 1, 's', now() + $3::int4 * interval '1 millisecond'
                   FROM generate_series(1, $2) i",
                &[&job, &rows, &delay_ms],
            )
            .await
            .expect("insert");
        }
    };

    // Not yet due at the claim its NOTIFY starts: the claim reads when the
    // first comes due and the relay ticks then.
    insert(new_jobs(1)[0], 10, 2000).await;
    wait_drained(&db, Duration::from_secs(60)).await;

    // Retried with backoff: each put-back sets a timer for when it comes due.
    let job = new_jobs(1)[0];
    poison_job(&redis_url, &prefix, &job).await;
    insert(job, 10, 0).await;
    wait_until(
        "the retried rows came due and were retried again",
        Duration::from_secs(60),
        || async {
            let row = c
                .query_one("SELECT min(attempts) FROM task_outbox WHERE job_id = $1", &[&job])
                .await
                .expect("attempts");
            row.get::<_, Option<i32>>(0).unwrap_or(0) >= 2
        },
    )
    .await;
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn.del(format!("{}sched:{job}", &*prefix)).await.expect("DEL");
    wait_drained(&db, Duration::from_secs(60)).await;

    // Held by a pause, then resumed: `resume` notifies.
    let out = relay_command(&["pause"], &env).output().expect("pause");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let empty_claims = || async {
        relay
            .metric(
                "outbox_relay_claim_duration_seconds_count",
                &[("found", "none"), ("lane", "fresh")],
            )
            .await
            .unwrap_or(0.0)
    };
    let before = empty_claims().await;
    insert(new_jobs(1)[0], 5, 0).await;
    wait_until(
        "the claim for the paused rows left them",
        Duration::from_secs(30),
        || async { empty_claims().await > before },
    )
    .await;
    let out = relay_command(&["resume"], &env).output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 25);
    relay.stop().await;
}

/// The relays that do not lead poll every `sweep.listen_poll_interval` (an
/// hour here), but join a backlog at once: the lead's claim finds a full
/// batch and it says so (`NOTIFY outbox_relay, 'outbox-relay-backlog'`).
#[tokio::test]
async fn the_lead_tells_the_others_when_a_backlog_arrives() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut env = shipped_env(&db.url, &redis_url, &prefix);
    env.push(("OUTBOX_RELAY_SWEEP__LISTEN_POLL_INTERVAL".into(), "1h".into()));
    let mut a = RelayProcess::spawn(&env);
    let mut b = RelayProcess::spawn(&env);
    a.wait_started().await;
    b.wait_started().await;
    wait_until("one relay leads, the other hears", Duration::from_secs(30), || async {
        let (x, y) = (lead(&a).await, lead(&b).await);
        matches!((x, y), (Some(1.0), Some(0.0)) | (Some(0.0), Some(1.0))) && hears(&a).await && hears(&b).await
    })
    .await;
    let follower = if lead(&a).await == Some(1.0) { &b } else { &a };
    seed(&db, 60_000, 5).await;
    wait_drained(&db, Duration::from_secs(120)).await;
    let joined = follower
        .metric("outbox_relay_sweep_rows_total", &[("outcome", "dispatched")])
        .await
        .unwrap_or(0.0);
    assert!(
        joined > 0.0,
        "the relay that does not lead delivered none of the backlog"
    );
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 60_000);
}

async fn hears(r: &RelayProcess) -> bool {
    r.metric("outbox_relay_listen_active", &[]).await == Some(1.0)
}

async fn lead(r: &RelayProcess) -> Option<f64> {
    r.metric("outbox_relay_listen_leader", &[]).await
}

/// `outbox_relay_wakeups_total{result="sent"}` now (0 before the first).
async fn woken(r: &RelayProcess) -> f64 {
    r.metric("outbox_relay_wakeups_total", &[("result", "sent")])
        .await
        .unwrap_or(0.0)
}

/// `n` due rows of one new job, each committed by a statement of its own
/// (each sends its NOTIFY), then wait until the outbox is empty.
async fn commit_one_by_one(db: &TestDb, n: i32) {
    let job = new_jobs(1)[0];
    let c = db.client().await;
    for i in 0..n {
        c.execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             VALUES (gen_random_uuid(), $1, $2, 'h', '/p', 1, 's', now())",
            &[&job, &i],
        )
        .await
        .expect("insert");
    }
    wait_drained(db, Duration::from_secs(30)).await;
}
