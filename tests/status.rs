//! `status`: backlog, oldest due age, future rows, dead letters and the
//! deepest schedules, as text and JSON; partial output when Redis is down.

use crate::common;

use common::*;
use redis::AsyncCommands;

#[tokio::test]
async fn status_reports_backlog_and_deepest_schedules() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at, created_at)
         SELECT gen_random_uuid(), gen_random_uuid(), i, 'h', '/x', 1, 's', now(), now() - interval '90 seconds'
           FROM generate_series(1, 7) i;
         INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at, created_at)
         SELECT gen_random_uuid(), gen_random_uuid(), i, 'h', '/x', 1, 's', now() + interval '1 hour', now() - interval '10 hours'
           FROM generate_series(1, 4) i;
         INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority, source_type, run_at,
                                       attempts, created_at)
         VALUES (1, gen_random_uuid(), gen_random_uuid(), 1, 'h', '/x', 1, 's', now(), 1, now());",
    )
    .await
    .expect("seed");
    let mut conn = redis_conn(&redis_url).await;
    for depth in 1..=12 {
        let key = format!("{}sched:job{depth:02}", &*prefix);
        let members: Vec<(i64, String)> = (0..depth).map(|i| (i, format!("m{i}"))).collect();
        let _: () = conn.zadd_multiple(&key, &members).await.expect("ZADD");
    }
    let _: () = conn.set(format!("{}sched:broken", &*prefix), "x").await.expect("SET");

    let env = vec![
        ("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".to_string(), redis_url.clone()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".to_string(), prefix.to_string()),
    ];
    let o = relay_command(&["status", "--json"], &env).output().expect("status");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["backlog"], 7);
    assert_eq!(v["future_rows"], 4);
    assert_eq!(v["dead_letters"], 1);
    let age = v["oldest_due_age_seconds"].as_f64().expect("age");
    assert!(
        (89.0..200.0).contains(&age),
        "age by created_at of due rows only: {age}"
    );
    let depths: Vec<i64> = v["schedules"]
        .as_array()
        .expect("schedules")
        .iter()
        .map(|s| s["depth"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(depths, [12, 11, 10, 9, 8, 7, 6, 5, 4, 3]);
    assert_eq!(v["schedules"][0]["job_id"], "job12");

    let text = relay_command(&["status"], &env).output().expect("status");
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.contains("backlog (due now):      7 rows"), "{out}");
    assert!(out.contains("job12"), "{out}");

    // Redis down: the Postgres half is still printed, exit 1 says what is missing.
    let mut env_down = env.clone();
    env_down[1].1 = format!("redis://127.0.0.1:{}/0", free_port());
    let o = relay_command(&["status", "--json"], &env_down)
        .output()
        .expect("status");
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["backlog"], 7);
    assert!(v["schedules"].is_null());
    assert!(String::from_utf8_lossy(&o.stderr).contains("redis"));
}
