//! The console's filtered dead-letter actions (#30): requeue by job and
//! error in batches, every row delivered to Redis; purge by job within a
//! time window; the rows outside the filter untouched.

use crate::common;

use std::time::Duration;

use super::web::{relay_with_console, users_file, Web};
use common::*;

async fn insert_dead(db: &TestDb, job: &uuid::Uuid, n: i64, error: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority,
                                           source_type, run_at, attempts, last_error)
             SELECT i, gen_random_uuid(), $1, i::int, 'example.com', '/dead/' || i, 0.5, 'sitemap', now(), 5, $3
               FROM generate_series(1, $2::int8) AS i",
            &[job, &n, &error],
        )
        .await
        .expect("dead letters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_requeued_and_purged_by_filter_in_batches() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let users = users_file("console-dead");
    let c = relay_with_console(&db, &prefix, Some(&users), &[]).await;
    let jobs = new_jobs(2);
    let (a, b) = (jobs[0], jobs[1]);
    insert_dead(&db, &a, 1200, "WRONGTYPE Operation against a key").await;
    insert_dead(&db, &a, 30, "field path holds '|'").await;
    insert_dead(&db, &b, 20, "WRONGTYPE Operation against a key").await;

    let mut alice = Web::new(c.port);
    assert_eq!(alice.sign_in("alice", "alice's password").await.status, 303);
    let csrf = alice.csrf().await;
    let list = alice.get(&format!("/dead-letters?job={a}&error=WRONGTYPE")).await;
    assert_eq!(list.status, 200);
    assert!(list.body.contains("1,200 dead letters match"), "{}", list.body);

    // The confirmation states how many the filter matches.
    let confirm = alice
        .get(&format!(
            "/dead-letters/confirm?action=requeue&job={a}&error=WRONGTYPE&within="
        ))
        .await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(confirm.body.contains("1,200"), "{}", confirm.body);
    // The form carries what was confirmed (#37): the count and highest id.
    assert_eq!(confirm.input("expect_rows").as_deref(), Some("1200"));
    let max_id = confirm.input("max_id").expect("the confirmed highest id");
    let fingerprint = confirm
        .input("fingerprint")
        .expect("the confirmed id set's fingerprint");
    let done = alice
        .post_form(
            "/dead-letters/requeue",
            &[
                ("csrf", &csrf),
                ("job", &a.to_string()),
                ("error", "WRONGTYPE"),
                ("within", ""),
                ("expect_rows", "1200"),
                ("max_id", &max_id),
                ("fingerprint", &fingerprint),
            ],
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("requeued 1200 of 1200"), "{}", done.body);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 50);
    // The relay delivers them.
    wait_until("requeued rows delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
    assert_eq!(schedule_members(&shared_redis_url(), &prefix).await.len(), 1200);

    // Purge what is left of job B's WRONGTYPE rows only.
    let confirm = alice
        .get(&format!(
            "/dead-letters/confirm?action=purge&job={b}&error=WRONGTYPE&within=1h"
        ))
        .await;
    let max_id = confirm.input("max_id").expect("the confirmed highest id");
    let fingerprint = confirm
        .input("fingerprint")
        .expect("the confirmed id set's fingerprint");
    let purged = alice
        .post_form(
            "/dead-letters/purge",
            &[
                ("csrf", &csrf),
                ("job", &b.to_string()),
                ("error", "WRONGTYPE"),
                ("within", "1h"),
                ("expect_rows", "20"),
                ("max_id", &max_id),
                ("fingerprint", &fingerprint),
            ],
        )
        .await;
    assert_eq!(purged.status, 200, "{}", purged.body);
    assert!(purged.body.contains("purged 20 of 20"), "{}", purged.body);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 30);

    // One row, every column.
    let id = db.count("SELECT min(id) FROM task_outbox_dead").await;
    let row = alice.get(&format!("/dead-letters/{id}")).await;
    assert_eq!(row.status, 200);
    for col in ["original_id", "last_error", "dead_lettered_at", "lighthouse_run_id"] {
        assert!(row.body.contains(col), "{col}: {}", row.body);
    }
    assert!(
        row.body.contains("field path holds &#39;|&#39;") || row.body.contains("field path holds '|'"),
        "{}",
        row.body
    );

    let audit = c.relay.records("console action");
    assert!(
        audit.iter().any(|r| r["action"] == "requeue"
            && r["rows"] == 1200
            && r["target"].as_str().is_some_and(|t| t.contains("WRONGTYPE"))),
        "{audit:?}"
    );
}
