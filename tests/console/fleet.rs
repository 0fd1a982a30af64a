//! The fleet page (#30): relays' heartbeats at the shipped
//! `health.interval`, stale and forgotten relays, and the minutes of
//! delivered rows kept in Postgres.

use crate::common;

use std::time::Duration;

use super::web::{relay_with_console, Web};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_heartbeat_and_minutes_survive_in_postgres() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let c = relay_with_console(&db, &prefix, None, &[]).await;
    // A relay gone for an hour is stale; one gone for two days is forgotten
    // at the next heartbeat.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox_relay_instances (instance_id, host, version, started_at, last_seen)
             VALUES ('gone-an-hour', 'old-host', '0.0.9', now() - interval '2 hours', now() - interval '1 hour'),
                    ('gone-two-days', 'older-host', '0.0.8', now() - interval '3 days', now() - interval '2 days');
             INSERT INTO outbox_relay_minutes (minute, instance_id, delivered)
             VALUES (date_trunc('minute', now()) - interval '2 days', 'gone-two-days', 5)",
        )
        .await
        .expect("old instances");
    seed(&db, 300, 3).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    // Without users, a loopback console is open to viewers only.
    let mut web = Web::new(c.port);
    wait_until("the minutes count the 300 rows", Duration::from_secs(60), || async {
        let m = Web::new(c.port).get("/api/v1/minutes").await.json();
        let hour: i64 = m["hour"]
            .as_array()
            .map_or(0, |h| h.iter().filter_map(|p| p["delivered"].as_i64()).sum());
        hour == 300
    })
    .await;
    let fleet = web.get("/api/v1/fleet").await.json();
    assert_eq!(fleet["live"].as_array().map(Vec::len), Some(1), "{fleet}");
    assert_eq!(fleet["stale"][0]["instance_id"], "gone-an-hour", "{fleet}");
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_relay_instances WHERE instance_id = 'gone-two-days'")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_relay_minutes WHERE instance_id = 'gone-two-days'")
            .await,
        0
    );
    let page = web.get("/").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("<svg") && page.body.contains("<polyline"),
        "charts: {}",
        page.body
    );
    assert!(page.body.contains("(stale)"), "{}", page.body);
    assert!(page.body.contains("anonymous · viewer"), "{}", page.body);
    let r = web.post_form("/set-aside/requeue", &[("csrf", "x")]).await;
    assert_eq!(r.status, 403, "no users: no action: {}", r.body);
    // One heartbeat statement per interval: the row's last_seen moves.
    let seen = db
        .count("SELECT extract(epoch FROM last_seen)::int8 FROM outbox_relay_instances WHERE host <> 'old-host'")
        .await;
    wait_until("the next heartbeat", Duration::from_secs(40), || async {
        db.count("SELECT extract(epoch FROM last_seen)::int8 FROM outbox_relay_instances WHERE host <> 'old-host'")
            .await
            > seen
    })
    .await;
    drop(c);
}
