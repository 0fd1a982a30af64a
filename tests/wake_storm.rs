//! A storm of 100,000 single-row commits, each one a NOTIFY: wake-ups
//! coalesce, so the relay's memory stays flat, every notification is
//! accounted for (sent or coalesced), every row is delivered, and a row
//! committed after the storm goes out at once again.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

const COMMITS: i64 = 100_000;
const PRODUCERS: i64 = 2;

#[tokio::test]
async fn a_storm_of_single_row_commits_keeps_memory_flat_and_latency_recovers() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let job = uuid::Uuid::new_v4();
    db.client()
        .await
        .batch_execute(
            "CREATE PROCEDURE storm(n int, job uuid) LANGUAGE plpgsql AS $$
             BEGIN
               FOR i IN 1..n LOOP
                 INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority,
                                          source_type, run_at)
                 VALUES (gen_random_uuid(), job, i, 'storm.example.com', '/p/' || i, 1.0,
                         'link', now());
                 COMMIT;
               END LOOP;
             END $$",
        )
        .await
        .expect("storm procedure");

    // Polling every 10 s: what goes out quickly goes out on wake-ups.
    let env = relay_env(&db, &redis_url, &prefix, &[("OUTBOX_RELAY_SWEEP__INTERVAL", "10s")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    let baseline = rss_kib(relay.pid()).expect("relay RSS");

    let started = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let c = pg_connect(&url).await;
                c.batch_execute("SET synchronous_commit = off").await.expect("set");
                c.execute("CALL storm($1, $2)", &[&((COMMITS / PRODUCERS) as i32), &job])
                    .await
                    .expect("storm");
            })
        })
        .collect();
    let mut peak = baseline;
    while producers.iter().any(|p| !p.is_finished()) {
        peak = peak.max(rss_kib(relay.pid()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in producers {
        p.await.expect("producer");
    }
    let storm = started.elapsed();
    let drained_by = Instant::now() + Duration::from_secs(180);
    while db.count("SELECT count(*) FROM task_outbox").await > 0 {
        assert!(
            Instant::now() < drained_by,
            "the storm's rows were not delivered within 180 s"
        );
        peak = peak.max(rss_kib(relay.pid()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = redis_conn(&redis_url).await;
    let scheduled: i64 = redis::AsyncCommands::zcard(&mut conn, format!("{}sched:{job}", &*prefix))
        .await
        .expect("ZCARD");
    assert_eq!(scheduled, COMMITS, "every storm row is in its schedule");
    assert!(
        peak <= baseline + 16 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB during a storm of {COMMITS} commits ({storm:?})"
    );

    // Every notification is accounted for, most of them folded into a
    // wake-up already pending.
    let (_, scrape) = relay.http_get("/metrics").await.expect("scrape");
    let wakeups = |r| metric_value(&scrape, "outbox_relay_wakeups_total", &[("result", r)]).unwrap_or(-1.0);
    let (sent, coalesced) = (wakeups("sent"), wakeups("coalesced"));
    eprintln!("storm of {COMMITS} commits in {storm:?}: RSS {baseline} -> peak {peak} KiB; wake-ups sent {sent}, coalesced {coalesced}");
    // The listener folds a burst of notifications into one wake-up, and
    // the sweep folds wake-ups that come while one is pending: far fewer
    // than one per commit (seen: about 3,500 for 100,000), or the storm
    // would be a storm of ticks.
    assert!(
        sent >= 1.0 && coalesced >= 0.0 && sent + coalesced <= COMMITS as f64 / 4.0,
        "wake-ups: sent {sent}, coalesced {coalesced} for {COMMITS} commits"
    );

    // Latency recovers: a row committed now is in Redis long before the
    // next poll (10 s) would have found it.
    let after = uuid::Uuid::new_v4();
    db.client()
        .await
        .execute("CALL storm(1, $1)", &[&after])
        .await
        .expect("one more row");
    let key = format!("{}sched:{after}", &*prefix);
    wait_until(
        "a row after the storm goes out on its wake-up",
        Duration::from_secs(5),
        || {
            let (url, key) = (redis_url.clone(), key.clone());
            async move {
                let mut conn = redis_conn(&url).await;
                redis::AsyncCommands::zcard::<_, i64>(&mut conn, &key)
                    .await
                    .unwrap_or(0)
                    == 1
            }
        },
    )
    .await;
    assert_eq!(relay.count("actor failed"), 0, "no actor failed during the storm");
    relay.stop().await;
}
