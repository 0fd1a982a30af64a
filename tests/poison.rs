//! Rows that cannot be encoded (a `|` in a field, a non-finite priority) are
//! dead-lettered at once with an error naming the field; they are never
//! written to Redis, and the good rows around them are unaffected.

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn unencodable_rows_are_dead_lettered_at_once() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 200, 4).await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         VALUES ('11111111-1111-1111-1111-111111111111', gen_random_uuid(), 1, 'h', '/a|b', 1, 's', now()),
                ('22222222-2222-2222-2222-222222222222', gen_random_uuid(), 2, 'h', '/ok', 'NaN', 's', now()),
                ('33333333-3333-3333-3333-333333333333', gen_random_uuid(), 3, 'h', '/ok', 1, 'site|map', now())",
    )
    .await
    .expect("insert poison rows");
    let expected = expected_members(&db).await;
    let good: std::collections::HashMap<_, _> = expected
        .into_iter()
        .filter(|(task, _)| {
            !task.starts_with("11111111") && !task.starts_with("22222222") && !task.starts_with("33333333")
        })
        .collect();
    assert_eq!(good.len(), 200);

    let mut relay = RelayProcess::spawn(&relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "10")],
    ));
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(30)).await;

    let dead = c
        .query(
            "SELECT task_id::text, attempts, last_error FROM task_outbox_dead ORDER BY task_id",
            &[],
        )
        .await
        .expect("dead rows");
    let got: Vec<(String, i32, String)> = dead.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got[0].0.starts_with("11111111") && got[0].2.contains("field path"),
        "{got:?}"
    );
    assert!(
        got[1].0.starts_with("22222222") && got[1].2.contains("field priority"),
        "{got:?}"
    );
    assert!(
        got[2].0.starts_with("33333333") && got[2].2.contains("field source_type"),
        "{got:?}"
    );
    assert!(
        got.iter().all(|(_, attempts, _)| *attempts == 1),
        "dead-lettered on the first attempt: {got:?}"
    );

    assert_all_delivered(&redis_url, &prefix, &good).await;
    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 200, "no poison row was written");
    assert!(!members
        .keys()
        .any(|m| m.starts_with("11111111") || m.starts_with("22222222") || m.starts_with("33333333")));
    relay.stop().await;
}
